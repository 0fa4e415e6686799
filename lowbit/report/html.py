"""A self-contained HTML report of a run: inline CSS, plots as base64 PNG, no scripts, no external files.

The tables come from markdown.sections(), so report.html and report.md say the same thing; the page
adds a verdict banner and four plots (per-token KLD, per-suite change, quality vs size, latency).
Any section or plot whose data is absent from the run is left out. All run text goes through
html.escape, since sample texts and model outputs are arbitrary strings.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import tempfile
import uuid
from html import escape
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.report.markdown import Section, Table, fmt, is_num, rel_change, render_markdown, sections, title, verdict

BASE_COLOR, CAND_COLOR = "#4c78a8", "#f58518"
GOOD_COLOR, BAD_COLOR, NEUTRAL_COLOR = "#1a7f37", "#cf222e", "#8c959f"
CHROMIUM = "/usr/bin/chromium"

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--border:#d1d9e0;--bg:#f6f8fa;--good:#1a7f37;--good-bg:#dafbe1;
--bad:#cf222e;--bad-bg:#ffebe9;--base:#4c78a8;--cand:#f58518}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI","Noto Sans",Helvetica,Arial,sans-serif}
main{max-width:1160px;margin:0 auto;padding:24px 24px 48px}
header{margin-bottom:16px}
h1{font-size:22px;margin:0 0 6px;font-weight:600}
h2{font-size:16px;margin:0 0 12px;padding-bottom:8px;border-bottom:1px solid var(--border);font-weight:600}
h3{font-size:13px;margin:18px 0 8px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.04em}
.vs{display:flex;gap:12px;flex-wrap:wrap;align-items:center;color:var(--muted)}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-weight:600;color:#fff;font-size:13px}
.pill.base{background:var(--base)}.pill.cand{background:var(--cand)}
.meta{color:var(--muted);font-size:12px;margin-top:6px}
section{background:#fff;border:1px solid var(--border);border-radius:8px;padding:16px 20px;margin:16px 0}
.banner{border-radius:8px;padding:14px 20px;margin:16px 0;font-size:18px;font-weight:700;border:1px solid}
.banner.pass{background:var(--good-bg);color:var(--good);border-color:#4ac26b}
.banner.fail{background:var(--bad-bg);color:var(--bad);border-color:#ff8182}
.banner small{display:block;font-size:12px;font-weight:400;color:var(--muted)}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;border-bottom:1px solid var(--border);text-align:left;vertical-align:top}
th{background:var(--bg);color:var(--muted);font-size:12px;font-weight:600}
tr:last-child td{border-bottom:none}
.r{text-align:right}.c{text-align:center}
td.good{color:var(--good);font-weight:600}td.bad{color:var(--bad);font-weight:600}
td.text{max-width:420px;overflow-wrap:anywhere;font-size:13px}
.note{color:var(--muted);font-size:12px;margin:6px 0 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{border:1px solid var(--border);border-radius:6px;padding:10px 12px}
.card .label{color:var(--muted);font-size:12px}
.card .value{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.card .sub{font-size:12px;font-weight:600}.card .sub.good{color:var(--good)}.card .sub.bad{color:var(--bad)}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px;margin-top:16px}
figure{margin:0}figure.wide{grid-column:1/-1}
figure img{width:100%;height:auto;border:1px solid var(--border);border-radius:6px;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:4px}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:24px}
"""


# ---- plots ------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.4, ncols: int = 1):
    # A bare Figure on an Agg canvas: no pyplot global state, no display needed, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    for ax in axes if ncols > 1 else [axes]:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, color="#e6e8eb", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=8)
    return fig, axes


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_kld_hist(div: dict) -> str | None:
    hist = div.get("kld_hist") or {}
    edges, counts = list(hist.get("edges") or []), list(hist.get("counts") or [])
    if not counts or len(edges) != len(counts) + 1:
        return None
    if edges[0] <= 0 < edges[1]:  # a first bin starting at 0 cannot sit on a log axis; start it a decade lower
        edges[0] = edges[1] / 10
    if edges[0] <= 0:
        return None
    fig, ax = _figure()
    ax.stairs(counts, edges, fill=True, color=CAND_COLOR, alpha=0.35)
    ax.stairs(counts, edges, color=CAND_COLOR, linewidth=1.2)
    ax.set_xscale("log")
    for key, style, label in (("mean_kld", "-", "mean"), ("p99_kld", "--", "p99")):
        if is_num(div.get(key)) and div[key] > 0:
            ax.axvline(div[key], color="#24292f", linestyle=style, linewidth=1, label=f"{label} {fmt(div[key])}")
    ax.set_xlabel("KL(baseline ‖ candidate) per token (log scale)", fontsize=9)
    ax.set_ylabel("tokens", fontsize=9)
    ax.set_title("Per-token KL divergence", fontsize=10, loc="left")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)
    return _png_b64(fig)


def plot_suite_deltas(suites: list[dict]) -> str | None:
    bars = []
    for s in suites:
        change = rel_change(s.get("baseline"), s.get("candidate"))
        if change is not None:
            hib = s.get("higher_is_better", True)
            color = NEUTRAL_COLOR if change == 0 else GOOD_COLOR if (change > 0) == hib else BAD_COLOR
            bars.append((f"{s.get('name')} ({s.get('metric')})", change, color))
    if not bars:
        return None
    fig, ax = _figure(width=10.5, height=max(2.0, 0.42 * len(bars) + 1.0))
    labels, values, colors = zip(*reversed(bars))  # first suite at the top
    ax.barh(labels, values, color=colors, height=0.6)
    ax.axvline(0, color="#24292f", linewidth=0.8)
    for y, v in enumerate(values):
        ax.annotate(f"{v:+.2f}%", (v, y), xytext=(4 if v >= 0 else -4, 0), textcoords="offset points",
                    ha="left" if v >= 0 else "right", va="center", fontsize=8)
    ax.margins(x=0.25)
    ax.set_xlabel("candidate vs baseline (%); green = better, red = worse", fontsize=9)
    ax.set_title("Change of each suite's headline metric", fontsize=10, loc="left")
    return _png_b64(fig)


def quality_points(run: dict) -> list[tuple[str, float, float]]:
    """(label, weight bytes, perplexity) for baseline and candidate, from whichever keys carry them."""
    div = run.get("divergence") or {}
    ppl_suite = next((s for s in run.get("suites") or [] if s.get("metric") == "ppl"), {})
    bench = run.get("bench") or {}
    points = []
    for side in ("baseline", "candidate"):
        size = (run.get(side) or {}).get("weight_bytes") or (bench.get(side) or {}).get("weight_bytes")
        ppl = div.get(f"ppl_{side}", ppl_suite.get(side))
        if is_num(size) and is_num(ppl):
            points.append(((run.get(side) or {}).get("name") or side, float(size), float(ppl)))
    return points


def plot_quality_size(run: dict) -> str | None:
    points = quality_points(run)
    if not points:
        return None
    fig, ax = _figure()
    for (label, size, ppl), color in zip(points, (BASE_COLOR, CAND_COLOR)):
        ax.scatter([size / 1e6], [ppl], s=70, color=color, zorder=3, label=label)
        ax.annotate(label, (size / 1e6, ppl), xytext=(6, 6), textcoords="offset points", fontsize=8)
    if len(points) == 2:
        (_, s0, p0), (_, s1, p1) = points
        ax.annotate("", (s1 / 1e6, p1), (s0 / 1e6, p0),
                    arrowprops=dict(arrowstyle="->", color="#57606a", linewidth=1))
    ax.margins(y=0.25)
    ax.set_xlim(0, max(size for _, size, _ in points) / 1e6 * 1.4)  # room for the labels right of the points
    ax.set_xlabel("weights (MB)", fontsize=9)
    ax.set_ylabel("perplexity (lower is better)", fontsize=9)
    ax.set_title("Quality vs size", fontsize=10, loc="left")
    return _png_b64(fig)


def plot_latency(bench: dict) -> str | None:
    series = [(side, (bench.get(side) or {}).get("latencies_ms") or [], color)
              for side, color in (("baseline", BASE_COLOR), ("candidate", CAND_COLOR))]
    series = [(side, [float(v) for v in vals], color) for side, vals, color in series if vals]
    if not series:
        return None
    import numpy as np

    fig, (hist_ax, box_ax) = _figure(width=10.5, height=3.2, ncols=2)
    every = np.concatenate([vals for _, vals, _ in series])
    bins = np.histogram_bin_edges(every, bins=40)
    for side, vals, color in series:
        hist_ax.hist(vals, bins=bins, color=color, alpha=0.55, label=f"{side} (n={len(vals)})")
    hist_ax.set_xlabel("latency (ms)", fontsize=9)
    hist_ax.set_ylabel("requests", fontsize=9)
    hist_ax.set_title("Latency distribution", fontsize=10, loc="left")
    hist_ax.legend(fontsize=8, frameon=False)
    box = box_ax.boxplot([vals for _, vals, _ in series], orientation="horizontal", patch_artist=True,
                         widths=0.5, whis=(1, 99), flierprops=dict(markersize=2),
                         medianprops=dict(color="#24292f"))
    for patch, (_, _, color) in zip(box["boxes"], series):
        patch.set(facecolor=color, alpha=0.55)
    box_ax.set_yticks(range(1, len(series) + 1), [side for side, _, _ in series], fontsize=9)
    box_ax.set_xlabel("latency (ms); whiskers at p1 and p99", fontsize=9)
    box_ax.set_title("Spread", fontsize=10, loc="left")
    return _png_b64(fig)


def plots_for(key: str, run: dict) -> list[tuple[str, str, bool]]:
    """(base64 png, caption, full width) for the plots of one section."""
    makers = {
        "divergence": [(lambda: plot_kld_hist(run["divergence"]),
                        "Histogram of per-token KL divergence; most mass far left means the candidate tracks the baseline.", False),
                       (lambda: plot_quality_size(run), "Weight size against perplexity.", False)],
        "suites": [(lambda: plot_suite_deltas(run["suites"]),
                    "Relative change of each suite's headline metric, judged by whether higher is better.", True)],
        "bench": [(lambda: plot_latency(run["bench"]), "Per-request latency of baseline and candidate.", True)],
    }
    return [(png, caption, wide) for make, caption, wide in makers.get(key, []) if (png := make())]


# ---- HTML -------------------------------------------------------------------------------------


def _cls(t: Table, i: int) -> str:
    a = t.align[i] if i < len(t.align) else "l"
    return {"r": "r", "c": "c"}.get(a, "text" if t.headers[i] == "Text" else "")


def html_table(t: Table) -> str:
    head = "".join(f'<th class="{_cls(t, i)}">{escape(h)}</th>' for i, h in enumerate(t.headers))
    rows = []
    for r, row in enumerate(t.rows):
        tone = t.tones[r] if r < len(t.tones) else None
        cells = []
        for i, cell in enumerate(row):
            cls = _cls(t, i) + (f" {tone}" if tone and i == t.tone_col % len(row) else "")
            cells.append(f'<td class="{cls.strip()}">{escape(cell)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    body = "".join(rows) or f'<tr><td colspan="{len(t.headers)}">none</td></tr>'
    note = f'<p class="note">{escape(t.note)}</p>' if t.note else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def html_cards(t: Table) -> str:
    cards = []
    for r, (label, value, sub) in enumerate(t.rows):
        tone = (t.tones[r] if r < len(t.tones) else None) or ""
        sub_html = f'<div class="sub {tone}">{escape(sub)}</div>' if sub else ""
        cards.append(f'<div class="card"><div class="label">{escape(label)}</div>'
                     f'<div class="value">{escape(value)}</div>{sub_html}</div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def html_section(sec: Section, run: dict) -> str:
    parts = [f'<section id="{escape(sec.key)}"><h2>{escape(sec.title)}</h2>']
    for t in sec.tables:
        if len(sec.tables) > 1 and t.title != sec.title:  # else the section heading names it
            parts.append(f"<h3>{escape(t.title)}</h3>")
        parts.append(html_cards(t) if t.cards else html_table(t))
    figures = [f'<figure class="{"wide" if wide else ""}"><img alt="{escape(caption)}" '
               f'src="data:image/png;base64,{png}"><figcaption>{escape(caption)}</figcaption></figure>'
               for png, caption, wide in plots_for(sec.key, run)]
    if figures:
        parts.append(f'<div class="plots">{"".join(figures)}</div>')
    return "".join(parts) + "</section>"


def html_header(run: dict) -> str:
    base, cand = run.get("baseline") or {}, run.get("candidate") or {}
    meta = " · ".join(f"{k} {fmt(run[k])}" for k in ("created", "lowbit_version") if run.get(k))
    vs = (f'<div class="vs"><span class="pill cand">{escape(fmt(cand.get("name") or "candidate"))}</span>'
          f'<span>vs baseline</span><span class="pill base">{escape(fmt(base.get("name") or "baseline"))}</span>'
          + (f'<span>recipe {escape(fmt(cand["recipe"]))}</span>' if cand.get("recipe") else "") + "</div>")
    return f'<header><h1>{escape(title(run))}</h1>{vs}<div class="meta">{escape(meta)}</div></header>'


def html_banner(gate: dict) -> str:
    cls = "pass" if gate.get("passed") else "fail"
    spec = f"<small>gate spec: {escape(fmt(gate['spec']))}</small>" if gate.get("spec") else ""
    return f'<div class="banner {cls}" id="verdict">{escape(verdict(gate))}{spec}</div>'


def render_html(run: dict) -> str:
    body = [html_header(run)]
    if run.get("gate"):
        body.append(html_banner(run["gate"]))
    body += [html_section(sec, run) for sec in sections(run)]
    body.append(f"<footer>generated by lowbit {escape(fmt(run.get('lowbit_version') or ''))}</footer>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title(run))}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


# ---- files ------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename, so a reader never sees a half-written report."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_texts(out_dir: Path, texts: dict[str, str], what: str = "report folder") -> list[Path]:
    """Write each {file name: text} into out_dir (created if needed), each file atomically."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowbitError(f"{what} {out_dir}: cannot create it ({e.strerror}); fix: choose another folder") from e
    paths = []
    for name, text in texts.items():
        _write_atomic(out_dir / name, text)
        paths.append(out_dir / name)
    return paths


def write_report(run: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.html and report.md into out_dir; returns their paths."""
    # render both before touching the folder
    html_path, md_path = write_texts(out_dir, {"report.html": render_html(run), "report.md": render_markdown(run)})
    return html_path, md_path


# ---- screenshots (used by the benchmark and the tests) ------------------------------------------


def screenshot(html_path: Path, png_path: Path, chromium: str = CHROMIUM, size: tuple[int, int] = (1280, 2400),
               timeout: float = 120) -> Path:
    """Render html_path in headless Chromium and save a PNG of the window."""
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    if not Path(chromium).is_file():
        raise LowbitError(f"screenshot: {chromium} not found; fix: apt-get install -y chromium")
    png_path.unlink(missing_ok=True)  # so a stale file cannot pass for a fresh screenshot
    with tempfile.TemporaryDirectory(prefix="lowbit-chromium-") as profile:  # a fresh profile every time
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}",
               html_path.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png_path.is_file():
        raise LowbitError(f"screenshot: chromium exited {proc.returncode} without writing {png_path}: "
                          f"{proc.stderr.strip()[-600:]}")
    return png_path


def png_stats(png_path: Path) -> dict:
    """Pixel variance, distinct colours and the share of white, to tell a rendered page from a blank one."""
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(str(png_path))[..., :3]  # floats in [0, 1]
    rgb = np.round(img * 255).astype(np.uint32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return {"width": img.shape[1], "height": img.shape[0], "variance": float(img.var()),
            "colors": int(np.unique(packed).size), "white": float((packed == 0xFFFFFF).mean())}


def is_blank(stats: dict, min_colors: int = 16) -> bool:
    return stats["variance"] <= 0 or stats["colors"] < min_colors
