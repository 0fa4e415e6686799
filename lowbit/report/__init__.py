"""Reports (HTML + Markdown) of a run, and the SQLite registry of runs.

matplotlib is imported only when a plot is drawn, so importing this package stays cheap.
"""

from lowbit.report.html import render_html, screenshot, write_report
from lowbit.report.markdown import render_markdown
from lowbit.report.registry import compare_runs, default_db_path, get_run, headline, list_runs, record

__all__ = ["render_html", "render_markdown", "write_report", "screenshot",
           "record", "list_runs", "get_run", "compare_runs", "default_db_path", "headline"]
