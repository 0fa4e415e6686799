"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time and push each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, H = 2/n * sum x x^T over the calibration tokens.

Three functions: accumulate H, factorise it, run the column loop. Orchestration (which layers, which
inputs) lives in sequential.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lowbit.formats import affine
from lowbit.formats.qtensor import QTensor, int_qtensor
from lowbit.formats.spec import QuantSpec


class HessianError(ValueError):
    """The damped Hessian is not positive definite: GPTQ cannot run on this layer."""


SYM_BLOCK = 256  # Hessians at least twice this wide accumulate only their upper block triangle


@dataclass
class Hessian:
    """Running H = 2/n * sum_t x_t x_t^T for one Linear's inputs.

    H is symmetric, so for wide inputs only the column blocks on and above the diagonal are
    accumulated (x_i^T x_j for i <= j): 58% of the products for a 1536-wide input in 6 blocks, 75%
    for 576 in 2. `full()` mirrors the upper blocks down before H is read."""
    H: torch.Tensor  # (in, in) float32; below-diagonal blocks are stale until full()
    n: int = 0
    cuts: tuple[int, ...] = ()  # column block edges, (0, ..., in)
    mirrored: bool = True

    @classmethod
    def empty(cls, in_features: int, device: torch.device | str = "cpu") -> "Hessian":
        k = max(1, in_features // SYM_BLOCK)
        cuts = tuple(in_features * i // k for i in range(k + 1))
        return cls(torch.zeros(in_features, in_features, device=device), cuts=cuts)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        t = x.shape[0]
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        edges = list(zip(self.cuts[:-1], self.cuts[1:]))
        if len(edges) <= 1:
            self.H.addmm_(x.t(), x)
            return
        for i, (a, b) in enumerate(edges):
            xa = x[:, a:b].t()
            for c, d in edges[i:]:
                self.H[a:b, c:d].addmm_(xa, x[:, c:d])
        self.mirrored = False

    def full(self) -> torch.Tensor:
        """H with every block filled in (the lower blocks copied from the upper ones)."""
        if not self.mirrored:
            edges = list(zip(self.cuts[:-1], self.cuts[1:]))
            for i, (a, b) in enumerate(edges):
                for c, d in edges[i + 1:]:
                    self.H[c:d, a:b] = self.H[a:b, c:d].t()
            self.mirrored = True
        return self.H


ROWS = 256  # rows per step when a matrix is reordered in place


def _reverse_rows_cols_(m: torch.Tensor) -> torch.Tensor:
    """m[i, j] <- m[n-1-i, n-1-j], in place, a block of rows at a time (no (n, n) temporary)."""
    n = m.shape[0]
    for i in range(0, n // 2, ROWS):
        k = min(ROWS, n // 2 - i)
        top, bottom = m[i:i + k], m[n - i - k:n - i]
        tmp = top.clone()
        top.copy_(bottom.flip(0, 1))
        bottom.copy_(tmp.flip(0, 1))
    if n % 2:
        m[n // 2] = m[n // 2].flip(0)
    return m


def inverse_cholesky(H: torch.Tensor, damp: float, order: torch.Tensor | None = None,
                     consume: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U is that inverse), with the
    inputs taken in `order` when given (act-order). Inputs whose diagonal is 0 (never active) get a
    diagonal of 1. Raises HessianError. H is left as it was, unless consume: then U is written over
    H's storage (the caller gives H up), which saves an (in, in) copy.

    With J the reversal of the inputs and J H J = L L^T (lower Cholesky), H^-1 = U^T U for
    U = J L^-1 J, which is upper triangular. So one Cholesky and one triangular solve give U, where
    inverting H and factorising the inverse took two of each (about half the arithmetic). Both run in
    place, so at most two (in, in) matrices are alive with consume (127 MB each for a 5632-wide
    down projection), three without."""
    n = H.shape[0]
    if order is None:
        W = _reverse_rows_cols_(H) if consume else H.flip(0, 1)
    else:
        rev = order.flip(0)
        W = torch.empty_like(H)
        for i in range(0, n, ROWS):
            W[i:i + ROWS] = H.index_select(0, rev[i:i + ROWS]).index_select(1, rev)
        if consume:
            W = H.copy_(W)
    d = torch.arange(n, device=W.device)
    diag = W[d, d]
    diag = torch.where(diag == 0, torch.ones_like(diag), diag)
    W[d, d] = diag + damp * torch.mean(diag)
    in_place = W.device.type == "cpu"  # out= aliasing an input is what was tested, on the CPU
    if in_place:
        info = torch.empty((), dtype=torch.int32, device=W.device)
        torch.linalg.cholesky_ex(W, out=(W, info))  # W becomes L, lower triangular
    else:
        L, info = torch.linalg.cholesky_ex(W)
        W.copy_(L)
        del L
    if info.item() != 0 or not torch.isfinite(W).all():
        raise HessianError(f"the damped Hessian is not positive definite (Cholesky failed at input {n - info.item()} "
                           f"of {n}, counted in the order GPTQ takes them)")
    Linv = torch.eye(n, device=W.device, dtype=W.dtype)
    if in_place:
        torch.linalg.solve_triangular(W, Linv, upper=False, out=Linv)
    else:
        Linv = torch.linalg.solve_triangular(W, Linv, upper=False)
    for i in range(0, n, ROWS):  # U = J Linv J, written over L
        k = min(ROWS, n - i)
        W[i:i + k] = Linv[n - i - k:n - i].flip(0, 1)
    del Linv
    if not torch.isfinite(W).all():
        raise HessianError("the inverse Hessian is not finite")
    return W


def _column_spec(spec: QuantSpec) -> QuantSpec:
    """The spec one column is rounded with: one scale per row (affine.quantize on a (rows, 1) slice)."""
    return replace(spec, granularity="channel", group_size=None)


def factorise(H: torch.Tensor, damp: float, act_order: bool, device=None, consume: bool = False):
    """(perm or None, dead inputs, upper Cholesky factor of the damped inverse) of one Hessian.
    Linears reading the same input (q/k/v, gate/up) share H, so callers may reuse the result.
    consume: H is not needed afterwards and its storage may hold the factor."""
    H = H.to(device or H.device)
    if H.dtype != torch.float32:
        H, consume = H.float(), True  # already a copy
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    diag = torch.diag(H) if perm is None else torch.diag(H)[perm]
    dead = diag == 0  # inputs never active: any value works, zero them
    return perm, dead, inverse_cholesky(H, damp, perm, consume)  # (in, in), raises HessianError


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, factors: dict | None = None, consume: bool = False,
                  return_updated: bool = False) -> QTensor | tuple[QTensor, torch.Tensor]:
    """GPTQ-quantize w (out, in) against Hessian H (in, in); returns an int QTensor.

    act_order: quantize columns in order of decreasing diag(H) (most important first). With group-wise
    scales the stored columns stay in that order and the QTensor carries `perm`, so groups are
    contiguous in storage and the runtime needs one input gather, not a per-column group index.
    factors: a dict kept with H by the caller; the factorisation is computed once into it and reused
    by every Linear quantized against the same H.
    consume: this is H's last use; its storage is reused for the factorisation (H is overwritten).
    return_updated: also return the weights as GPTQ rounded them, each column with the error of the
    columns before it spread in ((out, in) float, stored column order): rounding them to nearest on the
    returned scales gives the returned codes (learned rounding starts from them).
    """
    if spec.kind != "int":
        raise ValueError(f"GPTQ needs an integer format, got {spec.kind}")
    W = w.detach().float().clone()  # (out, in)
    rows, cols = W.shape
    key = (damp, act_order)
    if factors is not None and key in factors:
        perm, dead, U = factors[key]
    else:
        perm, dead, U = factorise(H, damp, act_order, W.device, consume)
        if factors is not None:
            factors[key] = (perm, dead, U)
    if perm is not None:
        W = W[:, perm]
    W[:, dead] = 0
    cspec = _column_spec(spec)
    group = spec.group_size if spec.granularity == "group" else None
    if group is None:  # one set of qparams for the whole row (or tensor), from the original weights
        scale, zero = affine.choose_qparams(W, spec)  # (rows or 1, 1)
        col_scale = scale.expand(rows, 1) if scale.shape[0] == 1 else scale
        col_zero = None if zero is None else (zero.expand(rows, 1) if zero.shape[0] == 1 else zero)
        scales, zeros = [scale], [zero]
    else:
        scales, zeros = [], []
    Q = torch.zeros(rows, cols, dtype=torch.int16, device=W.device)  # codes, stored column order
    seen = torch.empty(rows, cols, dtype=torch.float32, device=W.device) if return_updated else None
    threads = torch.get_num_threads()
    if W.device.type == "cpu":  # thousands of small ops: extra threads cost more than they give
        torch.set_num_threads(1)
    try:
        _column_loop(W, U, Q, cspec, group, block_size, scales, zeros, col_scale if group is None else None,
                     col_zero if group is None else None, seen)
    finally:
        torch.set_num_threads(threads)
    q_dtype = torch.int8 if spec.symmetric else torch.uint8
    scale = torch.cat(scales, dim=1)  # (out, n_groups) or (rows, 1)
    zero = None if zeros[0] is None else torch.cat(zeros, dim=1)
    codes = Q.to(q_dtype).cpu()
    if perm is not None and group is None:  # one scale per row: undo the order, no perm needed at run time
        inv = torch.argsort(perm)
        codes, perm = codes[:, inv], None
        if seen is not None:
            seen = seen[:, inv]
    qt = int_qtensor(spec, codes, scale.cpu(), None if zero is None else zero.cpu(),
                     None if perm is None else perm.cpu())
    return (qt, seen.cpu()) if return_updated else qt


def _column_loop(W, U, Q, cspec, group, block_size, scales, zeros, col_scale, col_zero, seen=None) -> None:
    """Quantize W's columns in place order into Q, spreading each column's error over the later ones.

    Each column is rounded by affine's round_to_grid / grid_values, the rule affine.quantize /
    affine.dequantize apply, called directly on (out,) vectors with the group's parameters converted
    to float once: a few ops per column instead of a few dozen (this loop runs once per input column
    of every layer). seen: if given, receives each column as it was rounded (after the updates)."""
    rows, cols = W.shape
    qmin, qmax = affine.qrange(cspec.bits, cspec.symmetric)
    params = None if col_scale is None else _column_params(col_scale, col_zero)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (out, bs) columns being quantized, updated in place
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):
            c = i1 + i
            if group is not None and c % group == 0:  # a new group: qparams from its current (updated) columns
                left = i2 - c  # columns of this group still in the block; the rest come after it
                span = W1[:, i:i + group] if left >= group else torch.cat([W1[:, i:], W[:, i2:i2 + group - left]], dim=1)
                col_scale, col_zero = affine.choose_qparams(span, cspec)  # (out, 1)
                scales.append(col_scale)
                zeros.append(col_zero)
                params = _column_params(col_scale, col_zero)
            s, z, m = params
            col = W1[:, i]  # (out,)
            if seen is not None:
                seen[:, c] = col
            q = affine.round_to_grid(col, s, qmin, qmax, zero=z, offset=m)  # float codes
            dq = affine.grid_values(q, s, zero=z, offset=m)
            Q[:, c] = q
            err = (col - dq) / d[i]  # (out,)
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy update of the columns after this block


def _column_params(scale, zero):
    """(scale, int zero point or None, float offset or None) of one group as float (out,) vectors."""
    s = scale.float()[:, 0]
    if zero is None:
        return s, None, None
    if zero.is_floating_point():
        return s, None, zero.float()[:, 0]
    return s, zero.float()[:, 0], None
