"""The report's plots: one figure helper (one width, panel height, dpi and style for all), one
colour per method, the plots in PLOTS.

Every figure is FIG_W inches wide at DPI (1000 px): panels two a row, the legend in a fixed
column on the right, so the page shows every plot at the same scale. The object-oriented Figure
API renders with Agg and leaves pyplot's global backend alone, so the run stage can build a report
in its own process without side effects. A plot function returns its Figure (None without data);
``draw`` saves it. Every plot (and the explorer, harness.report.explorer) colours a method with
``method_color``: full FT red, LoRA blue, QLoRA green, ... in every figure; arms of one method (its
ranks) differ in marker and line style, never in hue. The memory breakdown's categories use greys,
browns and a yellow no method has. Accuracies are drawn with their 95% intervals (harness.stats);
the Pareto front marks the cheapest arm as such and crowns an arm as a lead only where it beats
every cheaper arm beyond the noise.
"""

from __future__ import annotations

import math
import textwrap
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from harness.identity import METHOD_LABEL, arm_label
from harness.report.fmt import fmt_bytes, fmt_count, fmt_money
from harness.report.tables import Arm, Table, _arm_sort, memory_measure, status_of, variant_entries
from harness.stats import accuracy_difference, mean_sd, task_order, unpaired_difference

FIG_W, PANEL_H, LEGEND_W, DPI = 10.0, 3.2, 2.3, 100
STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "savefig.facecolor": "white",
}
BREAKDOWN = ("parameters", "gradients", "optimizer_state", "activations", "other")
TASK_LABEL = {"mmlu": "MMLU", "indomain": "in-domain"}  # lm-eval tasks go by their own names

# ---------------------------------------------------------------- one colour per method, in every plot
METHOD_COLORS = {
    "full": "tab:red", "lora": "tab:blue", "qlora": "tab:green", "dora": "tab:purple", "rslora": "tab:cyan",
    "ia3": "tab:orange", "base": "tab:gray",
}
# other PEFT types: one of these, picked by a hash of the name (the same colour in every report)
RESERVED_COLORS = ("tab:pink", "tab:olive", "navy", "teal", "darkmagenta", "gold")
# memory-breakdown categories (colour, hatch): greys, browns and a yellow no method uses
BREAKDOWN_STYLE = {
    "parameters": ("#525252", ""), "gradients": ("#a6761d", "//"), "optimizer_state": ("#f2d16b", ""),
    "activations": ("#c8c8c8", ".."), "other": ("#e8dcc4", "xx"),
}
# arms of one method (ranks, settings), in table order: the method's colour, these markers and lines
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")


def method_color(method: str) -> str:
    """The colour of ``method`` in every plot (a matplotlib colour name)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return RESERVED_COLORS[zlib.crc32(method.encode()) % len(RESERVED_COLORS)]


def arm_styles(tables: list[Table]) -> dict[str, dict]:
    """Per arm label: its method's ``color``, and a ``marker`` and ``linestyle`` by its place among
    that method's arms (table order), the same in every panel."""
    arms = sorted({(a.method, a.rank, a.settings): a.label for t in tables for a in t.arms}.items(),
                  key=lambda kv: _arm_sort(kv[0]))
    seen: dict[str, int] = defaultdict(int)
    styles = {}
    for (method, _, _), label in arms:
        i = seen[method]
        seen[method] += 1
        styles[label] = {"color": method_color(method), "marker": MARKERS[i % len(MARKERS)],
                         "linestyle": LINESTYLES[i % len(LINESTYLES)]}
    return styles


def _method_label(method: str) -> str:
    return METHOD_LABEL.get(method, method)


# ---------------------------------------------------------------- one figure helper


def figure(n: int, cols: int = 2, tick_room: float = 0.6) -> tuple[Figure, list]:
    """``n`` panels, up to ``cols`` a row, in a FIG_W-wide figure with the legend column on the
    right. ``tick_room`` is the room under each panel for its tick labels (rotated arm names need
    ~1.5 in). A fixed layout: constrained layout measured every text box and took most of the time."""
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    left, top, gap_w = 0.8, 0.7, 0.8
    ax_w = (FIG_W - left - LEGEND_W - (cols - 1) * gap_w) / cols
    h = top + rows * (PANEL_H + tick_room)
    fig = Figure(figsize=(FIG_W, h))
    grid = {
        "left": left / FIG_W, "right": 1 - LEGEND_W / FIG_W, "top": 1 - top / h, "bottom": tick_room / h,
        "wspace": gap_w / ax_w, "hspace": tick_room / PANEL_H,
    }
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=grid).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(ax, text: str) -> None:
    # an explicit y skips matplotlib's search for a free spot above the axes (slow, and not needed)
    ax.set_title(text, y=1.0, pad=4)


def _finish(fig: Figure, axes: list, title: str) -> Figure:
    """One legend (entries merged over panels) in the legend column (27 characters a line fit it),
    and the title."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), [textwrap.fill(label, 27) for label in entries], loc="upper left",
                   bbox_to_anchor=(1 - (LEGEND_W - 0.15) / FIG_W, axes[0].get_position().y1), frameon=False)
    fig.suptitle(title)
    return fig


def _tasks(tables: list[Table]) -> list[str]:
    """The accuracy tasks some arm of these tables scored (MMLU, in-domain, then lm-eval tasks)."""
    return sorted({task for t in tables for a in t.arms for task, acc in a.accuracy.items() if acc},
                  key=task_order)


def _task_label(task: str) -> str:
    return TASK_LABEL.get(task, task)


def _errors(intervals: list[dict], scale: float = 100) -> list[list[float]]:
    """Asymmetric error bars (below, above) from stats intervals; 0 where there is none."""
    return [[(i["mean"] - i["ci_low"]) * scale if i["ci_low"] is not None else 0 for i in intervals],
            [(i["ci_high"] - i["mean"]) * scale if i["ci_high"] is not None else 0 for i in intervals]]


# ---------------------------------------------------------------- Pareto front


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats: cheaper-or-equal and at least
    as accurate, better in one. Lower cost and higher accuracy are better. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in order:
        cost, acc = points[i]
        if not front or acc > points[front[-1]][1]:
            front.append(i)
        elif (cost, acc) == tuple(points[front[-1]]):
            front.append(i)  # an exact duplicate of a front point is not dominated either
    return front


CHEAPEST, FRONT, WITHIN_NOISE, DOMINATED = "cheapest", "front", "within noise", "dominated"


def front_status(points: Sequence[tuple[float, float]], lead_significant: Callable[[int, int], bool]) -> list[str]:
    """Per (cost, accuracy) point, against the other points at most as costly ("cheaper"):

    DOMINATED     a cheaper point is at least as accurate (an exact twin does not count);
    CHEAPEST      otherwise, when it costs the least of all: it has nothing cheaper to beat, so it
                  is the front's start, never a lead;
    FRONT         a lead: more accurate than every cheaper point and ``lead_significant(it, other)``
                  for each of them (beyond the 95% noise);
    WITHIN_NOISE  more accurate than every cheaper point, but inside the noise against one of them:
                  neither dominates, and it is not on the front.

    So equal accuracies never make a lead: the cheapest is CHEAPEST, the dearer ones DOMINATED."""
    lowest = min((c for c, _ in points), default=None)
    status = []
    for j, (cost, acc) in enumerate(points):
        cheaper = [i for i, (c, a) in enumerate(points) if i != j and c <= cost]
        if any(points[i][1] >= acc and points[i] != points[j] for i in cheaper):  # an equal point: not dominated
            status.append(DOMINATED)
        elif cost == lowest:
            status.append(CHEAPEST)
        elif all(lead_significant(j, i) for i in cheaper):
            status.append(FRONT)
        else:
            status.append(WITHIN_NOISE)
    return status


@dataclass
class CostPoint:
    table: Table
    arm: Arm
    cost: float
    accuracy: dict  # stats.accuracy_interval on ``task``
    label: str
    task: str = "mmlu"


def cost_points(tables: list[Table], task: str = "mmlu") -> list[CostPoint]:
    several = len(tables) > 1
    return [
        CostPoint(t, a, mean_sd(a.values("cost_usd"))[0], a.accuracy[task],
                  f"{t.key[0]} ({t.key[2]}): {a.label}" if several else a.label, task)
        for t in tables for a in t.arms
        if a.values("cost_usd") and a.accuracy.get(task)
    ]


def lead_significant(a: CostPoint, b: CostPoint) -> bool:
    """Is ``a`` more accurate than ``b`` (on their task) beyond the noise? Arms of one table: the
    paired difference over the questions and seeds they share; otherwise (or without a shared
    seed) the unpaired difference of the two accuracy intervals."""
    diff = None
    if a.table is b.table:
        diff = accuracy_difference(a.arm.ok, b.arm.ok, a.task, a.table.items)
    if diff is None:
        diff = unpaired_difference(a.accuracy, b.accuracy)
    return diff["significant"] and diff["diff"] > 0


def cost_front(tables: list[Table], task: str = "mmlu") -> list[tuple[CostPoint, str]]:
    """The points of the cost-vs-accuracy panel of ``task`` with their front status."""
    points = cost_points(tables, task)
    xy = [(p.cost, p.accuracy["mean"]) for p in points]
    return list(zip(points, front_status(xy, lambda j, i: lead_significant(points[j], points[i]))))


# ---------------------------------------------------------------- plots


def plot_peak_memory(tables: list[Table]) -> Figure | None:
    panels = [t for t in tables if any(a.values("peak_memory_bytes") for a in t.arms if a.method != "base")]
    if not panels:
        return None
    fig, axes = figure(len(panels), tick_room=1.5)
    for ax, t in zip(axes, panels):
        arms = [a for a in t.arms if a.method != "base"]
        stats = [mean_sd([v / 2**30 for v in a.values("peak_memory_bytes")]) if a.values("peak_memory_bytes")
                 else None for a in arms]
        top = max(s[0] for s in stats if s)
        done = [x for x, s in enumerate(stats) if s]
        ax.bar(done, [stats[x][0] for x in done], yerr=[stats[x][1] or 0 for x in done], capsize=3,
               color=[method_color(arms[x].method) for x in done])
        for x, a in enumerate(arms):
            if stats[x] is None:
                # nothing measured: a hatched placeholder says why instead of a silent gap
                oom = any(status_of(r) == "oom" for r in a.runs)
                ax.bar(x, top, color="none", edgecolor=method_color(a.method), hatch="//", label="did not finish")
                ax.text(x, top / 2, "OOM" if oom else "failed", ha="center", va="center", rotation=90, fontsize=8)
        for method in dict.fromkeys(arms[x].method for x in done):  # legend: one patch per method
            ax.bar(0, 0, color=method_color(method), label=_method_label(method))
        ax.set_xticks(range(len(arms)), [a.label for a in arms], rotation=45, ha="right")
        measures = sorted({m for a in arms for r in a.ok if r["metrics"].get("peak_memory_bytes") is not None
                           and (m := memory_measure(r))})
        ax.set_ylabel(f"peak training memory, {' / '.join(measures) or 'unknown measure'} (GiB)")
        _title(ax, t.title)
    return _finish(fig, axes, "Peak training memory by arm and rank (mean ± sd over seeds)")


def plot_accuracy_by_rank(tables: list[Table], task: str = "mmlu") -> Figure | None:
    panels = [t for t in tables if any(a.rank is not None and a.accuracy.get(task) for a in t.arms)]
    if not panels:
        return None
    fig, axes = figure(len(panels))
    for ax, t in zip(axes, panels):
        ranked = [a for a in t.arms if a.rank is not None and a.accuracy.get(task)]
        methods = list(dict.fromkeys(a.method for a in ranked))  # arms are already in method order
        for i, method in enumerate(methods):
            arms = [a for a in ranked if a.method == method]
            # nudge each method sideways a little so error bars at the same rank do not hide each other
            nudge = 2 ** (0.05 * (i - (len(methods) - 1) / 2))
            ax.errorbar([a.rank * nudge for a in arms], [a.accuracy[task]["mean"] * 100 for a in arms],
                        yerr=_errors([a.accuracy[task] for a in arms]), marker="o", capsize=3,
                        color=method_color(method), label=_method_label(method))
        for a in t.arms:
            if a.method in ("full", "base") and (acc := a.accuracy.get(task)):
                ax.axhline(acc["mean"] * 100, color=method_color(a.method),
                           linestyle="-" if a.method == "full" else "--", label=a.label)
                if acc["ci_low"] is not None:
                    ax.axhspan(acc["ci_low"] * 100, acc["ci_high"] * 100, color=method_color(a.method), alpha=0.12)
        ranks = sorted({a.rank for a in ranked})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        if len(ranks) == 1:  # else the axis spans only the sideways nudge
            ax.set_xlim(ranks[0] / 2, ranks[0] * 2)
        ax.minorticks_off()
        ax.set_xlabel("rank")
        ax.set_ylabel(f"{_task_label(task)} accuracy (%)")
        _title(ax, t.title)
    return _finish(fig, axes, f"{_task_label(task)} accuracy by rank (mean over seeds; bars and bands: 95% interval)")


def plot_learning_vs_forgetting(tables: list[Table]) -> Figure | None:
    """Per trained arm: what it learned (in-domain accuracy gain over the base model, or the fall
    of its held-out loss) against what it forgot (the rise of its general-text loss), as Biderman
    et al. (2024) plot LoRA against full fine-tuning. Horizontal bars: the forgetting row's 95% interval."""
    def learned(arm) -> tuple[float, str] | None:
        if gains := arm.values("indomain_gain_vs_base"):
            return mean_sd(gains)[0] * 100, "in-domain accuracy gain over the base model (pp)"
        if falls := arm.values("heldout_loss_change_vs_base"):
            return -mean_sd(falls)[0], "held-out loss fall from the base model (nats/token)"
        return None

    panels = [t for t in tables if any(a.key in t.forgetting and learned(a) for a in t.arms)]
    if not panels:
        return None
    styles = arm_styles(tables)
    fig, axes = figure(len(panels), tick_room=0.8)
    for ax, t in zip(axes, panels):
        ylabel = ""
        for a in t.arms:
            row, y = t.forgetting.get(a.key), learned(a)
            if row is None or y is None:
                continue
            xerr = ([[row["gap"] - row["ci_low"]], [row["ci_high"] - row["gap"]]] if row["ci_low"] is not None
                    else None)
            style = styles[a.label]
            ax.errorbar([row["gap"]], [y[0]], xerr=xerr, marker=style["marker"], capsize=3, color=style["color"],
                        label=a.label)
            ylabel = y[1]
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("forgetting: general-text loss rise\nover the base model (nats/token)")
        ax.set_ylabel(ylabel)
        _title(ax, t.title)
    return _finish(fig, axes, "Learning vs forgetting per arm (up: learned more; right: forgot more)")


def _cost_panel(ax, points: list[tuple[CostPoint, str]]) -> None:
    """One task's cost-vs-accuracy panel: every arm with its 95% interval, the cheapest boxed, the
    leads beyond the noise circled and joined by the front's line, leads within the noise dashed."""
    task = points[0][0].task
    for method in dict.fromkeys(p.arm.method for p, _ in points):  # one errorbar call per method: faster
        mine = [p for p, _ in points if p.arm.method == method]
        ax.errorbar([p.cost for p in mine], [p.accuracy["mean"] * 100 for p in mine],
                    yerr=_errors([p.accuracy for p in mine]), fmt="o", capsize=3, color=method_color(method),
                    label=_method_label(method), zorder=3)
    cheapest = [p for p, s in points if s == CHEAPEST]
    leads = [p for p, s in points if s == FRONT]
    noise = [p for p, s in points if s == WITHIN_NOISE]
    front = sorted(cheapest + leads, key=lambda p: p.cost)
    ax.plot([p.cost for p in front], [p.accuracy["mean"] * 100 for p in front], color="black",
            drawstyle="steps-post", linewidth=1, zorder=2)
    ax.scatter([p.cost for p in cheapest], [p.accuracy["mean"] * 100 for p in cheapest], s=170, marker="s",
               facecolors="none", edgecolors="black", label="cheapest arm (nothing cheaper to beat)",
               zorder=4)
    if leads:
        ax.scatter([p.cost for p in leads], [p.accuracy["mean"] * 100 for p in leads], s=160, facecolors="none",
                   edgecolors="black", label="lead beyond the 95% noise over every cheaper arm",
                   zorder=4)
    if noise:
        ax.scatter([p.cost for p in noise], [p.accuracy["mean"] * 100 for p in noise], s=160, facecolors="none",
                   edgecolors="black", linestyles="--", label="lead within the noise: not on the front", zorder=4)
    labelled = front + noise
    mid = (min(p.cost for p in labelled) + max(p.cost for p in labelled)) / 2
    for p in labelled:  # labels point away from the nearer edge so they stay inside the axes
        left = p.cost > mid
        ax.annotate(p.label, (p.cost, p.accuracy["mean"] * 100), textcoords="offset points",
                    xytext=(-8 if left else 8, -12), ha="right" if left else "left", fontsize=7)
    costs = [p.cost for p, _ in points]
    if min(costs) > 0 and max(costs) / min(costs) > 100:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_money(v)))
    ax.set_xlabel(r"cost per run (US dollars; ¢ below \$1)")
    ax.set_ylabel(f"{_task_label(task)} accuracy (%)")
    _title(ax, f"{_task_label(task)}: cost vs accuracy")


def plot_cost_vs_accuracy(tables: list[Table]) -> Figure | None:
    """One panel per accuracy task the tables carry (MMLU, in-domain, lm-eval tasks) with costs."""
    panels = [points for task in _tasks(tables) if (points := cost_front(tables, task))]
    if not panels:
        return None
    fig, axes = figure(len(panels), tick_room=0.7)
    for ax, points in zip(axes, panels):
        _cost_panel(ax, points)
    return _finish(fig, axes, "Cost vs accuracy per arm (mean over seeds, 95% interval); boxed: cheapest; "
                   "circled: a lead beyond the noise")


def plot_memory_breakdown(tables: list[Table]) -> Figure | None:
    def breakdown(a: Arm) -> dict[str, float] | None:
        parts = [p for r in a.ok if isinstance(p := r["metrics"].get("memory_breakdown_bytes"), dict)]
        if not parts:
            return None
        return {k: mean_sd([p.get(k) or 0 for p in parts])[0] / 2**30 for k in BREAKDOWN}

    panels = [(t, [(a, b) for a in t.arms if (b := breakdown(a))]) for t in tables]
    panels = [(t, arms) for t, arms in panels if arms]
    if not panels:
        return None
    fig, axes = figure(len(panels), tick_room=1.5)
    for ax, (t, arms) in zip(axes, panels):
        bottoms = [0.0] * len(arms)
        for part in BREAKDOWN:
            heights = [b[part] for _, b in arms]
            color, hatch = BREAKDOWN_STYLE[part]
            ax.bar(range(len(arms)), heights, bottom=bottoms, color=color, hatch=hatch, edgecolor="#3b3b3b",
                   linewidth=0.5, label=part.replace("_", " "))
            bottoms = [x + h for x, h in zip(bottoms, heights)]
        ax.set_xticks(range(len(arms)), [a.label + _sharded_note(a) for a, _ in arms], rotation=45, ha="right")
        ax.set_ylabel("training memory (GiB)" + (", largest rank" if any(_sharded_note(a) for a, _ in arms) else ""))
        _title(ax, t.title)
    return _finish(fig, axes, "Training memory breakdown (mean over seeds)")


def _sharded_note(a: Arm) -> str:
    """What a sharded arm's breakdown holds: FSDP2 tracks this rank's shards as parameters, and the
    weights it all-gathers for a layer's forward and backward as activations (ZeRO-3 likewise)."""
    runs = a.ok or a.runs
    dist = ((runs[0].get("config") or {}).get("distributed") or {}) if runs else {}
    if dist.get("strategy") in ("fsdp", "zero3") and (dist.get("num_processes") or 1) > 1:
        return f"\n({dist['strategy']}: one rank's shards;\ngathered weights in activations)"
    return ""


def plot_loss_curves(tables: list[Table]) -> Figure | None:
    panels = [t for t in tables if any(r["metrics"].get("loss_curve") for a in t.arms for r in a.ok)]
    if not panels:
        return None
    styles = arm_styles(tables)
    fig, axes = figure(len(panels))
    for ax, t in zip(axes, panels):
        for a in t.arms:
            for r in a.ok:  # one line per seed, one legend entry per arm
                if curve := r["metrics"].get("loss_curve") or []:
                    ax.plot([p[0] for p in curve], [p[1] for p in curve], color=styles[a.label]["color"],
                            linestyle=styles[a.label]["linestyle"], linewidth=1, alpha=0.8, label=a.label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        _title(ax, t.title)
    return _finish(fig, axes, "Training loss curves (one line per seed; line style: the arm within its method)")


def _model_size(t: Table) -> float | None:
    sizes = [s for r in t.runs if (s := (r.get("model") or {}).get("total_params") or r["metrics"].get("total_params"))]
    return max(sizes) if sizes else None


def plot_scaling(tables: list[Table]) -> Figure | None:
    """Peak memory and the accuracy gap vs full FT (with its 95% interval) of every task that has
    one (MMLU, in-domain, lm-eval tasks) against model size, one line per arm; those panels per
    data set and hardware (only those that ran more than one model size)."""
    by_setting: dict[tuple[str, str], list[tuple[float, Table]]] = defaultdict(list)
    for t in tables:
        if size := _model_size(t):
            by_setting[(t.key[1], t.key[2])].append((size, t))
    settings = [k for k in sorted(by_setting) if len({s for s, _ in by_setting[k]}) > 1]
    # (title, y label, {arm label: [(size, y, (below, above))]}, sizes, is a gap)
    panels: list[tuple[str, str, dict[str, list], list[float], bool]] = []
    for data, hardware in settings:
        members = sorted(by_setting[(data, hardware)], key=lambda st: (st[0], st[1].key))
        sizes = sorted({s for s, _ in members})
        memory: dict[str, list] = defaultdict(list)
        gaps: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for size, t in members:
            for a in t.arms:
                if a.method != "base" and a.values("peak_memory_bytes"):
                    memory[a.label].append((size, mean_sd(a.values("peak_memory_bytes"))[0] / 2**30, (0.0, 0.0)))
            for a in t.arms:
                for task in sorted({task for key, task in t.gaps if key == a.key}, key=task_order):
                    g = t.gaps[(a.key, task)]
                    # the table's interval (asymmetric where Newcombe's floor sets it)
                    below, above = ((g["gap"] - g["ci_low"]) * 100, (g["ci_high"] - g["gap"]) * 100) \
                        if g["ci_low"] is not None else (0.0, 0.0)
                    gaps[task][a.label].append((size, g["gap"] * 100, (below, above)))
        if memory:
            panels.append((f"Peak memory, {data} ({hardware})", "peak training memory (GiB)", memory, sizes, False))
        for task in sorted(gaps, key=task_order):
            panels.append((f"{_task_label(task)} gap (negative: PEFT worse), {data} ({hardware})",
                           f"{_task_label(task)} gap vs full FT (pp, 95% interval)", gaps[task], sizes, True))
    if not panels:
        return None
    styles = arm_styles(tables)
    fig, axes = figure(len(panels))
    for ax, (title, ylabel, series, sizes, is_gap) in zip(axes, panels):
        for label, pts in series.items():
            xs, ys, errs = zip(*sorted(pts))
            style = styles[label]
            ax.errorbar(xs, ys, yerr=list(zip(*errs)) if is_gap else None, marker=style["marker"],
                        linestyle=style["linestyle"], capsize=3, color=style["color"], label=label)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [fmt_count([s]) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("model size (total parameters)")
        ax.set_ylabel(ylabel)
        if is_gap:
            ax.axhline(0, color="black", linewidth=0.8)
        _title(ax, title)
    return _finish(fig, axes, "Scaling with model size")


def _variant_arms(t: Table) -> list[tuple[Arm, list[dict]]]:
    return [(a, e) for a in t.arms if a.method != "base" and (e := variant_entries(a))]


def _n_axis(ax, arms: list[tuple[Arm, list[dict]]]) -> None:
    """N on a log2 axis, ticked at the measured counts."""
    ns = sorted({e["n"] for a, entries in arms if a.method != "full" for e in entries}
                or {e["n"] for _, entries in arms for e in entries})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_variants_memory(tables: list[Table]) -> Figure | None:
    """Memory to serve N variants against N: one base + N adapters (measured) and N merged models
    (N x the checkpoint), one line per arm and strategy."""
    panels = [(t, arms) for t in tables if (arms := _variant_arms(t))]
    if not panels:
        return None
    styles = arm_styles([t for t, _ in panels])
    fig, axes = figure(len(panels))
    for ax, (t, arms) in zip(axes, panels):
        for a, entries in arms:
            style = styles[a.label]
            adapters = [(e["n"], e["resident_bytes"]) for e in entries if e.get("resident_bytes") is not None]
            if adapters:
                ax.plot(*zip(*adapters), color=style["color"], marker=style["marker"], linestyle="-",
                        label=f"one base + N adapters (measured): {a.label}")
            merged = [(e["n"], e["merged_bytes"]) for e in entries if e.get("merged_bytes") is not None]
            checkpoint = a.values("full_checkpoint_bytes")
            if a.method == "full" and checkpoint:  # N checkpoints at every N the panel's arms served
                served = {e["n"] for b, es in arms if b.method != "full" for e in es} or {e["n"] for e in entries}
                merged = [(n, n * checkpoint[0]) for n in sorted(served)]
            if merged and (a.method == "full" or adapters):
                ax.plot(*zip(*merged), color=style["color"], marker=style["marker"], linestyle=":", alpha=0.8,
                        label=f"N {'checkpoints' if a.method == 'full' else 'merged models'} (computed): {a.label}")
        _n_axis(ax, arms)
        ax.set_yscale("log", base=2)  # ticks at 256 MiB, 512 MiB, 1 GiB, ...
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes([v])))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("variants served (N)")
        measures = sorted({(r["metrics"].get("variants_settings") or {}).get("memory_measure") for a, _ in arms
                           for r in a.ok if r["metrics"].get("variants_settings")} - {None})
        ax.set_ylabel(f"memory ({' / '.join(measures) or 'computed'})")
        _title(ax, t.title)
    return _finish(fig, axes, "Memory to serve N variants: one base + N adapters vs N merged models")


def plot_variants_latency(tables: list[Table]) -> Figure | None:
    """A mixed batch (request i for variant i mod N) against the same batch on one merged model:
    the prefill and per-token decode ratios with their paired 95% intervals, against N."""
    panels = [(t, arms) for t in tables
              if (arms := [(a, e) for a, e in _variant_arms(t) if any(x.get("mixed_vs_merged_prefill") for x in e)])]
    if not panels:
        return None
    styles = arm_styles([t for t, _ in panels])
    fig, axes = figure(len(panels))
    for ax, (t, arms) in zip(axes, panels):
        ax.axhline(1.0, color="black", linewidth=0.8, label="merged model, same batch (= 1)")
        for a, entries in arms:
            style = styles[a.label]
            for phase, ls in (("prefill", "-"), ("decode", "--")):
                pts = [(e["n"], r["ratio"], r["ci"]) for e in entries
                       if (r := e.get(f"mixed_vs_merged_{phase}")) and r.get("ratio") is not None]
                if not pts:
                    continue
                ns, ratios, cis = zip(*pts)
                err = [[r - (c[0] if c[0] is not None else r) for r, c in zip(ratios, cis)],
                       [(c[1] if c[1] is not None else r) - r for r, c in zip(ratios, cis)]]
                ax.errorbar(ns, ratios, yerr=err, color=style["color"], marker=style["marker"], linestyle=ls,
                            capsize=3, label=f"mixed batch, {phase}: {a.label}")
        _n_axis(ax, arms)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"×{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"×{v:g}"))
        ax.set_xlabel("variants in the batch (N)")
        ax.set_ylabel("latency ratio to the merged model")
        _title(ax, t.title)
    return _finish(fig, axes, "Serving N variants in one batch: latency vs one merged model (95% intervals)")


def plot_validation_vs_lr(tables: list[Table]) -> Figure | None:
    """Each tuned method's validation figure against its learning rate (95% intervals), the
    chosen rate ringed (harness.report.tuned)."""
    panels = [(t, t.choices) for t in tables if t.choices]
    if not panels:
        return None
    fig, axes = figure(len(panels))
    for ax, (t, found) in zip(axes, panels):
        kind = found[0].score["kind"]
        scale = 100 if kind == "accuracy" else 1
        for c in found:
            color = method_color(c.method)
            rates = [r for r, _, _ in c.candidates]
            means = [s["mean"] * scale for _, _, s in c.candidates]
            err = [[(s["mean"] - (s["ci"][0] if s["ci"][0] is not None else s["mean"])) * scale
                    for _, _, s in c.candidates],
                   [((s["ci"][1] if s["ci"][1] is not None else s["mean"]) - s["mean"]) * scale
                    for _, _, s in c.candidates]]
            ax.errorbar(rates, means, yerr=err, color=color, marker="o", capsize=3, label=arm_label(c.method, c.rank))
            ax.plot([c.rate], [c.score["mean"] * scale], marker="o", markersize=14, markerfacecolor="none",
                    markeredgecolor=color, linestyle="none", label=f"chosen rate: {arm_label(c.method, c.rank)}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation accuracy (%)" if kind == "accuracy" else "validation held-out loss (nats/token)")
        _title(ax, t.title)
    return _finish(fig, axes, "Validation figure against learning rate, chosen rates ringed (95% intervals)")


PLOTS: tuple[tuple[str, str, Callable[[list[Table]], Figure | None]], ...] = (
    ("peak_memory.png", "Peak training memory by arm and rank", plot_peak_memory),
    ("mmlu_by_rank.png", "MMLU accuracy by rank, with full fine-tuning and base model as references (95% intervals)",
     plot_accuracy_by_rank),
    ("indomain_by_rank.png", "In-domain accuracy by rank, with full fine-tuning and base model as references "
     "(95% intervals)", partial(plot_accuracy_by_rank, task="indomain")),
    ("learning_vs_forgetting.png", "Learning vs forgetting per arm (95% intervals of the forgetting)",
     plot_learning_vs_forgetting),
    ("cost_vs_accuracy.png", "Cost vs accuracy, one panel per task (95% intervals): the cheapest arm is boxed; an "
     "arm is circled as a lead only where it beats every cheaper arm beyond the noise", plot_cost_vs_accuracy),
    ("memory_breakdown.png", "Training memory breakdown", plot_memory_breakdown),
    ("loss_curves.png", "Training loss curves", plot_loss_curves),
    ("scaling.png", "Scaling with model size", plot_scaling),
    ("validation_vs_lr.png", "Validation figure against learning rate per method (95% intervals); the rate each "
     "method's validation chose is ringed, and the tuned table compares those best against best",
     plot_validation_vs_lr),
    ("variants_memory.png", "Memory to serve N variants: one base + N adapters (measured) vs N merged models "
     "(N x the checkpoint)", plot_variants_memory),
    ("variants_latency.png", "A mixed batch of N variants vs the same batch on one merged model: prefill and "
     "per-token decode ratios (paired 95% intervals)", plot_variants_latency),
)


def draw(plot: Callable[[list[Table]], Figure | None], tables: list[Table], path: Path) -> Path | None:
    """One plot in the report's style, saved to ``path`` (None, nothing written, without data)."""
    with rc_context(STYLE):
        fig = plot(tables)
        if fig is None:
            return None
        # no Software/date metadata: the same results give the same file
        fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path
