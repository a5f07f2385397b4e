"""harness-report: turn run records into a verdict, tables, plots and one static page.

    harness-report [--results results] [--reports reports] [--max-gap PP --variants N ...]

Reads ``results/*.json`` (and the per-question answers beside them) only; it never loads a model.
Writes into the reports folder:

    at-a-glance.md   the verdict under the team's limits, then one table per model x data x
                     hardware (x eval settings), one column per arm
    verdict.json     the verdict (harness.report.verdict), per table
    runs.csv         one row per run, metrics flattened
    arms.csv         one row per arm: mean and sd over seeds, accuracy intervals, gap vs full fine-tuning
    *.png            plots (each skipped, with a log line, when its data is absent)
    index.html       the verdict, the tables, the plots and the explorer on one page; no server,
                     nothing loaded from outside (plotly.min.js beside it, with the plotly extra)

Same results in, byte-identical markdown, JSON and CSV out: everything is sorted and no report
timestamp is written. A broken record is skipped with a warning naming the file, and listed.

The package: verdict.py (which to pick, and why), tables.py (grouping through harness.identity,
rows and cells, markdown and CSV), fmt.py (numbers), plots.py (one figure helper and colour map,
the plots, the noise-aware Pareto front), explorer.py (the plotly figure), page.py with
templates/report.html.j2 (index.html). Every statistic comes from harness.stats.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness.records import RecordError, iter_records, load_record
from harness.report.explorer import explorer_html
from harness.report.page import render_page
from harness.report.plots import PLOTS, draw, pareto_front
from harness.report.tables import AT_A_GLANCE, ROW_LABELS, ROWS, arms_frame, group, markdown, render, runs_frame
from harness.report.verdict import (
    VERDICT_JSON,
    Limits,
    LimitsError,
    check_targets,
    load_limits,
    markdown_section,
    verdicts,
    write_json,
)

__all__ = ["AT_A_GLANCE", "ROWS", "ROW_LABELS", "build_report", "main", "pareto_front"]

log = logging.getLogger(__name__)


def _load(results_dir: Path) -> tuple[list[dict], list[str]]:
    """Valid records, and the names of the files that were skipped (iter_records warned)."""
    records, seen = [], set()
    for path, rec in iter_records(results_dir):
        records.append(rec)
        seen.add(path.name)
    skipped = []
    for path in sorted(p for p in results_dir.glob("*.json") if p.name not in seen):
        try:
            load_record(path)
            continue  # a whole record written by a running job after the first pass: the next build has it
        except RecordError as exc:
            reason = str(exc).replace(f"{path}: ", "")  # no folder in the report: it moves with the results
        skipped.append(f"{path.name}: {reason}")
    return records, skipped


def build_report(results_dir: str | Path, reports_dir: str | Path, estimate_models: list[str] | None = None,
                 estimate_hardware: str | None = None, estimate_tokens: int | None = None,
                 limits: Limits | None = None) -> dict[str, Path]:
    """Write the report for the records in ``results_dir`` into ``reports_dir``.

    Returns the written files by name (``at-a-glance.md``, ``verdict.json``, ``runs.csv``,
    ``arms.csv``, ``index.html`` and each plot that had data). ``limits``: the team's limits the
    verdict judges against (default ``Limits()``: max gap 1 pp, one variant, measured costs)."""
    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    records, skipped = _load(results_dir)
    if skipped:
        log.warning("%d record file(s) skipped; the report lists them", len(skipped))
    if not records:
        log.warning("no valid run records in %s", results_dir)
    tables = group(records, results_dir)
    rendered = [render(t) for t in tables]
    verdict = verdicts(tables, limits or Limits(), results_dir)

    reports_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written[AT_A_GLANCE] = reports_dir / AT_A_GLANCE
    written[AT_A_GLANCE].write_text(markdown(rendered, skipped, markdown_section(verdict)))
    written[VERDICT_JSON] = write_json(verdict, reports_dir)
    for name, frame in (("runs.csv", runs_frame(tables)), ("arms.csv", arms_frame(tables))):
        written[name] = reports_dir / name
        frame.to_csv(written[name], index=False, lineterminator="\n")

    plots = []
    for name, caption, plot in PLOTS:
        target = reports_dir / name
        if draw(plot, tables, target) is None:
            # remove a stale plot from an earlier build, so index.html never shows old data
            target.unlink(missing_ok=True)
            log.info("skipping %s: no data for it in the records", name)
            continue
        written[name] = target
        plots.append((name, caption))
    written["index.html"] = reports_dir / "index.html"
    explorer = explorer_html(tables, reports_dir)  # the interactive explorer (plotly.min.js beside index.html)
    written["index.html"].write_text(render_page(rendered, plots, skipped, verdict, explorer))
    from harness.report.estimate_report import write_estimates  # estimated sections, labelled as such

    written.update(write_estimates(records, reports_dir, results_dir, estimate_models, estimate_hardware,
                                   estimate_tokens))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness-report", description=__doc__.split("\n\n")[0],
                                     epilog="exit codes: 0 report written; 2 no such results folder. Docs: docs/report.md")
    parser.add_argument("--results", default="results", help="folder of run records (default: results)")
    parser.add_argument("--reports", default="reports", help="folder to write the report into (default: reports)")
    parser.add_argument("--estimate-models", default="", help="comma-separated models (e.g. llama-2-13b-arch) "
                        "for an 'estimated at scale' table from harness-estimate")
    parser.add_argument("--estimate-hardware", default="a100-80gb", help="hardware of that table (default: a100-80gb)")
    parser.add_argument("--estimate-tokens", type=int, default=None, help="training tokens it prices (default: 1e8)")
    limits = parser.add_argument_group("the verdict's limits (docs/verdict.md; flags override --limits)")
    limits.add_argument("--limits", default=None, metavar="YAML", help="a file with any of: max_gap, variants, "
                        "target_tokens, target_model, target_hardware, budget_usd, task")
    limits.add_argument("--max-gap", type=float, default=None, metavar="PP",
                        help="largest accepted accuracy loss vs full FT, in pp (default: 1.0)")
    limits.add_argument("--variants", type=int, default=None, metavar="N", help="variants to serve (default: 1)")
    limits.add_argument("--target-tokens", type=float, default=None, metavar="T",
                        help="training tokens to price, e.g. 1e9 (default: each run's own)")
    limits.add_argument("--target-model", default=None, metavar="MODEL",
                        help="estimate the cost at this model preset, e.g. llama-2-13b-arch")
    limits.add_argument("--target-hardware", default=None, metavar="HW",
                        help="estimate the cost on this hardware preset, e.g. a100-80gb")
    limits.add_argument("--budget-usd", type=float, default=None, metavar="USD", help="the most one training run may cost")
    limits.add_argument("--task", default=None, help="the accuracy judged (default: indomain where measured, else mmlu)")
    args = parser.parse_args(argv)
    # warnings about skipped records must reach the user: log to stderr
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not Path(args.results).is_dir():
        parser.error(f"--results {args.results!r} is not a folder; pass the folder holding the run records")
    models = [m for m in args.estimate_models.split(",") if m]
    from harness.report.estimate_report import check_args

    if problem := check_args(models, args.estimate_hardware):
        parser.error(problem)
    try:
        chosen = load_limits(args.limits, {k: getattr(args, k) for k in ("max_gap", "variants", "target_tokens",
                                                                           "target_model", "target_hardware",
                                                                           "budget_usd", "task")})
    except (LimitsError, TypeError) as exc:
        parser.error(str(exc))
    if problem := check_targets(chosen):
        parser.error(problem)
    written = build_report(args.results, args.reports, models, args.estimate_hardware, args.estimate_tokens, chosen)
    print(f"verdict: {written[VERDICT_JSON]}")
    print(f"at-a-glance table: {written[AT_A_GLANCE]}")
    print(f"full report: {written['index.html']}")
    return 0

