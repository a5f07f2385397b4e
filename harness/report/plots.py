"""The report's plots: one figure helper (one width, panel height, dpi and style for all), six plots.

Every figure is FIG_W inches wide at DPI (1000 px): panels two a row, the legend in a fixed
column on the right, so the page shows every plot at the same scale. The object-oriented Figure
API renders with Agg and leaves pyplot's global backend alone, so the run stage can build a report
in its own process without side effects. Accuracies are drawn with their 95% intervals
(harness.stats); the Pareto front crowns an arm only where its lead is outside the noise.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from matplotlib import colormaps, rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from harness.report.fmt import fmt_count
from harness.report.tables import METHOD_LABEL, Arm, Table, _arm_sort, arm_label, memory_measure
from harness.stats import accuracy_difference, mean_sd, unpaired_difference

FIG_W, PANEL_H, LEGEND_W, DPI = 10.0, 3.2, 2.3, 100
STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "savefig.facecolor": "white",
}
BREAKDOWN = ("parameters", "gradients", "optimizer_state", "activations", "other")
METHOD_COLOR = {"full": "tab:red", "lora": "tab:blue", "qlora": "tab:green", "base": "tab:gray"}
OTHER_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


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


def _finish(fig: Figure, axes: list, title: str, path: Path) -> Path:
    """One legend (entries merged over panels) in the legend column, the title, then save."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), [textwrap.fill(label, 30) for label in entries], loc="upper left",
                   bbox_to_anchor=(1 - (LEGEND_W - 0.15) / FIG_W, axes[0].get_position().y1), frameon=False)
    fig.suptitle(title)
    # no Software/date metadata: the same results give the same file
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def _method_colors(tables: list[Table]) -> dict[str, str]:
    others = sorted({a.method for t in tables for a in t.arms if a.method not in METHOD_COLOR})
    return METHOD_COLOR | {m: OTHER_COLORS[i % len(OTHER_COLORS)] for i, m in enumerate(others)}


def _arm_colors(tables: list[Table]) -> dict[str, tuple]:
    """One color per arm label, the same in every panel."""
    arms = sorted({(a.method, a.rank) for t in tables for a in t.arms}, key=_arm_sort)
    palette = colormaps["tab10"].colors + colormaps["tab20"].colors[1::2]  # strong colors first
    return {arm_label(*arm): palette[i % len(palette)] for i, arm in enumerate(arms)}


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


FRONT, WITHIN_NOISE, DOMINATED = "front", "within noise", "dominated"


def front_status(points: Sequence[tuple[float, float]], lead_significant: Callable[[int, int], bool]) -> list[str]:
    """Per point: FRONT when it is more accurate than every point at most as costly, and
    ``lead_significant(it, other)`` for each of them (the cheapest point has none to beat);
    DOMINATED when one of them is at least as accurate; WITHIN_NOISE when its lead over one of them
    is inside the noise (neither dominates)."""
    status = []
    for j, (cost, acc) in enumerate(points):
        cheaper = [i for i, (c, a) in enumerate(points) if i != j and c <= cost]
        if any(points[i][1] >= acc and points[i] != points[j] for i in cheaper):  # an equal point: within noise
            status.append(DOMINATED)
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
    accuracy: dict  # stats.accuracy_interval on MMLU
    label: str


def cost_points(tables: list[Table]) -> list[CostPoint]:
    several = len(tables) > 1
    return [
        CostPoint(t, a, mean_sd(a.values("cost_usd"))[0], a.accuracy["mmlu"],
                  f"{t.key[0]} ({t.key[2]}): {a.label}" if several else a.label)
        for t in tables for a in t.arms
        if a.values("cost_usd") and a.accuracy.get("mmlu")
    ]


def lead_significant(a: CostPoint, b: CostPoint) -> bool:
    """Is ``a`` more accurate than ``b`` beyond the noise? Arms of one table: the paired
    difference over the questions and seeds they share; otherwise (or without a shared seed) the
    unpaired difference of the two accuracy intervals."""
    diff = None
    if a.table is b.table:
        diff = accuracy_difference(a.arm.ok, b.arm.ok, "mmlu", a.table.items)
    if diff is None:
        diff = unpaired_difference(a.accuracy, b.accuracy)
    return diff["significant"] and diff["diff"] > 0


def cost_front(tables: list[Table]) -> list[tuple[CostPoint, str]]:
    """The points of the cost-vs-accuracy plot with their front status."""
    points = cost_points(tables)
    xy = [(p.cost, p.accuracy["mean"]) for p in points]
    return list(zip(points, front_status(xy, lambda j, i: lead_significant(points[j], points[i]))))


# ---------------------------------------------------------------- plots


def plot_peak_memory(tables: list[Table], path: Path) -> Path | None:
    panels = [t for t in tables if any(a.values("peak_memory_bytes") for a in t.arms if a.method != "base")]
    if not panels:
        return None
    colors = _method_colors(tables)
    fig, axes = figure(len(panels), tick_room=1.5)
    for ax, t in zip(axes, panels):
        arms = [a for a in t.arms if a.method != "base"]
        stats = [mean_sd([v / 2**30 for v in a.values("peak_memory_bytes")]) if a.values("peak_memory_bytes")
                 else None for a in arms]
        top = max(s[0] for s in stats if s)
        done = [x for x, s in enumerate(stats) if s]
        ax.bar(done, [stats[x][0] for x in done], yerr=[stats[x][1] or 0 for x in done], capsize=3,
               color=[colors[arms[x].method] for x in done])
        for x, a in enumerate(arms):
            if stats[x] is None:
                # nothing measured: a hatched placeholder says why instead of a silent gap
                oom = any(r["status"] == "oom" for r in a.runs)
                ax.bar(x, top, color="none", edgecolor=colors[a.method], hatch="//", label="did not finish")
                ax.text(x, top / 2, "OOM" if oom else "failed", ha="center", va="center", rotation=90, fontsize=8)
        for method in dict.fromkeys(arms[x].method for x in done):  # legend: one patch per method
            ax.bar(0, 0, color=colors[method], label=METHOD_LABEL.get(method, method))
        ax.set_xticks(range(len(arms)), [a.label for a in arms], rotation=45, ha="right")
        measures = sorted({m for a in arms for r in a.ok if r["metrics"].get("peak_memory_bytes") is not None
                           and (m := memory_measure(r))})
        ax.set_ylabel(f"peak training memory, {' / '.join(measures) or 'unknown measure'} (GiB)")
        _title(ax, t.title)
    return _finish(fig, axes, "Peak training memory by arm and rank (mean ± sd over seeds)", path)


TASK_LABEL = {"mmlu": "MMLU", "indomain": "in-domain"}


def plot_accuracy_by_rank(tables: list[Table], path: Path, task: str = "mmlu") -> Path | None:
    panels = [t for t in tables if any(a.rank is not None and a.accuracy.get(task) for a in t.arms)]
    if not panels:
        return None
    colors = _method_colors(tables)
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
                        color=colors[method], label=METHOD_LABEL.get(method, method))
        for a in t.arms:
            if a.method in ("full", "base") and (acc := a.accuracy.get(task)):
                ax.axhline(acc["mean"] * 100, color=colors[a.method], linestyle="-" if a.method == "full" else "--",
                           label=a.label)
                if acc["ci_low"] is not None:
                    ax.axhspan(acc["ci_low"] * 100, acc["ci_high"] * 100, color=colors[a.method], alpha=0.12)
        ranks = sorted({a.rank for a in ranked})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        if len(ranks) == 1:  # else the axis spans only the sideways nudge
            ax.set_xlim(ranks[0] / 2, ranks[0] * 2)
        ax.minorticks_off()
        ax.set_xlabel("rank")
        ax.set_ylabel(f"{TASK_LABEL[task]} accuracy (%)")
        _title(ax, t.title)
    return _finish(fig, axes, f"{TASK_LABEL[task]} accuracy by rank (mean over seeds; bars and bands: 95% interval)",
                   path)


def plot_learning_vs_forgetting(tables: list[Table], path: Path) -> Path | None:
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
    colors = _arm_colors(tables)
    fig, axes = figure(len(panels))
    for ax, t in zip(axes, panels):
        ylabel = ""
        for a in t.arms:
            row, y = t.forgetting.get(a.key), learned(a)
            if row is None or y is None:
                continue
            xerr = ([[row["gap"] - row["ci_low"]], [row["ci_high"] - row["gap"]]] if row["ci_low"] is not None
                    else None)
            ax.errorbar([row["gap"]], [y[0]], xerr=xerr, marker="o", capsize=3, color=colors[arm_label(a.method, a.rank)], label=a.label)
            ylabel = y[1]
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("forgetting: general-text loss rise over the base model (nats/token)")
        ax.set_ylabel(ylabel)
        _title(ax, t.title)
    return _finish(fig, axes, "Learning vs forgetting per arm (up: learned more; right: forgot more)", path)





def plot_cost_vs_accuracy(tables: list[Table], path: Path) -> Path | None:
    points = cost_front(tables)
    if not points:
        return None
    colors = _method_colors(tables)
    fig, (ax,) = figure(1, tick_room=0.7)
    for p, _ in points:
        ax.errorbar([p.cost], [p.accuracy["mean"] * 100], yerr=_errors([p.accuracy]), fmt="o", capsize=3,
                    color=colors[p.arm.method], label=METHOD_LABEL.get(p.arm.method, p.arm.method), zorder=3)
    front = sorted((p for p, s in points if s == FRONT), key=lambda p: p.cost)
    noise = [p for p, s in points if s == WITHIN_NOISE]
    ax.plot([p.cost for p in front], [p.accuracy["mean"] * 100 for p in front], color="black",
            drawstyle="steps-post", linewidth=1, zorder=2)
    ax.scatter([p.cost for p in front], [p.accuracy["mean"] * 100 for p in front], s=160, facecolors="none",
               edgecolors="black", label="Pareto front (lead beyond the 95% noise)", zorder=4)
    if noise:
        ax.scatter([p.cost for p in noise], [p.accuracy["mean"] * 100 for p in noise], s=160, facecolors="none",
                   edgecolors="gray", linestyles="--", label="lead within the noise: not on the front", zorder=4)
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
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:g}"))
    ax.set_xlabel("cost per run (USD)")
    ax.set_ylabel("MMLU accuracy (%)")
    return _finish(fig, [ax], "Cost vs MMLU accuracy per arm (mean over seeds, 95% interval); circled: Pareto front",
                   path)


def plot_memory_breakdown(tables: list[Table], path: Path) -> Path | None:
    def breakdown(a: Arm) -> dict[str, float] | None:
        parts = [p for r in a.ok if isinstance(p := r["metrics"].get("memory_breakdown_bytes"), dict)]
        if not parts:
            return None
        return {k: mean_sd([p.get(k) or 0 for p in parts])[0] / 2**30 for k in BREAKDOWN}

    panels = [(t, [(a, b) for a in t.arms if (b := breakdown(a))]) for t in tables]
    panels = [(t, arms) for t, arms in panels if arms]
    if not panels:
        return None
    colors = dict(zip(BREAKDOWN, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:gray")))
    fig, axes = figure(len(panels), tick_room=1.5)
    for ax, (t, arms) in zip(axes, panels):
        bottoms = [0.0] * len(arms)
        for part in BREAKDOWN:
            heights = [b[part] for _, b in arms]
            ax.bar(range(len(arms)), heights, bottom=bottoms, color=colors[part], label=part.replace("_", " "))
            bottoms = [x + h for x, h in zip(bottoms, heights)]
        ax.set_xticks(range(len(arms)), [a.label for a, _ in arms], rotation=45, ha="right")
        ax.set_ylabel("training memory (GiB)")
        _title(ax, t.title)
    return _finish(fig, axes, "Training memory breakdown (mean over seeds)", path)


def plot_loss_curves(tables: list[Table], path: Path) -> Path | None:
    panels = [t for t in tables if any(r["metrics"].get("loss_curve") for a in t.arms for r in a.ok)]
    if not panels:
        return None
    colors = _arm_colors(tables)
    fig, axes = figure(len(panels))
    for ax, t in zip(axes, panels):
        for a in t.arms:
            for r in a.ok:  # one line per seed, one legend entry per arm
                if curve := r["metrics"].get("loss_curve") or []:
                    ax.plot([p[0] for p in curve], [p[1] for p in curve], color=colors[a.label], linewidth=1,
                            alpha=0.8, label=a.label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        _title(ax, t.title)
    return _finish(fig, axes, "Training loss curves (one line per seed)", path)


def _model_size(t: Table) -> float | None:
    sizes = [s for r in t.runs if (s := (r.get("model") or {}).get("total_params") or r["metrics"].get("total_params"))]
    return max(sizes) if sizes else None


def plot_scaling(tables: list[Table], path: Path) -> Path | None:
    """Peak memory and MMLU gap (with its 95% interval) against model size, one line per arm; a
    pair of panels per data set and hardware (only those that ran more than one model size)."""
    by_setting: dict[tuple[str, str], list[tuple[float, Table]]] = defaultdict(list)
    for t in tables:
        if size := _model_size(t):
            by_setting[(t.key[1], t.key[2])].append((size, t))
    settings = [k for k in sorted(by_setting) if len({s for s, _ in by_setting[k]}) > 1]
    if not settings:
        return None
    colors = _arm_colors(tables)
    fig, axes = figure(2 * len(settings))
    for (data, hardware), ax_mem, ax_gap in zip(settings, axes[::2], axes[1::2]):
        memory: dict[str, list] = defaultdict(list)
        gap: dict[str, list] = defaultdict(list)
        sizes = set()
        for size, t in sorted(by_setting[(data, hardware)], key=lambda st: (st[0], st[1].key)):
            sizes.add(size)
            for a in t.arms:
                if a.method != "base" and a.values("peak_memory_bytes"):
                    memory[a.label].append((size, mean_sd(a.values("peak_memory_bytes"))[0] / 2**30, (0.0, 0.0)))
                if (g := t.gaps.get((a.key, "mmlu"))) is not None:
                    # the table's interval (asymmetric where Newcombe's floor sets it)
                    below, above = ((g["gap"] - g["ci_low"]) * 100, (g["ci_high"] - g["gap"]) * 100) \
                        if g["ci_low"] is not None else (0.0, 0.0)
                    gap[a.label].append((size, g["gap"] * 100, (below, above)))
        for ax, series, ylabel in ((ax_mem, memory, "peak training memory (GiB)"),
                                   (ax_gap, gap, "MMLU gap vs full FT (pp, 95% interval)")):
            for label, pts in series.items():
                xs, ys, errs = zip(*pts)
                ax.errorbar(xs, ys, yerr=list(zip(*errs)) if ax is ax_gap else None, marker="o", capsize=3, color=colors[label],
                            label=label)
            ax.set_xscale("log")
            ax.set_xticks(sorted(sizes), [fmt_count([s]) for s in sorted(sizes)])
            ax.minorticks_off()
            ax.set_xlabel("model size (total parameters)")
            ax.set_ylabel(ylabel)
        ax_gap.axhline(0, color="black", linewidth=0.8)
        _title(ax_mem, f"Peak memory, {data} ({hardware})")
        _title(ax_gap, f"MMLU gap (negative: PEFT worse), {data} ({hardware})")
    return _finish(fig, axes, "Scaling with model size", path)


PLOTS: tuple[tuple[str, str, Callable[[list[Table], Path], Path | None]], ...] = (
    ("peak_memory.png", "Peak training memory by arm and rank", plot_peak_memory),
    ("mmlu_by_rank.png", "MMLU accuracy by rank, with full fine-tuning and base model as references (95% intervals)",
     plot_accuracy_by_rank),
    ("indomain_by_rank.png", "In-domain accuracy by rank, with full fine-tuning and base model as references "
     "(95% intervals)", partial(plot_accuracy_by_rank, task="indomain")),
    ("learning_vs_forgetting.png", "Learning vs forgetting per arm (95% intervals of the forgetting)",
     plot_learning_vs_forgetting),
    ("cost_vs_accuracy.png", "Cost vs accuracy (95% intervals); the Pareto front is circled where an arm's lead is "
     "beyond the noise", plot_cost_vs_accuracy),
    ("memory_breakdown.png", "Training memory breakdown", plot_memory_breakdown),
    ("loss_curves.png", "Training loss curves", plot_loss_curves),
    ("scaling.png", "Scaling with model size", plot_scaling),
)


def draw(plot: Callable[[list[Table], Path], Path | None], tables: list[Table], path: Path) -> Path | None:
    """One plot in the report's style."""
    with rc_context(STYLE):
        return plot(tables, path)
