"""The explorer on index.html: one point per finished run, any two metrics on the axes.

A plotly figure (the optional extra ``pip install 'peft-harness[plotly]'``): one trace per method,
coloured with harness.report.plots.method_color (the colours of every plot), the arm's marker as in
the plots; two dropdowns pick the metric of the x and of the y axis (each button restyles x or y
of every trace and retitles its axis); hover shows the run's settings (method, rank, seed, lr,
run_id, model, data, hardware) and its two values. The metrics are the numeric scalar columns of
runs.csv (tables.runs_frame) in readable units (GiB, %, ¢ or $) plus each run's gap vs the full FT
run of its pair (per seed, pp). plotly.js is copied beside index.html (``plotly.min.js``): the page
needs no server and loads nothing from outside.
"""

from __future__ import annotations

import html
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness import identity
from harness.identity import METHOD_LABEL
from harness.report.plots import MARKERS, TASK_LABEL, arm_styles, method_color
from harness.report.tables import Table, runs_frame
from harness.stats import TASKS, task_order

PLOTLY_JS = "plotly.min.js"
DIV_ID = "explorer"
INSTALL = "pip install 'peft-harness[plotly]'"
# matplotlib markers (plots.MARKERS) as plotly marker symbols
SYMBOLS = {"o": "circle", "s": "square", "^": "triangle-up", "D": "diamond", "v": "triangle-down", "P": "cross",
           "X": "x"}
assert set(MARKERS) <= set(SYMBOLS)
# identity, environment and bookkeeping columns of runs.csv that are not a run's measurement
NOT_METRICS = ("seed", "env_device_count", "random_weights")
# shown first, in this order, where some run has them
PREFERRED = ("peak_memory_bytes", "train_wall_s", "cost_usd", "tokens_per_s", "indomain_acc", "mmlu_acc",
             "gap_indomain", "gap_mmlu", "trainable_params", "trainable_share", "rank", "run_wall_s",
             "run_cost_usd", "adapter_bytes", "full_checkpoint_bytes")
LABELS = {
    "peak_memory_bytes": "peak training memory", "train_wall_s": "training wall-clock (s)",
    "run_wall_s": "run wall-clock (s)", "cost_usd": "cost per run", "run_cost_usd": "cost of the whole run",
    "tokens_per_s": "training throughput (tokens/s)", "trainable_params": "trainable parameters",
    "trainable_share": "trainable share (%)", "rank": "rank", "adapter_bytes": "adapter size",
    "full_checkpoint_bytes": "full checkpoint size",
}


@dataclass
class Metric:
    name: str  # runs.csv's column (gap_<task>: derived here)
    label: str  # with its unit
    values: list[float | None]  # one per run, in the explorer's run order, already in that unit


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _round(v: float | None) -> float | None:
    return None if v is None or v == 0 else round(v, 5 - math.floor(math.log10(abs(v))))


def _task_of(name: str) -> str | None:
    """The task of an accuracy column: ``mmlu_acc`` -> mmlu, ``tasks.arc_easy.acc`` -> arc_easy."""
    if name.endswith("_acc") and name[:-4] in TASKS:
        return name[:-4]
    if name.startswith("tasks.") and name.endswith(".acc"):
        return name[len("tasks."):-len(".acc")]
    return None


def _unit(name: str, values: list[float | None]) -> tuple[str, float]:
    """The label and the factor that puts ``name``'s values in readable units."""
    base = LABELS.get(name, name)
    present = [abs(v) for v in values if v is not None]
    top = max(present, default=0.0)
    if (task := _task_of(name)) is not None:
        return f"{TASK_LABEL.get(task, task)} accuracy (%)", 100.0
    if name.startswith("gap_"):
        task = name[len("gap_"):]
        return f"{TASK_LABEL.get(task, task)} gap vs full FT (pp, this seed)", 100.0
    if name.endswith("cost_usd"):
        return (f"{base} ($)", 1.0) if top >= 1 else (f"{base} (¢)", 100.0)
    if name.endswith("_bytes") or ".bytes" in name or "_bytes." in name:
        return (f"{base} (GiB)", 2.0**-30) if top >= 2**30 else (f"{base} (MiB)", 2.0**-20)
    if name.endswith(("_share", "_overhead")):
        return (base if base.endswith("(%)") else f"{base} (%)"), 100.0
    return base, 1.0


def _gaps(table: Table, runs: list[dict]) -> dict[str, list[float | None]]:
    """Per task, each run's accuracy minus that of the one ok full FT run of its pair_key (None
    for full FT, the base model, or where the pair has no single full run)."""
    fulls: dict[str, list[dict]] = {}
    for r in table.runs:
        if r["method"] == "full" and r["status"] == "ok":
            fulls.setdefault(r["pair_key"], []).append(r)
    out: dict[str, list[float | None]] = {}
    for task in TASKS:
        key = f"{task}_acc"
        column = []
        for r in runs:
            ref = fulls.get(r["pair_key"], [])
            mine = _number(r["metrics"].get(key))
            theirs = _number(ref[0]["metrics"].get(key)) if len(ref) == 1 else None
            column.append(mine - theirs if r["method"] not in ("full", "base") and None not in (mine, theirs)
                          else None)
        if any(v is not None for v in column):
            out[f"gap_{task}"] = column
    return out


def explorer_data(tables: list[Table]) -> tuple[list[dict], list[Metric]]:
    """The explorer's runs (the ok runs in table and arm order; each with ``method``, ``label``
    (its arm) and ``hover``) and its metrics (PREFERRED first, then accuracies, then the other
    columns by name; a column only where some run has a value, and not the same one for all)."""
    frame = runs_frame(tables)
    if frame.empty:
        return [], []
    rows = iter(frame.to_dict("records"))  # runs_frame's order: the tables, then each table's runs
    runs: list[dict] = []
    gaps: dict[str, list[float | None]] = {}
    for t in tables:
        row_of = {r["run_id"]: next(rows) for r in t.runs}
        ok = [(a, r) for a in t.arms for r in a.ok]
        for name, column in _gaps(t, [r for _, r in ok]).items():
            gaps[name] = gaps.get(name, [None] * len(runs)) + column
        for a, r in ok:
            cfg = r.get("config") or {}
            lr = identity.lookup(cfg, "method.learning_rate") or identity.lookup(cfg, "train.learning_rate")
            settings = {
                "method": METHOD_LABEL.get(r["method"], r["method"]), "rank": r.get("rank"),
                "seed": identity.seed(r), "lr": lr, "run_id": r["run_id"], "model": t.key[0], "data": t.key[1],
                "hardware": t.key[2],
            }
            hover = "<br>".join(f"{k}: {html.escape(str('—' if v is None else v))}" for k, v in settings.items())
            runs.append({"method": r["method"], "label": a.label, "hover": hover, "row": row_of[r["run_id"]]})
        for name in gaps:  # a task no run of this table has: None for its runs
            gaps[name] += [None] * (len(runs) - len(gaps[name]))

    names = [c for c in frame.columns if c not in NOT_METRICS and not c.startswith(("env_", "version_"))]
    metrics = []
    for name in [*names, *gaps]:
        if name in gaps:
            raw = gaps[name]
        else:
            raw = [_number(run["row"].get(name)) for run in runs]
        present = [v for v in raw if v is not None]
        if not present or (name not in PREFERRED and len(set(present)) < 2):
            continue  # nothing measured, or the same value for every run: nothing to explore
        label, factor = _unit(name, raw)
        metrics.append(Metric(name, label, [_round(v * factor) if v is not None else None for v in raw]))

    def order(m: Metric) -> tuple:
        if m.name in PREFERRED:
            return (0, PREFERRED.index(m.name), "")
        task = _task_of(m.name)
        return (1, task_order(task)[0], m.name) if task else (2, 0, m.name)

    return runs, sorted(metrics, key=order)


def _default_axes(metrics: list[Metric]) -> tuple[int, int]:
    """x: peak memory (else the first metric); y: the first accuracy (else the next metric)."""
    names = [m.name for m in metrics]
    x = names.index("peak_memory_bytes") if "peak_memory_bytes" in names else 0
    accuracies = [i for i, m in enumerate(metrics) if _task_of(m.name) and i != x]
    y = accuracies[0] if accuracies else (1 if x == 0 else 0)
    return x, min(y, len(metrics) - 1)


def explorer_figure(tables: list[Table]) -> dict | None:
    """The plotly figure as a dict (None when no run has a metric)."""
    runs, metrics = explorer_data(tables)
    if not runs or not metrics:
        return None
    styles = arm_styles(tables)
    methods = list(dict.fromkeys(run["method"] for run in runs))
    members = {m: [i for i, run in enumerate(runs) if run["method"] == m] for m in methods}
    x, y = _default_axes(metrics)

    def column(metric: Metric) -> list[list]:
        return [[metric.values[i] for i in members[m]] for m in methods]

    from matplotlib.colors import to_hex

    traces = [
        {
            "type": "scatter", "mode": "markers", "name": METHOD_LABEL.get(m, m),
            "x": column(metrics[x])[k], "y": column(metrics[y])[k],
            "text": [runs[i]["hover"] for i in members[m]],
            "marker": {"color": to_hex(method_color(m)), "size": 10, "line": {"width": 1, "color": "#333333"},
                       "symbol": [SYMBOLS[styles[runs[i]["label"]]["marker"]] for i in members[m]]},
            "hovertemplate": "%{text}<br>x: %{x}<br>y: %{y}<extra></extra>",
        }
        for k, m in enumerate(methods)
    ]

    def menu(axis: str, chosen: int, left: float) -> dict:
        return {
            "type": "dropdown", "direction": "down", "active": chosen, "x": left, "y": 1.17, "xanchor": "left",
            "yanchor": "top", "showactive": True, "name": f"{axis} axis",
            "buttons": [{"label": m.label, "method": "update",
                         "args": [{axis: column(m)}, {f"{axis}axis.title.text": m.label}]} for m in metrics],
        }

    layout = {
        "template": "plotly_white", "height": 560, "margin": {"t": 110, "l": 70, "r": 20, "b": 60},
        "xaxis": {"title": {"text": metrics[x].label}, "zeroline": False},
        "yaxis": {"title": {"text": metrics[y].label}, "zeroline": False},
        "legend": {"title": {"text": "method"}},
        "updatemenus": [menu("x", x, 0.04), menu("y", y, 0.56)],
        "annotations": [
            {"text": "x:", "x": 0.0, "y": 1.155, "xref": "paper", "yref": "paper", "showarrow": False,
             "xanchor": "left", "yanchor": "top"},
            {"text": "y:", "x": 0.52, "y": 1.155, "xref": "paper", "yref": "paper", "showarrow": False,
             "xanchor": "left", "yanchor": "top"},
        ],
    }
    return {"data": traces, "layout": layout}


def explorer_html(tables: list[Table], reports_dir: Path) -> str | None:
    """The explorer's HTML fragment for index.html, with plotly.js copied beside it; None (and no
    plotly.min.js left in ``reports_dir``) when plotly is not installed or no run has a metric."""
    target = Path(reports_dir) / PLOTLY_JS
    try:
        import plotly
        import plotly.io as pio
    except ImportError:
        target.unlink(missing_ok=True)
        return None
    fig = explorer_figure(tables)
    if fig is None:
        target.unlink(missing_ok=True)
        return None
    source = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not (target.is_file() and target.stat().st_size == source.stat().st_size):
        shutil.copyfile(source, target)
    div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=DIV_ID,
                      config={"displaylogo": False, "responsive": True,
                              "modeBarButtonsToRemove": ["sendChartToCloud", "select2d", "lasso2d"]})
    return f'<script src="{PLOTLY_JS}" charset="utf-8"></script>\n{div}'
