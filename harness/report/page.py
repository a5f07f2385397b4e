"""index.html: the tables and plots on one static page, rendered from templates/report.html.j2
(Jinja2, autoescaped, StrictUndefined: a name the template uses and the page lacks is an error)."""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from harness.report.explorer import INSTALL
from harness.report.tables import AT_A_GLANCE, GAP_NOTE, RenderedTable

_ENV = Environment(loader=PackageLoader("harness.report", "templates"), autoescape=select_autoescape(["j2", "html"]),
                   undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def render_page(tables: list[RenderedTable], plots: list[tuple[str, str]], skipped: list[str],
                verdict: dict | None = None, explorer: str | None = None) -> str:
    """``verdict``: harness.report.verdict.verdicts' result, shown first. ``explorer``: the
    explorer's HTML (harness.report.explorer.explorer_html), after the plots; None: a line says how
    to get it."""
    from harness.report.verdict import VERDICT_NOTE, cost_note, limits_text, verdict_rows

    shown = [{"v": v, "rows": verdict_rows(v), "cost_note": cost_note(v)} for v in (verdict or {}).get("tables", [])]
    return _ENV.get_template("report.html.j2").render(
        tables=tables, plots=plots, skipped=skipped, gap_note=GAP_NOTE, at_a_glance=AT_A_GLANCE,
        verdicts=shown, verdict_limits=limits_text(verdict["limits"]) if verdict else None, verdict_note=VERDICT_NOTE,
        explorer=Markup(explorer) if explorer else None, explorer_install=INSTALL)
