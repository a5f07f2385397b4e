"""The tuned comparison: each method at the learning rate its validation figure chose, best against best.

Within one report table, the arms of one method that differ only in ``learning_rate`` are one
grid (``tune=lr`` runs them; arms of a fixed-rate sweep at other rates count too). For each grid
the rate with the best mean validation figure over seeds wins: the validation split's accuracy
(``validation_indomain``, higher is better) or, for generative data, its held-out loss (lower is
better). The test figures never enter the choice. Where full fine-tuning has several rates, the
chosen one is the reference of every gap in the table (``tables.Table.reference_ids``), so the chosen PEFT arm's
gap is best against best, with the paired interval of every gap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from harness import identity
from harness.stats import accuracy_difference, accuracy_interval, interval95, mean_sd

VALIDATION_ACC = "validation_indomain"
VALIDATION_LOSS = "validation_heldout_loss"
# LoRA's best learning rate is about 10x full fine-tuning's (Schulman et al. 2025, "LoRA Without
# Regret"; Biderman et al. 2024, "LoRA Learns Less and Forgets Less", tuned both arms' rates)
PUBLISHED_RATIO = 10


def learning_rate(runs: list[dict]) -> float:
    return float(runs[0]["config"]["method"]["learning_rate"])


def family(record: dict) -> tuple:
    """A grid: the method, its rank and every method setting but the rate."""
    settings = {k: v for k, v in identity.arm_config(record).items() if k not in ("learning_rate", "lr_grid")}
    return record["method"], record.get("rank"), json.dumps(settings, sort_keys=True, default=str)


def validation_score(runs: list[dict], items) -> dict | None:
    """The mean validation figure over the ok ``runs`` with its 95% interval: accuracy (paired
    per question, as every accuracy) or held-out loss; None without a validation figure."""
    acc = accuracy_interval(runs, VALIDATION_ACC, items)
    if acc is not None:
        return {"kind": "accuracy", "mean": acc["mean"], "ci": [acc["ci_low"], acc["ci_high"]], "higher": True}
    ok = [r for r in runs if r.get("status") == "ok" and (r["metrics"].get(VALIDATION_LOSS) is not None)]
    if not ok:
        return None
    mean, sd = mean_sd([r["metrics"][VALIDATION_LOSS] for r in ok])
    ses = [r["metrics"].get(f"{VALIDATION_LOSS}_se") for r in ok]
    se = (math.sqrt(sum(s * s for s in ses) / len(ses) / len(ses) + (sd or 0.0) ** 2 / len(ok))
          if all(s is not None for s in ses) else None)
    low, high = interval95(mean, se)
    return {"kind": "held-out loss", "mean": mean, "ci": [low, high], "higher": False}


@dataclass
class Choice:
    """One grid's outcome: ``candidates`` are (rate, arm, score), by rate."""

    method: str
    rank: int | None
    candidates: list[tuple[float, object, dict]]
    chosen: object  # tables.Arm
    rate: float
    score: dict
    runner_up: tuple[float, object, dict] | None
    runner_up_diff: dict | None  # chosen - runner-up on validation (accuracy: paired per question and seed)
    tied: list[float] = field(default_factory=list)  # rates with the chosen one's exact validation figure

    @property
    def edge(self) -> bool:
        """The winner is the lowest or the highest rate tried: the best may lie outside the grid."""
        rates = [c[0] for c in self.candidates]
        return self.rate in (min(rates), max(rates))

    @property
    def within_noise(self) -> bool | None:
        d = self.runner_up_diff
        if d is None or d.get("ci_low") is None:
            return None
        return d["ci_low"] <= 0 <= d["ci_high"]


def choices(arms: list, items) -> list[Choice]:
    """Every grid of two or more rates with validation figures, its rate chosen on validation."""
    grids: dict[tuple, list] = {}
    for arm in arms:
        if arm.method == "base" or not arm.ok:
            continue
        grids.setdefault(family(arm.ok[0]), []).append(arm)
    out = []
    for members in grids.values():
        scored = [(learning_rate(a.ok), a, s) for a in members if (s := validation_score(a.ok, items)) is not None]
        if len({r for r, _, _ in scored}) < 2:
            continue
        scored.sort(key=lambda c: c[0])
        sign = 1 if scored[0][2]["higher"] else -1
        best = max(sign * c[2]["mean"] for c in scored)
        # a tie at the top (a saturated validation split: several rates at 100%) goes to the rate
        # nearest the grid's middle: the edge of a grid is where the best may lie outside it
        middle = (len(scored) - 1) / 2
        tied = sorted((i for i, c in enumerate(scored) if sign * c[2]["mean"] == best),
                      key=lambda i: (abs(i - middle), i))
        ranked = [scored[i] for i in tied] + sorted((c for i, c in enumerate(scored) if i not in tied),
                                                     key=lambda c: sign * c[2]["mean"], reverse=True)
        (rate, arm, score), runner = ranked[0], ranked[1]
        diff = _difference(arm, runner[1], score, runner[2], items)
        out.append(Choice(arm.method, arm.rank, scored, arm, rate, score, runner, diff,
                          sorted(scored[i][0] for i in tied) if len(tied) > 1 else []))
    return out


def _difference(a, b, score_a: dict, score_b: dict, items) -> dict | None:
    if score_a["kind"] == "accuracy":
        return accuracy_difference(a.ok, b.ok, VALIDATION_ACC, items)
    lo_a, lo_b = score_a["ci"], score_b["ci"]
    if None in lo_a or None in lo_b:
        return {"diff": score_a["mean"] - score_b["mean"], "ci_low": None, "ci_high": None}
    se = math.hypot((lo_a[1] - lo_a[0]) / 3.92, (lo_b[1] - lo_b[0]) / 3.92)  # the two intervals' se
    low, high = interval95(score_a["mean"] - score_b["mean"], se)
    return {"diff": score_a["mean"] - score_b["mean"], "ci_low": low, "ci_high": high}


def chosen_records(records: list[dict], results_dir) -> list[dict]:
    """``records`` with, in every table, only the validation-chosen arm of each grid (arms of one
    rate, and base-model records, stay): what ``harness-check --tuned`` judges, best against best."""
    from pathlib import Path

    from harness.report.tables import group

    dropped: set[str] = set()
    for table in group([r for r in records if r.get("status") == "ok"], Path(results_dir)):
        for c in table.choices:
            dropped |= {r["run_id"] for _, arm, _ in c.candidates if arm is not c.chosen for r in arm.runs}
    return [r for r in records if r["run_id"] not in dropped]


def _score_text(s: dict) -> str:
    if s["kind"] == "accuracy":
        ci = "" if s["ci"][0] is None else f" [{s['ci'][0] * 100:.1f}, {s['ci'][1] * 100:.1f}]"
        return f"acc {s['mean'] * 100:.1f}%{ci}"
    ci = "" if s["ci"][0] is None else f" [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
    return f"loss {s['mean']:.3f}{ci}"


def _diff_text(c: Choice) -> str:
    d = c.runner_up_diff
    if d is None:
        return "—"
    scale, unit = (100, " pp") if c.score["kind"] == "accuracy" else (1, "")
    ci = "" if d.get("ci_low") is None else f" [{d['ci_low'] * scale:+.2f}, {d['ci_high'] * scale:+.2f}]"
    verdict = {True: "inside the noise", False: "beyond the noise", None: "noise not estimated"}[c.within_noise]
    return f"lr {c.runner_up[0]:g}: {d['diff'] * scale:+.2f}{unit}{ci}, {verdict}"


def _gap_text(table, c: Choice, task: str) -> str:
    from harness.report.verdict import gap_pp_of, gap_text

    if c.method == "full":
        return "reference"
    g = table.gaps.get((c.chosen.key, task))
    return "—" if g is None else gap_text(gap_pp_of(g))


def section(table) -> dict | None:
    """The table's tuned comparison (``header``, ``rows``, ``notes``); None where no method has a grid."""
    from harness.identity import arm_label
    from harness.report.tables import TASK_LABEL
    from harness.stats import record_tasks

    found = table.choices
    if not found:
        return None
    tasks = [t for t in record_tasks(table.runs) if any((c.chosen.key, t) in table.gaps for c in found)]
    header = ["method", "rates tried", "chosen rate (validation)", "runner-up: chosen − runner-up",
              *(f"test gap vs full FT, {TASK_LABEL.get(t, t)} (95% CI)" for t in tasks)]
    rows = [[arm_label(c.method, c.rank), ", ".join(f"{r:g}" for r, _, _ in c.candidates),
             f"{c.rate:g}: {_score_text(c.score)}", _diff_text(c), *(_gap_text(table, c, t) for t in tasks)]
            for c in found]
    full = next((c for c in found if c.method == "full"), None)
    notes = []
    for c in found:
        if c.tied:
            notes.append(f"{arm_label(c.method, c.rank)}: rates {', '.join(f'{r:g}' for r in c.tied)} tie on validation "
                         f"({_score_text(c.score)}): the one nearest the grid's middle is taken; a validation split "
                         "that separates them needs harder or more questions (data.n_validation)")
        if c.edge:
            notes.append(f"{arm_label(c.method, c.rank)}: the chosen rate {c.rate:g} is at the edge of the grid "
                         f"({c.candidates[0][0]:g}–{c.candidates[-1][0]:g}): extend the grid (method.lr_grid)")
        if full is not None and c.method != "full":
            notes.append(f"{arm_label(c.method, c.rank)} / full FT chosen rates: {c.rate:g} / {full.rate:g} = "
                         f"{c.rate / full.rate:.3g}× (published: about {PUBLISHED_RATIO}×)")
    if full is None:
        notes.append("full FT ran at one rate, or not at all: the PEFT arms' gaps are against it, not a tuned full FT")
    # chosen PEFT arms against each other (attention-only vs all-linear LoRA): paired on the test split
    peft = [c for c in found if c.method != "full"]
    for i, a in enumerate(peft):
        for b in peft[i + 1:]:
            pa, pb = (c.chosen.ok[0]["metrics"].get("trainable_params") for c in (a, b))
            if pa and pb:  # "at matched parameters" is a claim to check, not to assume
                notes.append(f"{arm_label(a.method, a.rank)} and {arm_label(b.method, b.rank)} train {pa / 1e6:.2f}M "
                             f"and {pb / 1e6:.2f}M parameters ({100 * abs(pa - pb) / max(pa, pb):.1f}% apart)")
            for t in record_tasks(table.runs):
                d = accuracy_difference(a.chosen.ok, b.chosen.ok, t, table.items)
                if d is not None and d["ci_low"] is not None:
                    notes.append(f"{arm_label(a.method, a.rank)} − {arm_label(b.method, b.rank)} at their chosen rates, "
                                 f"{TASK_LABEL.get(t, t)}: {d['diff'] * 100:+.2f} pp [{d['ci_low'] * 100:+.2f}, "
                                 f"{d['ci_high'] * 100:+.2f}]" + (" (beyond the noise)" if d["significant"] else
                                                                 " (inside the noise)"))
    return {"title": "Tuned: each method at its best rate on validation, best against best",
            "header": header, "rows": rows, "notes": notes}
