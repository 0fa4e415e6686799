"""The tuner's report: the trial table, the size-vs-divergence frontier, and per module its format and why.

Input is plain data: the tune result's dict (lowbit.tuner.TuneResult.to_dict), the measurement's dict
and the chosen allocation (module -> format key), so a saved tune.json renders the same report.
"""

from __future__ import annotations

import statistics
from html import escape
from pathlib import Path

from lowbit.report.html import CSS, _figure, _png_b64, write_texts


def module_reasons(meas: dict, choice: dict[str, str]) -> list[dict]:
    """Per module: its format, bits/weight, estimated KLD, and its sensitivity against the median.

    Sensitivity is the estimated KLD saved per byte when the module goes from the smallest format of
    the menu to the largest quantized one (the price the allocator weighs); a module well above the
    median gets more bits, one below gets fewer."""
    rows, rates = [], {}
    for m in meas["modules"]:
        quant = [k for k, s in m["spec"].items() if s is not None]
        if len(quant) < 2:
            continue
        lo, hi = min(quant, key=lambda k: m["bytes"][k]), max(quant, key=lambda k: m["bytes"][k])
        gain, cost = m["kld"][lo] - m["kld"][hi], m["bytes"][hi] - m["bytes"][lo]
        rates[m["name"]] = max(gain, 0.0) / max(cost, 1)
    med = statistics.median(rates.values()) if rates else 0.0
    for m in meas["modules"]:
        k = choice.get(m["name"])
        if k is None:
            continue
        rel = rates.get(m["name"], 0.0) / med if med > 0 else 0.0
        why = (f"{rel:.1f}x the median sensitivity: " +
               ("more bits" if rel > 1.5 else "fewer bits" if rel < 0.67 else "near the median"))
        rows.append({"module": m["name"], "format": k, "bits": 8 * m["bytes"][k] / (m["rows"] * m["cols"]),
                     "est_kld": m["kld"][k], "sensitivity_x_median": rel, "why": why})
    return rows


def _trial_rows(res: dict) -> list[list[str]]:
    out = []
    for t in res["trials"]:
        verdict = "PASS" if t["passed"] else ("stopped" if t["stopped"] else "fail")
        out.append([str(t["trial"]), t["how"], t["method"], t["kv_cache"], f"{t['bits']:.2f}", f"{(t.get('stored_bytes') or t['bytes']) / 1e6:.2f}",
                    f"{t['est_kld']:.4g}", "n/a" if t["mean_kld"] is None else f"{t['mean_kld']:.4g}",
                    "n/a" if t["p95_ms"] is None else f"{t['p95_ms']:.1f}", verdict,
                    "; ".join(t["failed"]) or t["stopped"], t["why"]])
    return out


TRIAL_COLS = ["trial", "candidate", "method", "kv", "bits/w", "MB", "est. KLD", "mean KLD", "p95 ms", "verdict",
              "failed criteria", "why this trial"]
MODULE_COLS = ["module", "format", "bits/w", "est. KLD", "why"]


def _headline(res: dict) -> str:
    if res["passed"]:
        b = res["best"]
        return (f"PASSED: trial {b['trial']} ({b['how']}, {b['method']}), {b['bits']:.2f} bits/weight, "
                f"{b['bytes'] / 1e6:.2f} MB, mean KLD {b['mean_kld']:.4g}")
    return "NO TRIAL PASSED. " + " ".join(res["notes"])


def render_markdown(res: dict, meas: dict, choice: dict[str, str] | None, recipe_cmd: str | None) -> str:
    def table(cols, rows):
        return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                         ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows])

    lines = [f"# lowbit tune: {res['model'].get('name')}", "", f"**{_headline(res)}**", "",
             f"Sensitivity measured in {res['measurement_seconds']:.0f} s on {meas['calibration'].get('tokens')} "
             f"calibration tokens ({meas['calibration'].get('source', '?')}); tuning took {res['seconds']:.0f} s in all.",
             "", "## Trials", "", table(TRIAL_COLS, _trial_rows(res)), "",
             f"Pareto set (size vs mean KLD vs p95): trials {', '.join(map(str, res['pareto'])) or 'none'}.", ""]
    if res["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    if recipe_cmd:
        lines += ["## Reproduce", "", "```sh", recipe_cmd, "```", ""]
    if choice:
        mods = module_reasons(meas, choice)
        lines += ["## Per module: format and why", "",
                  table(MODULE_COLS, [[r["module"], r["format"], f"{r['bits']:.2f}", f"{r['est_kld']:.3g}", r["why"]]
                                      for r in mods]), ""]
    return "\n".join(lines)


def plot_frontier(res: dict) -> str | None:
    pts = [t for t in res["trials"] if t["mean_kld"] is not None]
    if not pts:
        return None
    fig, ax = _figure(6.4, 3.6)
    for t in pts:
        ax.scatter(t["bits"], t["mean_kld"], color="#1a7f37" if t["passed"] else "#cf222e", s=36,
                   marker="o" if t["how"] == "mix" else "s", zorder=3)
        ax.annotate(str(t["trial"]), (t["bits"], t["mean_kld"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((t for t in pts if t["trial"] in res["pareto"]), key=lambda t: t["bits"])
    if len(front) > 1:
        ax.plot([t["bits"] for t in front], [t["mean_kld"] for t in front], color="#57606a", linewidth=1, zorder=2)
    ax.set_xlabel("bits per weight (whole model)", fontsize=9)
    ax.set_ylabel("mean KLD vs the float model", fontsize=9)
    ax.set_title("trials: green passed, red failed; circles mixes, squares uniform", fontsize=9)
    return _png_b64(fig)


def render_html(res: dict, meas: dict, choice: dict[str, str] | None, recipe_cmd: str | None) -> str:
    def table(cols, rows):
        head = "".join(f"<th>{escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<h1>lowbit tune: {escape(str(res['model'].get('name')))}</h1>",
             f"<div class='banner {'pass' if res['passed'] else 'fail'}'>{escape(_headline(res))}</div>",
             "<h2>Trials</h2>", table(TRIAL_COLS, _trial_rows(res))]
    png = plot_frontier(res)
    if png:
        parts.append(f"<figure><img alt='frontier' src='data:image/png;base64,{png}'><figcaption>size against "
                     f"divergence of every trial; the line joins the Pareto set</figcaption></figure>")
    if res["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in res["notes"]) + "</ul>")
    if recipe_cmd:
        parts.append(f"<h2>Reproduce</h2><pre>{escape(recipe_cmd)}</pre>")
    if choice:
        mods = module_reasons(meas, choice)
        parts += ["<h2>Per module: format and why</h2>",
                  table(MODULE_COLS, [[r["module"], r["format"], f"{r['bits']:.2f}", f"{r['est_kld']:.3g}", r["why"]]
                                      for r in mods])]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lowbit tune</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_tune_report(res: dict, meas: dict, choice: dict[str, str] | None, recipe_cmd: str | None,
                      out_dir: Path) -> tuple[Path, Path]:
    """tune.html and tune.md in out_dir (written atomically); returns their paths."""
    html_path, md_path = write_texts(out_dir, {"tune.html": render_html(res, meas, choice, recipe_cmd),
                                               "tune.md": render_markdown(res, meas, choice, recipe_cmd)},
                                     "tune report folder")
    return html_path, md_path
