"""The sequential calibration loop: one decoder block at a time, in bounded memory.

    capture the inputs of block 0 (embeddings only are loaded; every block is a pass-through)
    for each block:
        read its weights from the safetensors file (plain reads, no memory map)
        run the calibration inputs through it, hooks accumulating per-Linear statistics
        fold scales (AWQ, SmoothQuant), quantize its Linear layers (RTN, MSE clip, GPTQ, AWQ clip)
        run the quantized block to produce the next block's inputs
    quantize the head if the recipe asks (RTN), round the kept tensors, return plan and records (Calibrated)

Blocks not being worked on stay on the meta device (never read) or are already quantized, so peak
memory is about one float block, the calibration activations (samples x seq_len x hidden, twice)
and one Hessian, not the whole float model. The same loop runs on a model already in memory (the
reader is then a no-op), which is how the tests check that streaming changes nothing.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lowbit.calib import awq, clip, gptq, smoothquant
from lowbit.calib.data import CalibData
from lowbit.calib.mappings import mappings_for
from lowbit.errors import LowbitError
from lowbit.formats import affine
from lowbit.formats.qtensor import QTensor, int_qtensor, quantize_tensor
from lowbit.formats.spec import QuantSpec
from lowbit.model.qlinear import QLinear, prepare_model, share_embedding
from lowbit.model.quantize import ModulePlan, check_finite, plan_model, round_kept, set_submodule
from lowbit.model.skeleton import release_memory, set_tensor
from lowbit.recipe import ALGORITHMS, Recipe

METHODS = ALGORITHMS  # the recipe's algorithm list is the one list of methods
AWQ_SCALES = ("awq", "awq-gptq")  # methods that search AWQ scales (and keep activation rows for it)
GPTQ_ROUNDING = ("gptq", "awq-gptq")  # methods that accumulate Hessians and round with GPTQ
OFFLOAD_MIN = 1 << 20  # elements: float tensors outside the blocks this large go back to disk during the loop
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CalibOptions:
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # GPTQ: lazy-update column block
    act_order: bool = True  # GPTQ: columns by decreasing diag(H)
    alpha: float = 0.5  # SmoothQuant migration strength
    grid: int = 20  # AWQ scale grid and clipping grid
    awq_tokens: int = 4096  # AWQ: activation rows kept per Linear for the searches
    clip_tokens: int = 512  # AWQ clipping search: rows of those used
    learn_steps: int = 200  # learned rounding: signSGD steps per block
    learn_lr: float | None = None  # learned rounding: None: 2 / learn_steps
    learn_batch: int = 4  # learned rounding: calibration windows per step
    learn_init: str = "rtn"  # learned rounding: start from the nearest rounding ("rtn"), GPTQ's ("gptq") or AWQ's ("awq")
    learn_loss: str = "relative"  # learned rounding: LEARN_LOSSES, the forms of learned._err
    learn_e2e_steps: int = 0  # learned rounding, then the group scales tuned against the float logits (e2e.py); 0: off
    learn_e2e_lr: float = 1e-3  # that stage's Adam learning rate on log(scale)
    learn_e2e_batch: int = 1  # that stage's windows per step
    device: str | None = None  # None: CUDA when present, else CPU


# -- reading one block's tensors -----------------------------------------------------------------
class TensorSource:
    """Tensors of a float checkpoint folder (one or several safetensors files), read one at a time."""

    def __init__(self, folder: Path) -> None:
        from lowbit.model import sources
        from lowbit.model.st_reader import read_header

        self.where: dict[str, tuple[Path, int, dict]] = {}
        for f in sources.check_hf_folder(folder):
            base, header = read_header(f)
            for name, info in header.items():
                self.where[name] = (f, base, info)

    def names(self) -> list[str]:
        return list(self.where)

    def read(self, name: str) -> torch.Tensor:
        from lowbit.model.st_reader import read_tensor

        f, base, info = self.where[name]
        return read_tensor(f, base, info)


def _fill(model: nn.Module, source: TensorSource | None, names: list[str], dtype: torch.dtype) -> None:

    if source is None:
        return
    for n in names:
        t = source.read(n)
        if t.is_floating_point():
            t = t.to(dtype)
        if not set_tensor(model, n, t):
            raise LowbitError(f"weights: tensor {n} has no place in the model built from config.json; fix: check the config matches the weights")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose name ends in 'layers'."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("layers")]
    if not found:
        raise LowbitError("model: no list of decoder layers (a ModuleList named '...layers') was found; "
                          "calibrated quantization supports decoder-only transformers (Llama, Gemma 3, Qwen, Mistral)")
    return max(found, key=lambda nm: len(nm[1]))


class _PassThrough(nn.Module):
    """Stands in for a block while the block inputs are captured: records kwargs, returns its input."""

    def __init__(self, index: int, store: dict) -> None:
        super().__init__()
        self.index, self.store = index, store

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.store.setdefault("inputs", []).append(hidden_states.detach())
        self.store.setdefault("kwargs", {}).setdefault(self.index, {k: v for k, v in kwargs.items()
                                                                    if k not in ("cache", "past_key_values", "use_cache")})
        return hidden_states


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


# -- statistics ---------------------------------------------------------------------------------
class LinearStats:
    """Per-Linear accumulators filled by a forward pre-hook."""

    def __init__(self, in_features: int, hessian: bool, keep_rows: int, device) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)  # sum x**2 (importance)
        self.absmax = torch.zeros(in_features, device=device)
        self.n = 0
        self.H = gptq.Hessian.empty(in_features, device) if hessian else None
        self.factors: dict = {}  # GPTQ's factorisation of H, shared by the Linears reading this input
        self.keep_rows = keep_rows
        self.rows: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(0)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sq += (x * x).sum(0).double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.n += x.shape[0]
        if self.H is not None:
            self.H.add(x)
        if self.keep_rows:
            idx = torch.randperm(x.shape[0], generator=self.gen)[: self.keep_rows]
            self.rows.append(x[idx.to(x.device)].cpu())

    def importance(self) -> torch.Tensor:
        return (self.sq / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0)

    def rescale(self, s: torch.Tensor) -> None:
        """The inputs become x / s once s is folded into the op that feeds this Linear."""
        self.sq /= s.double().pow(2)
        self.absmax /= s
        self.rows = [r / s.cpu() for r in self.rows]
        if self.H is not None:
            self.H.H /= s[:, None] * s[None, :]


# -- the loop ----------------------------------------------------------------------------------
LEARN_INITS = ("rtn", "gptq", "awq")
LEARN_LOSSES = ("relative", "mse", "normed", "postnorm", "lookahead")  # learned._err's forms


def _searches_awq(method: str, options: CalibOptions) -> bool:
    """Whether the method searches AWQ's scales: the AWQ methods, and learned rounding started from AWQ."""
    return method in AWQ_SCALES or (method == "learned" and options.learn_init == "awq")


def _needs_hessian(method: str, options: CalibOptions) -> bool:
    """Whether the method rounds with GPTQ: the GPTQ methods, and learned rounding started from GPTQ."""
    return method in GPTQ_ROUNDING or (method == "learned" and options.learn_init == "gptq")


def check_method(method: str, recipe: Recipe, options: CalibOptions | None = None) -> None:
    if method not in METHODS:
        raise LowbitError(f"--method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if options is not None and options.learn_init not in LEARN_INITS:
        raise LowbitError(f"--learn-init '{options.learn_init}' is unknown; use one of {', '.join(LEARN_INITS)}")
    if options is not None and options.learn_e2e_steps and method != "learned":
        raise LowbitError(f"--learn-e2e-steps works with --method learned (it tunes the scales against the float "
                          f"model's logits, which that method's float stream carries); got --method {method}; fix: "
                          f"--method learned, or drop --learn-e2e-steps")
    if options is not None:
        for flag, value, ok, need in (("--learn-e2e-steps", options.learn_e2e_steps, options.learn_e2e_steps >= 0, ">= 0"),
                                      ("--learn-e2e-batch", options.learn_e2e_batch, options.learn_e2e_batch >= 1, ">= 1"),
                                      ("--learn-e2e-lr", options.learn_e2e_lr, options.learn_e2e_lr > 0, "> 0 (default 1e-3)")):
            if not ok:
                raise LowbitError(f"{flag} is {value}; it must be {need}")
    if options is not None and options.learn_loss not in LEARN_LOSSES:
        raise LowbitError(f"--learn-loss '{options.learn_loss}' is unknown; use one of {', '.join(LEARN_LOSSES)}")
    if method != "rtn":
        kinds = {s.kind for s in [recipe.scheme, *(o.scheme for o in recipe.overrides if o.scheme)]}
        if kinds != {"int"}:
            raise LowbitError(f"--method {method}: works on integer schemes; recipe '{recipe.name}' uses "
                              f"{', '.join(sorted(kinds))}; fix: pick an int recipe (e.g. w4-g128) or --method rtn")


@dataclass
class Calibrated:
    """What a calibrated quantization leaves besides the quantized modules (lowbit.Model's fields)."""

    plan: list[ModulePlan]
    recipe: Recipe  # the recipe with its algorithm set to the method used
    imatrix: dict[str, torch.Tensor]  # module -> mean x**2 per input channel
    record: dict  # method, options, data statistics, device, seconds, RTN fallbacks, AWQ ratios


def quantize_sequential(model: nn.Module, recipe: Recipe, method: str, data: CalibData,
                        source: TensorSource | None = None, options: CalibOptions = CalibOptions(),
                        progress: Progress | None = None, kernels: bool = True) -> Calibrated:
    """Quantize `model` in place, block by block. With `source`, the model is a meta-device skeleton
    and each block's weights are read from it when the block's turn comes. kernels=False leaves the
    kernel choice (lowbit.model.qlinear.prepare_model) to the caller, e.g. after saving, so the
    artifact is written from the stored form without packing and unpacking every weight first."""
    check_method(method, recipe, options)
    t0 = time.perf_counter()
    loop = _BlockLoop(model, recipe, method, source, options, progress)
    loop.capture_inputs(data)
    for bi in range(loop.n_blocks):
        loop.quantize_block(bi)
    loop.quantize_outside_blocks()
    if method == "learned" and options.learn_e2e_steps:
        loop.tune_end_to_end()
    round_kept(model, recipe.keep_dtype)
    if kernels:
        if progress:
            progress("kernels", loop.n_blocks, loop.n_blocks)
        prepare_model(model)
    record = {"method": method, "options": asdict(options), "data": {"source": data.source, **data.stats},
              "device": str(loop.device), "seconds": round(time.perf_counter() - t0, 1),
              "rtn_fallbacks": loop.records["fallbacks"],
              **({"awq_ratios": loop.records["awq_ratios"]} if loop.records["awq_ratios"] else {}),
              **({"learned_blocks": loop.records["learned"]} if loop.records["learned"] else {}),
              **({"learned_e2e": loop.records["e2e"]} if "e2e" in loop.records else {})}
    return Calibrated(loop.plans, replace(recipe, algorithm=method), loop.imatrix, record)


class _BlockLoop:
    """The state shared by the three stages of the loop: capturing block 0's inputs, quantizing each
    block and re-running it to make the next block's inputs, and quantizing what lies outside the blocks."""

    def __init__(self, model, recipe, method, source, options, progress):
        self.model, self.method, self.source, self.options, self.progress = model, method, source, options, progress
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float32
        self.plans = plan_model(model, recipe)
        if not any(p.spec is not None for p in self.plans):
            raise LowbitError(f"recipe '{recipe.name}': its targets/ignore patterns select no Linear module of this model")
        self.by_name = {p.name: p for p in self.plans}
        self.prefix, self.layers = decoder_layers(model)
        self.n_blocks = len(self.layers)
        self.names = source.names() if source else []
        self.block_names = {n for n in self.names if n.startswith(self.prefix + ".")}
        # The loop runs the decoder only: read what it needs now, the head and the rest after the blocks.
        decoder_prefix = self.prefix.rpartition(".")[0] + "." if "." in self.prefix else ""
        self.early = [n for n in self.names if n not in self.block_names and n.startswith(decoder_prefix)]
        self.records = {"fallbacks": [], "awq_ratios": {}, "learned": {}}
        self.filled: set[int] = set()  # blocks whose weights were read from the source
        self.imatrix: dict[str, torch.Tensor] = {}
        self.maps = (mappings_for(getattr(model.config, "model_type", ""),
                                  "--method learned --learn-init awq" if method == "learned" else method)
                     if _searches_awq(method, options) or method == "smoothquant" else ())
        # plain RTN with weight-only activations needs no statistics: skip both passes
        self.forward = method != "rtn" or any(p.spec is not None and p.spec.activation == "int8_static" for p in self.plans)

    def capture_inputs(self, data: CalibData) -> None:
        """Block 0's inputs and the keyword arguments every block gets (masks, rotary tables), by
        running the model with each block replaced by a pass-through."""
        model, layers = self.model, self.layers
        _fill(model, self.source, self.early, self.dtype)
        store: dict = {}
        real = list(layers)
        for i in range(len(layers)):
            layers[i] = _PassThrough(i, store)
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        with torch.no_grad():
            for s in range(data.ids.shape[0]):
                base(input_ids=data.ids[s : s + 1], use_cache=False)
        for i, layer in enumerate(real):
            layers[i] = layer
        self.xs = [x.to(self.dtype) for x in store["inputs"]]  # samples x (1, seq, hidden), on the CPU
        # learned rounding: the float model's own inputs to each block as well, for its targets (see learned.py)
        self.xs_float = list(self.xs) if self.method == "learned" else None
        # the end-to-end stage starts again from block 0's inputs (the list's items are replaced, not changed)
        self.x0s = list(self.xs) if self.method == "learned" and self.options.learn_e2e_steps else None
        self.block_kwargs = store["kwargs"]
        if self.source is not None:  # the embedding table is not needed again until the end: back to disk meanwhile
            _offload(model, self.early)

    def stream_readers(self, bi: int) -> list[nn.Module]:
        """Float copies of the norms that next read block bi's output: the next block's input norm and its
        MLP-side norm on the stream (Gemma 3's pre_feedforward_layernorm, else post_attention_layernorm), or
        the decoder's final norm after the last block; their weights read from the checkpoint when
        streaming (the module may not hold its weight yet). Empty when no such norm is found."""
        if bi + 1 < self.n_blocks:
            layer = self.layers[bi + 1]
            second = "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"
            mods = [(f"{self.prefix}.{bi + 1}.{n}", getattr(layer, n, None)) for n in ("input_layernorm", second)]
        else:
            dec = self.prefix.rpartition(".")[0]
            parent = self.model.get_submodule(dec) if dec else self.model
            mods = [(f"{dec}.norm" if dec else "norm", getattr(parent, "norm", None))]
        readers = []
        for name, m in mods:
            w = getattr(m, "weight", None)
            if not isinstance(m, nn.Module) or not isinstance(w, torch.Tensor) or w.dim() != 1:
                continue
            if f"{name}.weight" in self.names:
                w = self.source.read(f"{name}.weight")
            probe = copy.deepcopy(m).float()
            probe.weight = nn.Parameter(w.detach().float().cpu(), requires_grad=False)
            readers.append(probe)
        return readers

    def stream_weight(self, bi: int) -> torch.Tensor | None:
        """Per channel, the mean squared gain of the norms that next read block bi's output (stream_readers).
        Each gain is probed, not read from the weight: (norm(x) - norm(-x)) / 2x for x of alternating signs,
        so Llama's w and Gemma's (1 + w) come out alike. None when no such norm is found (the loss is then
        "relative")."""
        gains = []
        for probe in self.stream_readers(bi):
            x = torch.ones(probe.weight.numel())
            x[1::2] = -1.0
            with torch.no_grad():
                g = (probe(x[None]) - probe(-x[None]))[0] / (2 * x)
            if torch.isfinite(g).all() and g.abs().max() > 0:
                gains.append(g.pow(2))
        return torch.stack(gains).mean(0) if gains else None

    def _fill_block(self, bi: int) -> None:
        if bi not in self.filled:
            self.filled.add(bi)
            _fill(self.model, self.source, sorted(n for n in self.block_names if n.startswith(f"{self.prefix}.{bi}.")), self.dtype)

    def block_ahead(self, bi: int) -> tuple | None:
        """The "lookahead" loss's next block (read from the source now when streaming: one more float block
        in memory while block bi learns), its keyword arguments and its reading norms; None after the last."""
        if bi + 1 >= self.n_blocks:
            return None
        self._fill_block(bi + 1)
        nxt = self.layers[bi + 1].to(self.device)
        return nxt, _to(self.block_kwargs[bi + 1], self.device), self.stream_readers(bi + 1)

    def quantize_block(self, bi: int) -> None:
        """Statistics, scale folding and quantization of block bi, then its quantized outputs as the next inputs."""
        layer, device, options, method, progress = self.layers[bi], self.device, self.options, self.method, self.progress
        by_name, xs, forward = self.by_name, self.xs, self.forward
        bprefix = f"{self.prefix}.{bi}."
        self._fill_block(bi)
        if progress:
            progress(f"block {bi}: statistics", bi, self.n_blocks)
        kwargs = _to(self.block_kwargs[bi], device)
        layer.to(device)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)
                   and by_name.get(bprefix + n) is not None and by_name[bprefix + n].spec is not None}
        for n, m in linears.items():
            check_finite(bprefix + n, m.weight.detach())
        keep = max(1, options.awq_tokens // len(xs)) if _searches_awq(method, options) else 0
        hessian = _needs_hessian(method, options)
        stats = _collect(layer, linears, xs if forward else [], kwargs, device, hessian, keep)
        with torch.no_grad():
            if self.maps:
                _fold_scales(layer, self.maps, linears, stats, by_name, bprefix, method, options, self.records)
            qlins = {}
            learned_qt: dict = {}
            if method == "learned":
                from lowbit.calib import learned

                if progress:
                    progress(f"block {bi}: learning the rounding ({options.learn_steps} steps)", bi, self.n_blocks)
                specs = {n: by_name[bprefix + n].spec for n in linears}
                init = {}
                if options.learn_init == "gptq":  # check_method has made sure every scheme is an integer one
                    init = {n: _gptq_or_none(bprefix + n, m, specs[n], stats[n], options, self.records,
                                             return_updated=True) for n, m in linears.items()}
                    init = {n: q for n, q in init.items() if q is not None}  # a failed Hessian: from RTN
                elif options.learn_init == "awq":  # the weights as AWQ scaled them, on its clipped ranges
                    init = {n: (_clipped(m.weight.detach(), specs[n], stats[n], options), m.weight.detach())
                            for n, m in linears.items()}
                with torch.enable_grad():
                    learned_qt, rec, self.xs_float = learned.learn_block(
                        layer, linears, specs, xs, kwargs, device,
                        learned.LearnOptions(options.learn_steps, options.learn_lr, options.learn_batch,
                                             loss=options.learn_loss,
                                             weight=self.stream_weight(bi) if options.learn_loss == "normed" else None,
                                             readers=self.stream_readers(bi) if options.learn_loss in ("postnorm", "lookahead") else None,
                                             ahead=self.block_ahead(bi) if options.learn_loss == "lookahead" else None),
                        xs_float=self.xs_float, init=init, init_name=options.learn_init)
                self.records["learned"][bi] = rec
                if not rec["kept"]:  # the starting point is kept: round to nearest where no GPTQ/AWQ start was made
                    self.records["fallbacks"] += [bprefix + n for n in linears
                                                  if n not in init and bprefix + n not in self.records["fallbacks"]]
                del init
            for n, m in linears.items():
                if progress:
                    progress(f"block {bi}: {n}", bi, self.n_blocks)
                spec = by_name[bprefix + n].spec
                last = not any(stats[o] is stats[n] for o in list(linears)[list(linears).index(n) + 1:])
                qlins[n] = _quantize_linear(bprefix + n, m, spec, stats[n], method, options, self.records, consume=last,
                                            given=learned_qt.get(n))
                if forward:
                    self.imatrix[bprefix + n] = stats[n].importance().cpu()
                if last:
                    stats[n].H, stats[n].factors = None, {}  # last reader of this Hessian: free it before the next, wider one
                    release_memory()
            del stats
            # The quantized block's outputs feed the next block. Weight-only layers run as float Linears
            # holding the dequantized weight (what QLinear's reference forward computes, without
            # unpacking the codes again for every sample); int8-activation layers run as themselves.
            for n, q in qlins.items():
                set_submodule(layer, n, q.to(device) if q.spec.activation != "none" else _dequantized_linear(q, device))
            for j, x in enumerate(xs if forward else []):
                xs[j] = _block_out(layer(x.to(device), **kwargs)).to("cpu", self.dtype)
            for n, q in qlins.items():
                set_submodule(layer, n, q)
        layer.to("cpu")
        release_memory()

    def quantize_outside_blocks(self) -> None:
        """The head (if planned), the final norm and the embedding again: whatever is planned outside
        the blocks is rounded to nearest, one tensor read at a time, the float head freed before the
        embedding is read back."""
        model, progress, n_blocks = self.model, self.progress, self.n_blocks
        if progress:
            progress("the head", n_blocks, n_blocks)
        tied = getattr(model.config, "tie_word_embeddings", False)
        rest = [n for n in self.names if n not in self.block_names and (n not in self.early or tied)]
        _fill(model, self.source, rest, self.dtype)
        if tied:
            model.tie_weights()
        for p in self.plans:
            if p.spec is not None and not p.name.startswith(self.prefix + "."):
                lin = model.get_submodule(p.name)
                check_finite(p.name, lin.weight.detach())
                set_submodule(model, p.name, _rows_in_chunks(lin, p.spec))
                del lin  # the float head: gone before the embedding is read back
                if getattr(model.config, "tie_word_embeddings", False):
                    share_embedding(model)  # a per-row head serves the embedding lookups, as quantize_model does
                    model.config.tie_word_embeddings = False
        if progress:
            progress("the embedding", n_blocks, n_blocks)
        _fill(model, self.source, [n for n in self.early if n not in rest], self.dtype)  # after the head's peak

    def tune_end_to_end(self) -> None:
        """After every block and the head: the group scales of the blocks' weight-only int Linears tuned
        against the float model's logits (e2e.py), on the same windows: block 0's inputs and the float
        stream's last hidden states, through the final norm and the head."""
        from lowbit.calib import e2e

        opts, progress = self.options, self.progress
        readers = self.stream_readers(self.n_blocks - 1)
        if not readers:
            self.records["e2e"] = {"steps": 0, "kept": False, "skipped": "no final norm found"}
            return
        say = (lambda msg: progress(msg, self.n_blocks, self.n_blocks)) if progress else None
        self.model.to(self.device)
        self.records["e2e"] = e2e.tune_scales(
            self.model, self.layers, readers[0].to(self.device), self.x0s, self.xs_float,
            [_to(self.block_kwargs[i], self.device) for i in range(self.n_blocks)], self.device, opts.learn_e2e_steps,
            lr=opts.learn_e2e_lr, batch=opts.learn_e2e_batch, say=say)
        self.model.to("cpu")
        self.x0s = None
        release_memory()


class _AllSeen(Exception):
    """Raised by the statistics hook once every Linear of the block has had this sample's input."""


def _collect(layer, linears, xs, kwargs, device, hessian: bool, keep: int) -> dict[str, LinearStats]:
    """Run the calibration inputs through the block, accumulating each Linear's input statistics.

    Linears that read the same tensor (q/k/v, gate/up) share one accumulator: it is found on the
    first sample by the identity of the input tensor and reused from then on. The pass stops as soon as
    the last Linear has seen its input (its own product and what follows are not needed here: the
    quantized block is run again afterwards), which saves the down projection of every sample."""
    stats: dict[str, LinearStats] = {}
    # (data_ptr, shape, stride) of this sample's inputs -> (first Linear that read it, the tensor). The
    # tensor is held so that its memory cannot be freed and reused by a later, different input of the
    # same shape during this sample: an address match then always means the very same tensor.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    alias: dict[str, str] = {}
    fired: set[str] = set()

    def hook(name, x):
        fired.add(name)
        if name not in alias:
            if name not in stats:
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                if key in seen and seen[key][0] != name:
                    alias[name] = seen[key][0]
                else:
                    seen[key] = (name, x)
                    stats[name] = LinearStats(x.shape[-1], hessian, keep, device)
            if name not in alias:
                stats[name].add(x)
        if len(fired) == len(linears):
            raise _AllSeen

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, args[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for x in xs:
                seen.clear()
                fired.clear()
                try:
                    layer(x.to(device), **kwargs)
                except _AllSeen:
                    pass
    finally:
        for h in hooks:
            h.remove()
    for n, m in linears.items():  # not reached (no samples): empty statistics
        if n not in stats and n not in alias:
            stats[n] = LinearStats(m.in_features, hessian, keep, device)
    return {n: stats[alias.get(n, n)] for n in linears}


def _offload(model: nn.Module, names: list[str]) -> None:
    """Put float tensors read from the checkpoint back on the meta device (they are read again later)."""

    params = dict(model.named_parameters())
    for n in names:
        t = params.get(n)
        if t is not None and t.is_floating_point() and t.numel() >= OFFLOAD_MIN:
            set_tensor(model, n, torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _rows_in_chunks(lin: nn.Linear, spec: QuantSpec, rows: int = 8192) -> QLinear:
    """QLinear.from_linear, a block of rows at a time where the format's rows are independent (integer
    and FP8 formats per channel or group), so a large head's temporaries stay a block's size. The
    result is the same as quantizing the whole matrix."""
    w = lin.weight.detach()
    if w.shape[0] <= rows or spec.kind not in ("int", "fp8_e4m3", "fp8_e5m2") or spec.granularity not in ("channel", "group"):
        return QLinear.from_linear(lin, spec)
    parts = [quantize_tensor(w[i:i + rows], spec).tensors for i in range(0, w.shape[0], rows)]
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    bias = None if lin.bias is None else lin.bias.detach()
    return QLinear(lin.in_features, lin.out_features, spec, tensors, bias)


def _dequantized_linear(q: QLinear, device) -> nn.Linear:
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(q.dequantized_weight(torch.float32).to(device), requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.detach().float().to(device), requires_grad=False)
    return lin


def _fold_scales(layer, maps, linears, stats, by_name, bprefix, method, options, records) -> None:
    """AWQ / SmoothQuant: pick a per-channel scale for each (prev -> layers) mapping and fold it in."""
    for mp in maps:
        if not all(n in linears for n in mp.layers):
            continue  # some of these layers are kept in high precision: leave their inputs alone
        try:
            prev = layer.get_submodule(mp.prev)
        except AttributeError:
            continue
        ws = [linears[n].weight.data for n in mp.layers]
        if isinstance(prev, nn.Linear) and any(prev.out_features != w.shape[1] for w in ws):
            continue  # grouped-query attention: v_proj outputs feed several o_proj inputs
        first = stats[mp.layers[0]]
        if _searches_awq(method, options):
            specs = [by_name[bprefix + n].spec for n in mp.layers]
            s, ratio, _ = awq.search_scales(first.sample().to(ws[0].device), ws, specs, options.grid)
            records["awq_ratios"][bprefix + mp.prev] = ratio
        else:
            s = smoothquant.smooth_scales(first.absmax, ws, options.alpha)
        s = s.to(ws[0].device)
        for n in mp.layers:
            linears[n].weight.data.mul_(s[None, :])
        for st in {id(stats[n]): stats[n] for n in mp.layers}.values():  # shared accumulators: once each
            st.rescale(s)
        if isinstance(prev, nn.Linear):
            prev.weight.data.div_(s[:, None])
            if prev.bias is not None:
                prev.bias.data.div_(s)
        else:
            prev.weight.data.copy_((prev.weight.data + mp.offset) / s - mp.offset)


def _gptq_or_none(name: str, m: nn.Linear, spec: QuantSpec, st: LinearStats, options: CalibOptions, records: dict,
                  consume: bool = False, return_updated: bool = False):
    """GPTQ's QTensor of m's weight (return_updated: and the weights it rounded), or None (recorded, with
    a warning) when its Hessian cannot be factorised."""
    try:
        return gptq.gptq_quantize(m.weight.detach(), st.H.full(), spec, options.block_size, options.damp,
                                  options.act_order, st.factors, consume, return_updated)
    except gptq.HessianError as e:
        warnings.warn(f"module {name}: GPTQ could not run ({e}); this layer fell back to round-to-nearest. "
                      f"Fix: raise the dampening (--damp, now {options.damp}), or calibrate on more and more "
                      f"varied samples (--samples, --calib)", stacklevel=2)
        records["fallbacks"].append(name)
        return None


def _clipped(w: torch.Tensor, spec: QuantSpec, st: LinearStats, options: CalibOptions, on_outputs: bool = True) -> QTensor:
    """w rounded to nearest on each group's range clipped by search: the range that minimises the error of
    the layer's outputs on the kept activation rows (on_outputs, AWQ's), or the importance-weighted
    weight error (rtn-mse)."""
    x = st.sample()[: options.clip_tokens].to(w.device) if on_outputs else None
    scale, zero = clip.clip_search(w, spec, importance=st.importance() if x is None else None, x=x, grid=options.grid)
    qt = int_qtensor(spec, affine.quantize(w, scale, zero, spec), scale.cpu(), None if zero is None else zero.cpu())
    qt.tensors["qdata"] = qt.tensors["qdata"].cpu()
    return qt


def _quantize_linear(name: str, m: nn.Linear, spec: QuantSpec, st: LinearStats, method: str,
                     options: CalibOptions, records: dict, consume: bool = False, given=None) -> QLinear:
    """consume: no later Linear reads st's Hessian, so GPTQ may factorise it in place. given: the
    QTensor a block-level method (learned rounding) already made."""
    w = m.weight.detach()
    qt = given
    if qt is not None:
        pass
    elif method in GPTQ_ROUNDING:
        qt = _gptq_or_none(name, m, spec, st, options, records, consume)
    elif method in ("rtn-mse", "awq") and spec.kind == "int":
        qt = _clipped(w, spec, st, options, on_outputs=method == "awq")
    if qt is None:
        qt = quantize_tensor(w.cpu(), spec)
    tensors = dict(qt.tensors)
    if spec.activation == "int8_static":
        amax = st.absmax.max().clamp(min=1e-8)
        tensors["input_scale"] = (amax / 127).float().cpu().reshape(())
    bias = None if m.bias is None else m.bias.detach().cpu()
    return QLinear(m.in_features, m.out_features, spec, tensors, bias)
