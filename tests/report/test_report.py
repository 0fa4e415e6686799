"""HTML and Markdown reports: every section from a full run, minimal runs of each kind, escaping, atomic writes,
and (slow) a real headless Chromium screenshot that must not be blank."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest

from lowbit.report import render_html, render_markdown, write_report
from lowbit.report.html import CHROMIUM, is_blank, png_stats, screenshot

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "benchmarks" / "report_screenshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def full_run() -> dict:
    """The benchmark's realistic gate run: identity, divergence, four suites, gate and bench."""
    return _load_benchmark().synthetic_run()


def eval_run() -> dict:
    return {"kind": "eval", "baseline": {"name": "base-model"}, "candidate": {"name": "cand-model"},
            "divergence": {"ppl_baseline": 10.0, "ppl_candidate": 10.5, "mean_kld": 0.01, "p99_kld": 0.1,
                           "max_kld": 1.0, "top1": 0.95, "tokens": 1000, "samples": 10}}


def bench_run() -> dict:
    side = lambda lat: {"decode_tok_s": 40.0 / lat, "latency_ms": {"p50": lat, "p95": lat * 1.2, "p99": lat * 1.4},  # noqa: E731
                        "latencies_ms": [lat * (1 + i / 100) for i in range(50)]}
    return {"kind": "bench", "bench": {"baseline": side(100.0), "candidate": side(110.0)}}


def gate_run(passed: bool) -> dict:
    return {"kind": "gate", "gate": {"passed": passed, "spec": "strict", "criteria": [
        {"name": "mean_kld", "value": 0.05, "op": "<=", "threshold": 0.02, "passed": passed, "detail": ""}]}}


def section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)"', page)


def n_images(page: str) -> int:
    return page.count("data:image/png;base64,")


def test_full_run_has_every_section_and_plot():
    page = render_html(full_run())
    assert section_ids(page) == ["identity", "gate", "divergence", "suites", "bench", "worst"]
    assert 'class="banner fail"' in page and "FAIL: 4 of 5 criteria passed" in page
    assert n_images(page) == 4  # KLD histogram, quality vs size, suite deltas, latency
    for text in ("smollm2-135m-w4-g128", "Top-1 agreement", "95.30%", "needle_acc_pct", "Decode tok/s",
                 "Divergence: worst samples", "Suite jargon: worst cases"):
        assert text in page, text
    assert '<td class="bad">FAIL</td>' in page and '<td class="good">PASS</td>' in page


def test_page_is_self_contained():
    page = render_html(full_run())
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external assets
    assert "http://" not in page and "https://" not in page


def test_sample_text_is_escaped_and_truncated():
    run = full_run()
    run["divergence"]["worst"][0]["text"] = "<script>alert('x')</script> " + "long " * 100
    run["candidate"]["name"] = "cand<img src=x onerror=alert(1)>"
    page = render_html(run)
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    assert "<img src=x" not in page and "cand&lt;img" in page
    assert re.search(r"long l?o?n?g? ?…</td>", page) and "long " * 60 not in page
    md = render_markdown(run)
    assert "<script>" not in md and "&lt;script&gt;" in md


def test_markdown_has_the_same_tables():
    md = render_markdown(full_run())
    assert md.startswith("# lowbit gate report: smollm2-135m-w4-g128 vs smollm2-135m")
    assert "**Gate: ❌ FAIL: 4 of 5 criteria passed**" in md
    for heading in ("## Models", "## Gate", "## Divergence from the baseline", "## Evaluation suites",
                    "## Speed and memory", "## Worst cases", "### Suite tool_calling: worst cases (json_valid_pct)"):
        assert heading in md, heading
    assert "| Criterion | Value | Op | Threshold | Result | Detail |" in md
    assert "| general | ppl | 13.42 | 13.97 | 0.55 | +4.10% | worse | 256 |" in md
    assert "data:image" not in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in rows)


def test_markdown_escapes_pipes_and_newlines():
    run = eval_run()
    run["divergence"]["worst"] = [{"id": "a|b", "text": "x | y\nz", "baseline": 1, "candidate": 2, "score": 3.0}]
    md = render_markdown(run)
    assert "| 1 | a\\|b | x \\| y z | 1 | 2 | 3 |" in md


@pytest.mark.parametrize("make, ids, images", [
    (eval_run, ["identity", "divergence"], 0),  # no kld_hist and no sizes: no plots, no crash
    (bench_run, ["identity", "bench"], 1),
    (lambda: gate_run(True), ["identity", "gate"], 0),
])
def test_minimal_runs_render(make, ids, images):
    run = make()
    page = render_html(run)
    assert section_ids(page) == ids
    assert n_images(page) == images
    assert render_markdown(run).startswith("# lowbit ")


def test_gate_banner_pass_and_fail():
    assert 'class="banner pass"' in render_html(gate_run(True))
    assert 'class="banner fail"' in render_html(gate_run(False))
    assert "**Gate: ✅ PASS: 1 of 1 criteria passed**" in render_markdown(gate_run(True))


def test_empty_run_renders():
    assert section_ids(render_html({})) == ["identity"]
    assert render_markdown({}).startswith("# lowbit report")


def test_bench_ratios_and_tones():
    md = render_markdown(bench_run())
    assert "| Latency p95 (ms) | 120 | 132 | 1.100× |" in md
    page = render_html(bench_run())
    assert '<td class="r bad">1.100×</td>' in page  # slower is worse
    assert '<td class="r bad">0.909×</td>' in page  # fewer tokens per second is worse


def test_per_sample_fallback_when_no_worst_list():
    run = eval_run()
    run["divergence"]["per_sample"] = [{"id": f"s{i}", "text": f"text {i}", "kld": i / 10, "top1": 0.9,
                                        "ppl_baseline": 5.0, "ppl_candidate": 5.5} for i in range(15)]
    md = render_markdown(run)
    assert "### Divergence: samples with the highest KLD" not in md  # lone table: the section names it
    assert "| 1 | s14 | text 14 | 1.4 |" in md and "_showing 10 of 15_" in md


def test_kld_hist_with_zero_first_edge_plots():
    run = eval_run()
    run["divergence"]["kld_hist"] = {"edges": [0.0, 1e-4, 1e-3, 1e-2, 1e-1], "counts": [5, 50, 30, 2]}
    assert n_images(render_html(run)) == 1


def test_malformed_hist_is_skipped():
    run = eval_run()
    run["divergence"]["kld_hist"] = {"edges": [1e-3, 1e-2], "counts": [1, 2, 3]}
    assert n_images(render_html(run)) == 0


def test_write_report_is_atomic(tmp_path):
    out = tmp_path / "nested" / "report"
    html_path, md_path = write_report(full_run(), out)
    assert (html_path, md_path) == (out / "report.html", out / "report.md")
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    assert md_path.read_text().startswith("# lowbit gate report")
    write_report(eval_run(), out)  # overwrite in place
    assert "lowbit eval report" in html_path.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]  # no temp files left


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import lowbit.report.html as html_mod

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(html_mod.os, "replace", boom)
    with pytest.raises(OSError):
        write_report(eval_run(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_input_run_is_not_modified():
    run = full_run()
    before = copy.deepcopy(run)
    render_html(run)
    render_markdown(run)
    assert run == before


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} missing; install it: apt-get install -y chromium")
def test_chromium_screenshot_is_not_blank(tmp_path):
    html_path, _ = write_report(full_run(), tmp_path)
    png = screenshot(html_path, tmp_path / "report.png")
    stats = png_stats(png)
    assert (stats["width"], stats["height"]) == (1280, 2400)
    assert not is_blank(stats), stats
    assert stats["colors"] > 200 and stats["white"] < 0.95, stats  # text, tables and plots, not just a background
