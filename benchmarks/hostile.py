"""Hostile and broken inputs through the CLI, each in a fresh process with a time and memory limit.

Every case builds its own input (a tiny random model, an artifact of it, edited or damaged files,
a local HTTP server counting requests, foreign files whose access time shows a read) and runs one
`lowbit` command. Outcomes:

    clean error   exit code 2, no traceback (the case expects a refusal)
    handled       exit code 0 and the case's own check passes (it expects safe success)
    traceback     a Python traceback was printed
    hang          still running at the time limit
    accepted-bad  exit 0 where a refusal was expected, or the safe-success check failed
    crash         any other exit code (killed for memory, a signal)

Writes the "Hostile inputs" section of docs/BENCHMARKS.md.

    python benchmarks/hostile.py [--only CATEGORY] [--timeout 60] [--mem-gb 6]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from presets import write_section  # noqa: E402


@dataclass
class Case:
    category: str
    name: str
    argv: list[str]
    expect: str = "refuse"  # or "succeed": exit 0 and check() is True
    check: object = None
    stdin: str = "y\ny\n"  # a "yes" to any prompt


class Bench:
    def __init__(self, root: Path):
        import lowbit
        from tests.conftest import make_tiny_llama, save_hf

        self.root = root
        self.model = save_hf(make_tiny_llama(), root / "model")
        self.art = lowbit.save(lowbit.quantize(lowbit.load(self.model), "w4-g32"), root / "art")
        self.n = 0

    def fresh(self, what: str) -> Path:
        self.n += 1
        src = {"model": self.model, "art": self.art}[what]
        return Path(shutil.copytree(src, self.root / f"{what}-{self.n}"))

    def out(self) -> Path:
        self.n += 1
        return self.root / f"out-{self.n}"

    def file(self, name: str, data: bytes | str) -> Path:
        self.n += 1
        p = self.root / f"{self.n}-{name}"
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def fifo(self) -> Path:
        self.n += 1
        p = self.root / f"pipe-{self.n}.gguf"
        os.mkfifo(p)
        return p


def edit_json(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def rewrite_weights(folder: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    change(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def cases(b: Bench, server_url: str, hits: list) -> list[Case]:
    import torch

    c: list[Case] = []
    q = ["quantize", "--recipe", "int8", "--model"]
    key = "model.layers.1.mlp.up_proj.weight"

    # remote code
    for cfg in ("config.json", "tokenizer_config.json"):
        m = b.fresh("model")
        marker = b.root / f"ran-{b.n}"
        (m / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import LlamaForCausalLM as X\n")
        edit_json(m / cfg, lambda d: d.update(auto_map={"AutoModelForCausalLM": "modeling_x.X"}))
        c.append(Case("remote code", f"auto_map in {cfg}: quantize", [*q, str(m), "--out", str(b.out())]))
        c.append(Case("remote code", f"auto_map in {cfg}: generate", ["generate", str(m), "--prompt", "hi"]))
    a = b.fresh("art")
    edit_json(a / "config.json", lambda d: d.update(auto_map={"AutoModelForCausalLM": "modeling_x.X"}))
    c.append(Case("remote code", "auto_map in an artifact", ["generate", str(a), "--prompt", "hi"]))

    # missing or foreign weights
    edits = {"a tensor missing": lambda sd: sd.pop(key), "an extra tensor": lambda sd: sd.update({"x.weight": sd[key].clone()}),
             "a wrong shape": lambda sd: sd.update({key: sd[key][:, :32].contiguous()}),
             "an int tensor": lambda sd: sd.update({key: sd[key].to(torch.int8)})}
    for what, change in edits.items():
        m = rewrite_weights(b.fresh("model"), change)
        c.append(Case("weights", f"{what}: quantize", [*q, str(m), "--out", str(b.out())]))
        c.append(Case("weights", f"{what}: gptq", ["quantize", "--model", str(m), "--recipe", "w4-g32", "--method",
                                                    "gptq", "--calib", "wikipedia", "--samples", "1", "--seq-len", "16",
                                                    "--out", str(b.out())]))
    a = b.fresh("art")
    (a / "lowbit.json").unlink()
    c.append(Case("weights", "artifact without lowbit.json: export", ["export", str(a), "--format", "gguf", "--out",
                                                                      str(b.out()) + ".gguf"]))
    m = b.fresh("model")
    (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000])
    c.append(Case("weights", "truncated safetensors", [*q, str(m), "--out", str(b.out())]))
    m = b.fresh("model")
    head = b"[1, 2, 3]"
    (m / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head)
    c.append(Case("weights", "safetensors header is a JSON list", [*q, str(m), "--out", str(b.out())]))

    m = b.fresh("model")
    rewrite_weights(m, lambda sd: sd.clear() or sd.update({"x": torch.zeros(1)}))
    c.append(Case("weights", "weights of another model entirely", [*q, str(m), "--out", str(b.out())]))
    m = b.fresh("model")
    (m / "config.json").write_text("{model_type: llama")
    c.append(Case("weights", "config.json not JSON", [*q, str(m), "--out", str(b.out())]))
    m = b.fresh("model")
    edit_json(m / "config.json", lambda d: d.pop("model_type"))
    c.append(Case("weights", "config.json without model_type", [*q, str(m), "--out", str(b.out())]))
    m = b.fresh("model")
    edit_json(m / "config.json", lambda d: d.update(num_hidden_layers=3))
    c.append(Case("weights", "config.json with one layer more than the weights", [*q, str(m), "--out", str(b.out())]))
    m = b.fresh("model")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    c.append(Case("weights", "pickled weights only (.bin)", [*q, str(m), "--out", str(b.out())]))

    # the artifact record
    up = "model.layers.0.mlp.up_proj"
    records = {"spec bits changed": lambda d: d["modules"][up]["spec"].update(bits=8),
               "format_version as text": lambda d: d.update(format_version="1"),
               "format_version from the future": lambda d: d.update(format_version=7),
               "negative in_features": lambda d: d["modules"]["lm_head"].update(in_features=-1),
               "modules is a list": lambda d: d.update(modules=[1, 2]),
               "weights hash changed": lambda d: d["files"].update({"model.safetensors": "0" * 64})}
    for what, change in records.items():
        a = b.fresh("art")
        edit_json(a / "lowbit.json", change)
        c.append(Case("artifact record", f"{what}: generate", ["generate", str(a), "--prompt", "hi"]))
        c.append(Case("artifact record", f"{what}: info", ["info", str(a)]))
    a = b.fresh("art")
    (a / "tokenizer.json").unlink()
    c.append(Case("artifact record", "tokenizer missing", ["generate", str(a), "--prompt", "hi"]))
    a = b.fresh("art")
    edit_json(a / "lowbit.json", lambda d: d["recipe"].update(kv_cache="int3"))
    c.append(Case("artifact record", "recipe kv_cache unknown", ["generate", str(a), "--prompt", "hi"]))
    a = b.fresh("art")
    edit_json(a / "lowbit.json", lambda d: d["modules"].update({"model.layers.7.mlp.up_proj": d["modules"][up]}))
    c.append(Case("artifact record", "a module the model does not have", ["generate", str(a), "--prompt", "hi"]))
    a = b.fresh("art")
    (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:-100])
    c.append(Case("artifact record", "weights truncated", ["info", str(a)]))
    a = b.fresh("art")
    (a / "lowbit.json").write_text("{not json")
    c.append(Case("artifact record", "lowbit.json not JSON", ["info", str(a)]))
    a, other = b.fresh("art"), b.fresh("art")
    rewrite_weights(other, lambda sd: sd.update({f"{up}.scale": sd[f"{up}.scale"] * 2}))
    shutil.copy(other / "model.safetensors", a / "model.safetensors")
    c.append(Case("artifact record", "weights swapped for edited ones", ["generate", str(a), "--prompt", "hi"]))

    # reads outside the artifact: a foreign file whose access time would move if it were read
    def foreign() -> Path:
        p = b.file("foreign.gguf", b"GGUF" + b"\0" * 60)
        os.utime(p, (946684800, time.time()))  # atime 2000-01-01, before mtime: a read updates it (relatime)
        return p

    def untouched(p: Path) -> bool:
        return int(p.stat().st_atime) == 946684800

    for what, src in (("source.path is a foreign file", lambda f: {"name": "x", "kind": "gguf", "path": str(f)}),
                      ("bundled source name with ../", lambda f: {"name": "../" * 8 + str(f), "kind": "bundled"})):
        a, f, o = b.fresh("art"), foreign(), b.out()
        edit_json(a / "lowbit.json", lambda d, f=f, src=src: d.update(source=src(f)))
        c.append(Case("reads outside", f"{what}: export", ["export", str(a), "--format", "gguf", "--out", f"{o}.gguf"],
                      expect="succeed", check=lambda o=o, f=f: Path(f"{o}.gguf").is_file() and untouched(f)))

    # user suites reaching out
    for name, ref in (("$ref over http", f"{server_url}/schema.json"), ("$ref to a file", f"file://{b.fifo()}")):
        suite = b.file("suite.jsonl", json.dumps({"id": "a", "prompt": "Say hi", "check": {
            "type": "json_schema", "value": {"$ref": ref}}}) + "\n")
        c.append(Case("suite refs", name, ["eval", str(b.model), str(b.art), "--suites", f"user:{suite}", "--quick",
                                           "--no-report"]))

    # sizes and denial of service
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    c.append(Case("size limits", "YAML aliases (billion laughs) as a recipe",
                  [*q[:-3], "--recipe", str(b.file("r.yaml", laughs)), "--model", str(b.model), "--out", str(b.out())]))
    if Path("/dev/zero").exists():
        c.append(Case("size limits", "--recipe /dev/zero", ["quantize", "--model", str(b.model), "--recipe",
                                                            "/dev/zero", "--out", str(b.out())]))
    big = b.root / "big.jsonl"
    with open(big, "wb") as f:
        line = (json.dumps({"id": "x", "prompt": "p" * 1000, "check": {"type": "contains", "value": "a"}}) + "\n").encode()
        f.write(line * (50_000_000 // len(line)))
    c.append(Case("size limits", "50 MB user suite", ["eval", str(b.model), str(b.art), "--suites", f"user:{big}",
                                                     "--quick", "--no-report"]))
    c.append(Case("size limits", "-n 100000", ["generate", str(b.art), "--prompt", "hi", "-n", "100000"]))
    c.append(Case("size limits", "prompt longer than the context", ["generate", str(b.art), "--prompt", "word " * 2000]))
    spec = b.file("spec.yaml", "eval: {samples: -3}\nquality: {max_mean_kld: 0.1}\n")
    c.append(Case("size limits", "gate eval.samples -3", ["gate", str(spec), str(b.model), str(b.art), "--quick",
                                                         "--no-report"]))

    c.append(Case("size limits", "-n 0", ["generate", str(b.art), "--prompt", "hi", "-n", "0"]))
    c.append(Case("size limits", "empty prompt", ["generate", str(b.art), "--prompt", "   "]))
    calib = b.root / "calib.txt"
    with open(calib, "wb") as f:
        f.write(b"the quick brown fox jumps over the lazy dog. " * (20_000_000 // 45))
    c.append(Case("size limits", "20 MB calibration file", ["quantize", "--model", str(b.model), "--recipe", "w4-g32",
                                                            "--method", "gptq", "--calib", str(calib), "--samples", "1",
                                                            "--seq-len", "16", "--out", str(b.out())]))

    # validation gaps
    recipe = {"version": 1, "name": "r", "scheme": {"kind": "int", "bits": 4, "granularity": "group", "group_size": 32}}
    for what, change in (("bits 9", {"bits": 9}), ("group_size 0", {"group_size": 0}),
                         ("granularity 'row'", {"granularity": "row"}), ("bits 4.0", {"bits": 4.0})):
        r = b.file("r.json", json.dumps({**recipe, "scheme": {**recipe["scheme"], **change}}))
        c.append(Case("validation", f"recipe {what}", ["quantize", "--model", str(b.model), "--recipe", str(r),
                                                       "--out", str(b.out())]))
    r = b.file("r.json", json.dumps({**recipe, "kv_cache": "int3"}))
    c.append(Case("validation", "recipe kv_cache int3", ["quantize", "--model", str(b.model), "--recipe", str(r),
                                                         "--out", str(b.out())]))
    c.append(Case("validation", "gate spec unknown field", ["gate", str(b.file("s.yaml", "quality: {max_kld: 1}\n")),
                                                            str(b.model), str(b.art), "--quick", "--no-report"]))
    c.append(Case("validation", "LOWBIT_ISA=sse9", ["info", str(b.art)]))
    c[-1].env = {"LOWBIT_ISA": "sse9"}
    c.append(Case("validation", "symmetric: 'false' (text)",
                  [*q[:-3], "--recipe", str(b.file("r.json", json.dumps({"version": 1, "name": "r", "scheme": {
                      "kind": "int", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": "false"}}))),
                   "--model", str(b.model), "--out", str(b.out())]))
    c.append(Case("validation", "min_top1_agreement: -5", ["gate", str(b.file("s.yaml", "quality: "
                                                                              "{min_top1_agreement: -5}\n")),
                                                           str(b.model), str(b.art), "--quick", "--no-report"]))
    c.append(Case("validation", "eval.seq_len: 0.5", ["gate", str(b.file("s.yaml", "eval: {seq_len: 0.5}\n"
                                                                          "quality: {max_mean_kld: 0.1}\n")),
                                                      str(b.model), str(b.art), "--quick", "--no-report"]))
    c.append(Case("validation", "recipe not UTF-8", [*q[:-3], "--recipe", str(b.file("r.yaml", b"name: \xff\xfe\n")),
                                                     "--model", str(b.model), "--out", str(b.out())]))
    m = b.fresh("model")
    (m / "lowbit-source.json").write_text("{nope")
    c.append(Case("validation", "source marker not JSON", [*q, str(m), "--out", str(b.out())]))

    # output safety
    m = b.fresh("model")
    c.append(Case("output", "--out inside the input model", [*q, str(m), "--out", str(m / "sub")]))
    g = b.file("x.gguf", b"old")
    c.append(Case("output", "existing GGUF without --force", ["export", str(b.art), "--format", "gguf", "--out", str(g)]))
    c.append(Case("output", "--out under /proc", [*q, str(b.model), "--out", "/proc/lowbit-out"]))
    m = b.fresh("model")
    c.append(Case("output", "--out is the input model, --force", [*q, str(m), "--out", str(m), "--force"]))
    target = b.root / "link-target"
    target.mkdir()
    link = b.out()
    link.symlink_to(target)
    c.append(Case("output", "--out is a symlink", [*q, str(b.model), "--out", str(link), "--force"]))
    c.append(Case("output", "--out .", [*q, str(b.model), "--out", "."]))
    from lowbit.model.artifact import _host_marker  # a temporary named as a killed lowbit run names it

    dead = subprocess.Popen(["true"])
    dead.wait()
    o = b.out()
    stale = o.parent / f".{o.name}.tmp-{dead.pid}-{_host_marker()}-1-deadbeef"
    c.append(Case("output", "a dead writer's temporary is cleaned", [*q, str(b.model), "--out", str(o)],
                  expect="succeed", check=lambda s=stale, o=o: o.is_dir() and not s.exists()))
    c[-1].setup = lambda s=stale: (s.mkdir(), (s / "model.safetensors").write_bytes(b"\0" * 1000))
    return c


def run_case(case: Case, timeout: float, mem_gb: float, cwd: Path) -> tuple[str, float, str]:
    if getattr(case, "setup", None):
        case.setup()
    limit = int(mem_gb * (1 << 30))

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), **getattr(case, "env", {})}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "lowbit.cli", *case.argv], input=case.stdin, capture_output=True,
                           text=True, timeout=timeout, preexec_fn=cap, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return "hang", time.perf_counter() - t0, ""
    secs = time.perf_counter() - t0
    text = p.stdout + p.stderr
    if "Traceback" in text:
        return "traceback", secs, text[-400:]
    if case.expect == "succeed":
        ok = p.returncode == 0 and case.check()
        return ("handled" if ok else "accepted-bad"), secs, text[-400:]
    if p.returncode == 2:
        return "clean error", secs, text.strip().splitlines()[0][:160] if text.strip() else ""
    if p.returncode == 0:
        return "accepted-bad", secs, text[-200:]
    return "crash", secs, text[-400:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run one category")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--mem-gb", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import platform

    from lowbit.native import cpu_name

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            body = b'{"type": "object"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        work = root / "cwd"
        work.mkdir()
        b = Bench(root)
        for case in cases(b, f"http://127.0.0.1:{server.server_port}", hits):
            if args.only and case.category != args.only:
                continue
            n_hits = len(hits)
            outcome, secs, detail = run_case(case, args.timeout, args.mem_gb, work)
            if len(hits) > n_hits and outcome == "clean error":
                outcome = "accepted-bad"  # refused, but only after fetching over the network
            rows.append({"category": case.category, "case": case.name, "outcome": outcome, "seconds": secs,
                         "detail": detail})
            print(json.dumps(rows[-1]), flush=True)
    server.shutdown()
    kinds = ["clean error", "handled", "traceback", "hang", "accepted-bad", "crash"]
    cats = list(dict.fromkeys(r["category"] for r in rows))
    lines = ["## Hostile inputs", "",
             f"`benchmarks/hostile.py`: {len(rows)} hostile or broken inputs through the CLI, each in a fresh process "
             f"limited to {args.timeout:.0f} s and {args.mem_gb:g} GB of address space, on {cpu_name()} "
             f"({platform.machine()}, {os.cpu_count()} CPUs). \"clean error\": exit 2 with one paragraph; \"handled\": the command "
             f"succeeded without touching what it must not (a foreign file's access time shows whether it was "
             f"read; a temporary of a killed run is gone).", "",
             "| category | cases | " + " | ".join(kinds) + " | slowest (s) |",
             "|---|---|" + "---|" * len(kinds) + "---|"]
    for cat in cats:
        rs = [r for r in rows if r["category"] == cat]
        lines.append(f"| {cat} | {len(rs)} | " + " | ".join(str(sum(r['outcome'] == k for r in rs)) for k in kinds)
                     + f" | {max(r['seconds'] for r in rs):.1f} |")
    lines.append(f"| all | {len(rows)} | " + " | ".join(str(sum(r['outcome'] == k for r in rows)) for k in kinds)
                 + f" | {max(r['seconds'] for r in rows):.1f} |")
    bad = [r for r in rows if r["outcome"] not in ("clean error", "handled")]
    if bad:
        lines += ["", "Cases not handled: " + "; ".join(f"{r['category']}: {r['case']} ({r['outcome']})" for r in bad)]
    if not args.only:
        write_section(args.out, "hostile", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
