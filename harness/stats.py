"""Paired accuracy-gap statistics: what PEFT loses against full fine-tuning, with its noise.

The gap of a PEFT arm is ``acc(peft) - acc(full)`` (negative: PEFT is worse). Both arms of a fair
pair (equal ``pair_key``) answer the same questions, so the gap is measured *paired*: per
question the difference ``d_i = correct_peft - correct_full`` is -1, 0 or +1, and

    gap = mean(d)              se = sd(d, ddof=1) / sqrt(n)          ci95 = gap -/+ 1.96 se

McNemar's exact test looks only at the discordant questions: ``b`` (PEFT right, full wrong) and
``c`` (PEFT wrong, full right); under "no difference" b ~ Binomial(b + c, 1/2), and the two-sided
p-value is ``min(1, 2 * P(X <= min(b, c)))``. Pairing removes the variance the two arms share
(questions both find easy or hard), so it is much tighter than comparing two accuracies.

When per-question answers are missing for either side the gap falls back to the record metrics,
unpaired: ``se = sqrt(se_peft^2 + se_full^2)`` and no McNemar p-value.

Seeds. k seeds of one comparison group answer the *same* n questions; ``d_si`` is seed s's
paired difference on question i, ``g_s = mean_i d_si`` its gap. Two kinds of noise:

    question noise   which n questions were asked. Shared by every seed, so seeds never shrink
                     it: se_q = sd_i(dbar_i) / sqrt(n), dbar_i = mean_s d_si (with identical
                     seeds this is exactly one seed's se)
    training noise   how far a rerun with another seed moves the gap on the same questions:
                     v_seed = max(s_g^2, w / n), s_g^2 = var_s(g_s) (ddof=1), w = mean_i var_s(d_si)
                     (ddof=1). s_g^2 is the spread across seeds; w / n is the part of it that
                     per-question flips alone explain (a floor with n times more data behind it)
    se of the seed mean   sqrt(se_q^2 + max(0, s_g^2 - w / n) / k): the flips are already in
                     se_q (averaged over the k seeds), what the seeds move together is added

``seed_summary`` returns ``se`` (that), ``se_q``, ``sd`` (= s_g), ``v_seed`` and the 95% interval
``ci_low``/``ci_high``: gap -/+ 1.96 se, never narrower than Newcombe's paired score interval
(``newcombe_paired95``) of the seeds' mean 2x2 table, which does not collapse to a point when the
arms never disagree (both at 100%: se = 0). The gate
(harness/check.py) uses ``v_seed`` with the same questions on both sides, where question noise
cancels.

Timings. ``ratio_interval``: the ratio of two paired timing samples (an adapter variant against
the base model, measured round-robin) with its paired log-ratio t interval.

The report (tables) and the gate (``harness-check``) both call these functions on run records;
neither loads a model.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness import identity
from harness.records import read_items

TASKS = ("mmlu", "indomain")  # the built-in accuracies; lm-eval's other tasks (eval.tasks) follow them
# the validation split's accuracy (tune=lr chooses on it): never a reported gap
VALIDATION_TASKS = ("validation_indomain",)


def task_order(task: str) -> tuple[int, str]:
    return (TASKS.index(task), "") if task in TASKS else (len(TASKS), task)


def task_metric(metrics: dict, task: str, key: str):
    """``<task>_<key>`` of a built-in task, ``tasks.<task>.<key>`` of an lm-eval task (None if absent)."""
    if task in TASKS or task in VALIDATION_TASKS:
        return metrics.get(f"{task}_{key}")
    return ((metrics.get("tasks") or {}).get(task) or {}).get(key)


def record_tasks(records: Iterable[dict]) -> list[str]:
    """TASKS, then every lm-eval task (``metrics.tasks``) some record scored, sorted."""
    extra = {name for r in records for name in ((r.get("metrics") or {}).get("tasks") or {})}
    return [*TASKS, *sorted(extra - set(TASKS))]
Z95 = 1.96
REFERENCE_METHODS = ("full", "base")  # arms that are not PEFT

log = logging.getLogger(__name__)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant answers (1.0 when none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _unpaired(task: str, peft_metrics: dict | None, full_metrics: dict | None) -> dict | None:
    peft_metrics, full_metrics = peft_metrics or {}, full_metrics or {}
    acc_p, acc_f = task_metric(peft_metrics, task, "acc"), task_metric(full_metrics, task, "acc")
    if acc_p is None or acc_f is None:
        return None
    se_p, se_f = task_metric(peft_metrics, task, "stderr"), task_metric(full_metrics, task, "stderr")
    gap = acc_p - acc_f
    se = math.sqrt(se_p**2 + se_f**2) if se_p is not None and se_f is not None else None
    return {
        "gap": gap,
        "se": se,
        "ci_low": gap - Z95 * se if se is not None else None,
        "ci_high": gap + Z95 * se if se is not None else None,
        "mcnemar_p": None,
        "n": None,  # no shared questions were counted
        "b": None,
        "c": None,
        "paired": False,
        "peft_acc": acc_p,
        "full_acc": acc_f,
    }


def paired_gap(
    peft_items: Iterable[dict],
    full_items: Iterable[dict],
    task: str,
    peft_metrics: dict | None = None,
    full_metrics: dict | None = None,
) -> dict | None:
    """Gap ``acc(peft) - acc(full)`` on ``task`` over the questions both arms answered.

    Items are the per-question answers of ``records.read_items``, aligned on ``id``. When either
    side has no items for ``task`` (or they share no question), the gap is computed unpaired from
    ``peft_metrics``/``full_metrics`` (the records' ``metrics``). Returns None when neither is
    available. ``peft_acc``/``full_acc`` are over the shared questions when paired, so that
    ``gap == peft_acc - full_acc`` always holds.
    """
    peft = {str(it["id"]): bool(it["correct"]) for it in peft_items if it.get("task") == task}
    full = {str(it["id"]): bool(it["correct"]) for it in full_items if it.get("task") == task}
    shared = sorted(peft.keys() & full.keys())
    if not shared:
        if peft and full:
            log.warning("%s: the arms share no question id; falling back to unpaired", task)
        return _unpaired(task, peft_metrics, full_metrics)

    n = len(shared)
    diffs = [int(peft[q]) - int(full[q]) for q in shared]
    b = sum(d == 1 for d in diffs)
    c = sum(d == -1 for d in diffs)
    gap = sum(diffs) / n
    # sample sd (ddof=1), as lm-eval's acc stderr; undefined for a single question
    se = math.sqrt(sum((d - gap) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {
        "gap": gap,
        "se": se,
        "ci_low": gap - Z95 * se if se is not None else None,
        "ci_high": gap + Z95 * se if se is not None else None,
        "mcnemar_p": mcnemar_exact_p(b, c),
        "n": n,
        "b": b,
        "c": c,
        "paired": True,
        "peft_acc": sum(peft[q] for q in shared) / n,
        "full_acc": sum(full[q] for q in shared) / n,
    }


def comparable_key(record: dict, reference: dict) -> str:
    """Readable, unique name of the comparison group of ``record``'s gap against ``reference``."""
    return identity.gap_label(record, reference)


def _lm_eval_version(record: dict) -> str | None:
    return ((record.get("env") or {}).get("versions") or {}).get("lm_eval")


def _seed(record: dict) -> Any:
    return (record.get("config") or {}).get("seed")


def pair_gaps(records: Iterable[dict], results_dir: str | Path, references: Iterable[str] = ()) -> list[dict]:
    """One gap per (ok PEFT run with an ok full run of equal pair_key, task with accuracy).

    The full run of a pair_key must be unique (identity.full_references); where several full runs
    with other settings share one, its PEFT runs get no gap (a warning says so) unless
    ``references`` names the one to use. Each gap carries its comparison group (``group``: hash,
    ``key``: label) and, when paired, the per-question answers of both arms (``answers``).
    Ordered by group, seed, task and run id, so reports and baselines are stable.
    """
    records = [r for r in records if r.get("status") == "ok"]
    full_by_pair, ambiguous = identity.full_references(records, references)
    for run_ids in sorted(ambiguous.values()):
        log.warning("several full fine-tuning runs share one pair (%s); name one as the reference", ", ".join(run_ids))

    gaps = []
    full_items_cache: dict[str, list[dict]] = {}
    for peft in records:
        if peft["method"] in REFERENCE_METHODS:
            continue
        full = full_by_pair.get(peft["pair_key"])
        if full is None:
            continue
        peft_items = read_items(results_dir, peft)
        if full["run_id"] not in full_items_cache:
            full_items_cache[full["run_id"]] = read_items(results_dir, full)
        full_items = full_items_cache[full["run_id"]]
        settings = identity.setting_config(peft["config"])
        for task in record_tasks([peft]):
            gap = paired_gap(peft_items, full_items, task, peft["metrics"], full["metrics"])
            if gap is None:
                continue
            gaps.append(
                {
                    "key": identity.gap_label(peft, full),
                    "group": identity.gap_key(peft, full),
                    "arm": identity.arm_key(peft),
                    "model": identity.model_name(peft),
                    "data": identity.data_name(peft),
                    "eval": settings.get("eval") or {},
                    "settings": {**settings, "method": identity.arm_config(peft),
                                 "reference": identity.arm_config(full)},
                    "method": peft["method"],
                    "rank": peft.get("rank"),
                    "seed": _seed(peft),
                    "pair_key": peft["pair_key"],
                    "task": task,
                    **gap,
                    "answers": _answers(peft_items, full_items, task) if gap["paired"] else None,
                    "peft_run_id": peft["run_id"],
                    "full_run_id": full["run_id"],
                    "lm_eval": sorted({str(_lm_eval_version(r)) for r in (peft, full)}),
                    "ended_at": (peft.get("env") or {}).get("ended_at"),
                }
            )
    gaps.sort(key=lambda g: (g["key"], str(g["seed"]), task_order(g["task"]), g["peft_run_id"]))
    return gaps


def _answers(peft_items: list[dict], full_items: list[dict], task: str) -> dict:
    """Per-question answers of both arms on the questions they share: ids sorted, ``target`` kept
    so that other questions under the same ids are told apart."""
    peft = {str(it["id"]): it for it in peft_items if it.get("task") == task}
    full = {str(it["id"]): it for it in full_items if it.get("task") == task}
    ids = sorted(peft.keys() & full.keys())
    return {
        "ids": ids,
        "targets": [full[q].get("target") for q in ids],
        "peft": [bool(peft[q]["correct"]) for q in ids],
        "full": [bool(full[q]["correct"]) for q in ids],
    }


def question_hash(answers: dict) -> str:
    """Hash of the question set (ids and their targets) a group was evaluated on."""
    return identity.stable_hash([answers["ids"], answers["targets"]])


def seed_noise(per_seed_diffs: list[list[int]]) -> dict:
    """Question and training noise of k seeds' paired differences ``d_si`` on the same n questions.

    Returns ``se_q``, ``s2_gap`` (var across seeds, None for one seed), ``w`` (mean per-question
    variance across seeds, None for one seed), ``v_seed`` and ``se`` (see the module docstring).
    """
    k, n = len(per_seed_diffs), len(per_seed_diffs[0])
    dbar = [sum(d[i] for d in per_seed_diffs) / k for i in range(n)]
    mean = sum(dbar) / n
    se_q = math.sqrt(sum((x - mean) ** 2 for x in dbar) / (n - 1) / n) if n > 1 else None
    if k == 1:
        return {"se_q": se_q, "s2_gap": None, "w": None, "v_seed": None, "se": se_q}
    gaps = [sum(d) / n for d in per_seed_diffs]
    s2_gap = sum((g - mean) ** 2 for g in gaps) / (k - 1)
    w = sum(sum((d[i] - dbar[i]) ** 2 for d in per_seed_diffs) / (k - 1) for i in range(n)) / n
    v_seed = max(s2_gap, w / n)
    se = math.sqrt(se_q**2 + max(0.0, s2_gap - w / n) / k) if se_q is not None else None
    return {"se_q": se_q, "s2_gap": s2_gap, "w": w, "v_seed": v_seed, "se": se}


def ratio_interval(numer: list[float], denom: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Ratio of two paired samples with its interval: (ratio, low, high).

    Pairs ``(numer[i], denom[i])`` were measured side by side (e.g. the latency of two model
    variants in one round-robin repetition). With ``l_i = log(numer[i] / denom[i])`` the ratio is
    ``exp(mean(l))`` (a geometric mean of the paired ratios) and its interval
    ``exp(mean(l) -/+ t * sd(l) / sqrt(n))``, t the Student quantile with n - 1 degrees of freedom:
    the paired log-ratio t interval. A log ratio is symmetric (a slowdown of x and a speedup of x
    weigh the same) and pairing cancels what both share (a slow spell of the machine). One pair:
    the interval is None.
    """
    from scipy.stats import t as student_t

    if len(numer) != len(denom) or not numer:
        raise ValueError(f"ratio_interval needs equal, non-empty samples, got {len(numer)} and {len(denom)}")
    logs = [math.log(a / b) for a, b in zip(numer, denom, strict=True)]
    n, mean = len(logs), sum(logs) / len(logs)
    if n < 2:
        return math.exp(mean), None, None
    half = student_t.ppf(0.5 + level / 2, n - 1) * math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1) / n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """A distribution-free interval for the median of ``values``: order statistics
    ``(x_(k), x_(n+1-k))`` with the largest k such that ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``,
    so the interval covers the median with probability at least ``level`` whatever the
    distribution (timings are skewed: a t interval on them is not). Fewer than 6 values cannot
    reach 95%: (None, None)."""
    from scipy.stats import binom

    xs, n = sorted(values), len(values)
    k = 0
    while k + 1 <= n // 2 and binom.cdf(k, n, 0.5) <= (1 - level) / 2:
        k += 1
    if k == 0:
        return None, None
    return xs[k - 1], xs[n - k]


def seed_summary(gaps: Iterable[dict]) -> list[dict]:
    """Gaps averaged over seeds per comparison group (identity.gap_key) and task.

    ``gap`` is the mean over seeds; ``sd`` the spread across seeds (ddof=1, None for one seed);
    ``se`` the standard error of the mean with question noise never shrunk by seeds, ``se_q`` the
    question noise alone and ``v_seed`` the variance of one rerun's gap on the same questions
    (see the module docstring; None for one seed). Unpaired groups (no per-question answers) have
    ``se = sqrt(mean_s se_s^2 + sd^2 / k)``: question noise as one seed's, plus the spread. If one
    seed was run twice in a group the newest run counts.
    """
    groups: dict[tuple[str, str], dict[Any, dict]] = {}
    for g in gaps:
        by_seed = groups.setdefault((g["group"], g["task"]), {})
        old = by_seed.get(g["seed"])
        if old is not None:
            log.warning("%s %s: seed %s run twice; using the newest", g["key"], g["task"], g["seed"])
            if (str(old.get("ended_at")), old["peft_run_id"]) > (str(g.get("ended_at")), g["peft_run_id"]):
                continue
        by_seed[g["seed"]] = g

    rows = []
    for (_, task), by_seed in groups.items():
        runs = [by_seed[s] for s in sorted(by_seed, key=str)]
        k = len(runs)
        values = [r["gap"] for r in runs]
        mean = sum(values) / k
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1)) if k > 1 else None
        paired = all(r["paired"] for r in runs)
        answers, ids = None, []
        if paired:
            ids = sorted(set.intersection(*(set(r["answers"]["ids"]) for r in runs)))
            if any(len(r["answers"]["ids"]) != len(ids) for r in runs):
                log.warning("%s %s: seeds answered different questions; using the %d shared", runs[0]["key"], task,
                            len(ids))
            answers = [_restrict(r["answers"], ids) for r in runs]
        if paired and ids:
            noise = seed_noise([[int(p) - int(f) for p, f in zip(a["peft"], a["full"])] for a in answers])
            mean = sum(sum(int(p) - int(f) for p, f in zip(a["peft"], a["full"])) for a in answers) / (k * len(ids))
        else:
            noise = {"se_q": None, "v_seed": None, "se": _unpaired_se([r["se"] for r in runs], sd)}
        first = runs[0]
        rows.append(
            {
                "key": first["key"],
                "group": first["group"],
                "arm": first["arm"],
                "model": first["model"],
                "data": first["data"],
                "eval": first["eval"],
                "settings": first["settings"],
                "method": first["method"],
                "rank": first["rank"],
                "task": task,
                "gap": mean,
                "sd": sd,
                "se": noise["se"],
                "se_q": noise["se_q"],
                "v_seed": noise["v_seed"],
                **dict(zip(("ci_low", "ci_high"), gap_interval95(mean, noise["se"], answers))),
                "n_seeds": k,
                "seeds": {r["seed"]: r["gap"] for r in runs},
                "paired": paired,
                "n": len(answers[0]["ids"]) if answers else None,
                "questions": question_hash(answers[0]) if answers else None,
                "answers": {r["seed"]: a for r, a in zip(runs, answers)} if answers else None,
                "lm_eval": sorted({v for r in runs for v in r["lm_eval"]}),
                "run_ids": sorted({rid for r in runs for rid in (r["peft_run_id"], r["full_run_id"])}),
            }
        )
    rows.sort(key=lambda r: (r["key"], task_order(r["task"])))
    return rows


def _restrict(answers: dict, ids: list[str]) -> dict:
    index = {q: i for i, q in enumerate(answers["ids"])}
    return {f: [answers[f][index[q]] for q in ids] if f != "ids" else list(ids)
            for f in ("ids", "targets", "peft", "full")}


# ---------------------------------------------------------------- one arm, and two arms of one setting
# The report's accuracies and its Pareto front use these: one arm's accuracy over its seeds with
# the same two noises as a gap (seeds never shrink question noise), and the paired difference of
# two arms of one setting (equal pair_key per seed), pooled over seeds as seed_summary pools a gap.


def mean_sd(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample sd (ddof=1; None for one value) of what one arm measured over its seeds."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _unpaired_se(ses: list[float | None], sd: float | None) -> float | None:
    """se of a seed mean without per-question answers: one seed's question noise (mean se^2, not
    shrunk by seeds) plus the spread across seeds (sd^2 / k)."""
    if not ses or any(s is None for s in ses):
        return None
    k = len(ses)
    return math.sqrt(sum(s**2 for s in ses) / k + (sd**2 / k if sd is not None else 0.0))


def wilson95(p: float, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion ``p`` of ``n``: unlike ``p ± 1.96·se`` it does
    not collapse to a point at 0 or 1 (128 of 128 right: [97.1%, 100%], not [100%, 100%])."""
    z2 = Z95**2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def newcombe_paired95(both: float, only_a: float, only_b: float, neither: float) -> tuple[float, float]:
    """Newcombe's score interval (1998, method 10) of ``p_a - p_b`` for two arms answering the same
    questions, from the 2x2 table of counts (averages over seeds allowed): Wilson intervals of each
    accuracy, joined with the correlation phi of the pairs. Unlike ``gap ± 1.96·se`` it does not
    collapse to a point when the arms never disagree (both 128 of 128 right: [-2.9, +2.9] pp)."""
    n = both + only_a + only_b + neither
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    (l_a, u_a), (l_b, u_b) = wilson95(p_a, round(n)), wilson95(p_b, round(n))
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins > 0 else 0.0
    down = math.sqrt(max(0.0, (p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b) + (u_b - p_b) ** 2))
    up = math.sqrt(max(0.0, (u_a - p_a) ** 2 - 2 * phi * (u_a - p_a) * (p_b - l_b) + (p_b - l_b) ** 2))
    return p_a - p_b - down, p_a - p_b + up


def gap_interval95(gap: float, se: float | None, answers: list[dict] | None = None) -> tuple[float | None, float | None]:
    """The 95% interval of a gap: ``gap ± 1.96·se``, and where per-question answers of the seeds are
    given (``answers``: per seed {"peft": [...], "full": [...]} on the same questions) never narrower
    than Newcombe's paired score interval of the seeds' mean 2x2 table; within [-1, 1]."""
    low, high = interval95(gap, se)
    if low is None or not answers or not answers[0]["peft"]:
        return low, high
    k = len(answers)
    cells = [0.0, 0.0, 0.0, 0.0]  # both right, only PEFT, only full, neither
    for a in answers:
        for p, f in zip(a["peft"], a["full"]):
            cells[(0 if f else 3) if bool(p) == bool(f) else (1 if p else 2)] += 1 / k
    n_low, n_high = newcombe_paired95(*cells)
    return max(-1.0, min(low, n_low)), min(1.0, max(high, n_high))


def interval95(mean: float, se: float | None) -> tuple[float | None, float | None]:
    return (mean - Z95 * se, mean + Z95 * se) if se is not None else (None, None)


def _shared_ids(per_seed: list[dict[str, Any]]) -> list[str]:
    return sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []


def accuracy_interval(runs: Iterable[dict], task: str, items: Callable[[dict], list[dict]]) -> dict | None:
    """Mean accuracy on ``task`` over the ok ``runs`` (the seeds of one arm) and its 95% interval.

    With per-question answers (``items(record)``) for every seed: ``seed_noise`` of the per-question
    correctness ``c_si`` on the questions all seeds answered (question noise of the seed mean, plus
    what the seeds move together). Without: from the records' ``<task>_acc``/``<task>_stderr`` as
    ``sqrt(mean se_s^2 + sd^2 / k)``. Returns None when no run has an accuracy on ``task``.
    Keys: ``mean``, ``se``, ``ci_low``, ``ci_high``, ``sd`` (across seeds), ``k``, ``n``, ``paired``.
    """
    runs = [r for r in runs if r.get("status") == "ok" and task_metric(r["metrics"], task, "acc") is not None]
    if not runs:
        return None
    correct = [{str(it["id"]): bool(it["correct"]) for it in items(r) if it.get("task") == task} for r in runs]
    ids = _shared_ids(correct) if all(correct) else []
    if ids:
        per_seed = [[int(c[q]) for q in ids] for c in correct]
        noise = seed_noise(per_seed)
        mean, sd = mean_sd([sum(s) / len(ids) for s in per_seed])
        se, n = noise["se"], len(ids)
    else:
        mean, sd = mean_sd([task_metric(r["metrics"], task, "acc") for r in runs])
        se, n = (_unpaired_se([task_metric(r["metrics"], task, "stderr") for r in runs], sd),
                 task_metric(runs[0]["metrics"], task, "n"))
    low, high = interval95(mean, se)
    # the normal interval of an accuracy near 0 or 1 reaches past what an accuracy can be, and at
    # 0 or 1 collapses to a point: cut at 0 and 1, and never narrower than one seed's Wilson
    # interval on the n questions (seeds do not shrink question noise)
    if low is not None and n:
        w_low, w_high = wilson95(mean, int(n))
        low, high = min(low, w_low), max(high, w_high)
    if low is not None:
        low, high = max(0.0, low), min(1.0, high)
    return {"mean": mean, "se": se, "ci_low": low, "ci_high": high, "sd": sd, "k": len(runs), "n": n,
            "paired": bool(ids)}


def accuracy_difference(a_runs: Iterable[dict], b_runs: Iterable[dict], task: str,
                        items: Callable[[dict], list[dict]]) -> dict | None:
    """``acc(a) - acc(b)`` of two arms of one setting, paired: per seed the runs of equal pair_key,
    per question with ``paired_gap``; pooled over the seeds with ``seed_noise`` on the questions
    every seed shares (unpaired from the record metrics, as ``seed_summary``, where answers are
    missing). None when no seed has both arms with an accuracy.

    Keys: ``diff``, ``se``, ``ci_low``, ``ci_high``, ``paired``, ``n_seeds``, ``n`` and
    ``significant`` (the 95% interval excludes 0).
    """
    by_pair = {r["pair_key"]: r for r in b_runs if r.get("status") == "ok"}
    gaps = []
    for a in sorted((r for r in a_runs if r.get("status") == "ok"), key=lambda r: str(r.get("pair_key"))):
        b = by_pair.get(a.get("pair_key"))
        if b is None:
            continue
        a_items, b_items = items(a), items(b)
        gap = paired_gap(a_items, b_items, task, a["metrics"], b["metrics"])
        if gap is not None:
            gap["answers"] = _answers(a_items, b_items, task) if gap["paired"] else None
            gaps.append(gap)
    if not gaps:
        return None
    ids = _shared_ids([dict.fromkeys(g["answers"]["ids"]) for g in gaps]) if all(g["paired"] for g in gaps) else []
    if ids:
        restricted = [_restrict(g["answers"], ids) for g in gaps]
        per_seed = [[int(p) - int(f) for p, f in zip(r["peft"], r["full"])] for r in restricted]
        diff = sum(map(sum, per_seed)) / (len(per_seed) * len(ids))
        se = seed_noise(per_seed)["se"]
        low, high = gap_interval95(diff, se, restricted)
    else:
        diff, sd = mean_sd([g["gap"] for g in gaps])
        se = _unpaired_se([g["se"] for g in gaps], sd)
        low, high = interval95(diff, se)
    return {"diff": diff, "se": se, "ci_low": low, "ci_high": high, "paired": bool(ids), "n_seeds": len(gaps),
            "n": len(ids) or None, "significant": low is not None and (low > 0 or high < 0)}


def unpaired_difference(a: dict, b: dict) -> dict:
    """``a - b`` of two ``accuracy_interval`` results that share no questions or seeds (arms of
    different settings): ``se = sqrt(se_a^2 + se_b^2)``."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2) if a["se"] is not None and b["se"] is not None else None
    low, high = interval95(diff, se)
    return {"diff": diff, "se": se, "ci_low": low, "ci_high": high, "paired": False, "n_seeds": None, "n": None,
            "significant": low is not None and (low > 0 or high < 0)}


def _loss_items(results_dir: str | Path, record: dict, task: str) -> dict[str, dict]:
    return {it["id"]: it for it in read_items(results_dir, record) if it.get("task") == task}


def _paired_loss(by_arm: dict[str, dict[Any, tuple[dict, dict]]]) -> dict[str, dict]:
    """Per arm: the token-weighted NLL difference against its reference over seeds (see loss_gaps)."""
    out = {}
    for arm, by_seed in by_arm.items():
        seeds = sorted(by_seed, key=str)
        shared = [{i for i in p.keys() & r.keys() if p[i]["n_tokens"] == r[i]["n_tokens"]} for p, r in by_seed.values()]
        ids = sorted(set.intersection(*shared))
        if not ids:
            continue
        first = by_seed[seeds[0]][0]
        nbar = sum(first[i]["n_tokens"] for i in ids) / len(ids)
        diffs = [[(by_seed[s][0][i]["nll"] - by_seed[s][1][i]["nll"]) / nbar for i in ids] for s in seeds]
        per_seed = [sum(d) / len(ids) for d in diffs]
        gap = sum(per_seed) / len(seeds)
        noise = seed_noise(diffs)
        low, high = interval95(gap, noise["se"])
        out[arm] = {"gap": gap, "se": noise["se"], "sd": statistics.stdev(per_seed) if len(seeds) > 1 else None,
                    "ci_low": low, "ci_high": high, "n": len(ids), "n_seeds": len(seeds),
                    "seeds": dict(zip(seeds, per_seed))}
    return out


def loss_gaps(records: Iterable[dict], results_dir: str | Path, references: Iterable[str] = ()) -> dict[str, dict]:
    """Held-out loss gap ``loss(peft) - loss(full)`` per PEFT arm (identity.arm_key), in nats per
    target token, paired example by example and averaged over seeds (positive: PEFT is worse).

    Both arms of a pair score the same held-out examples, rendered into the same tokens, so each
    example's token count ``n_i`` is fixed by the data. With ``d_si`` seed s's NLL difference on
    example i (summed over its tokens) and ``nbar`` the mean count, ``x_si = d_si / nbar`` has
    ``mean_i x_si = sum_i d_si / sum_i n_i``, the token-weighted gap; its question and seed noise
    are ``seed_noise``'s, as for accuracy gaps. Examples whose token counts differ between the
    arms (which would mean different data) are left out.
    """
    records = [r for r in records if r.get("status") == "ok"]
    # references: the full run to use where several share a pair (validation's choice), as in pair_gaps
    full_by_pair, _ = identity.full_references(records, references)
    by_arm: dict[str, dict[Any, tuple]] = {}
    for peft in records:
        full = full_by_pair.get(peft["pair_key"])
        if peft["method"] in REFERENCE_METHODS or full is None:
            continue
        p, f = _loss_items(results_dir, peft, "heldout_loss"), _loss_items(results_dir, full, "heldout_loss")
        if p and f:
            by_arm.setdefault(identity.arm_key(peft), {})[_seed(peft)] = (p, f)
    return _paired_loss(by_arm)


def forgetting_deltas(records: Iterable[dict], results_dir: str | Path) -> dict[str, dict]:
    """The rise of the general-text loss, ``loss(arm) - loss(base)``, per trained arm (full FT
    included), paired chunk by chunk with the base model's record and averaged over seeds, as
    ``loss_gaps`` (positive: the arm forgot)."""
    records = [r for r in records if r.get("status") == "ok"]
    bases = {r["run_id"]: r for r in records if r["method"] == "base"}
    by_arm: dict[str, dict[Any, tuple]] = {}
    for rec in records:
        base = bases.get(rec.get("base_run_id"))
        if rec["method"] == "base" or base is None:
            continue
        a, b = _loss_items(results_dir, rec, "forgetting"), _loss_items(results_dir, base, "forgetting")
        if a and b:
            by_arm.setdefault(identity.arm_key(rec), {})[_seed(rec)] = (a, b)
    return _paired_loss(by_arm)


# ---------------------------------------------------------------- deciding a gap against a limit
#
# A team's limit ``max_gap`` (a fraction, 0.01 = 1 pp) splits a gap's 95% interval three ways:
# WITHIN when it lies above -max_gap, BEYOND when below, UNDECIDED when it straddles. For an
# undecided gap, how many questions (or seeds) would decide it, if the gap stayed where it is, comes
# from the variance components of the seeds' per-question differences d_si (k seeds, n questions):
#
#     S = var_i(dbar_i)   w = mean_i var_s(d_si)   s2 = var_s(g_s)     (ddof=1 each; see seed_noise)
#     tau2 = max(0, S - w / k)        what questions differ by, whatever the seed
#     excess = max(0, s2 - w / n)     what the seeds move together (seed_noise's added term)
#     se(n', k')^2 = (tau2 + w / k') / n' + excess / k'
#
# which at (n, k) is seed_noise's se. The interval at (n', k') is gap -/+ 1.96 se(n', k'), never
# narrower than Newcombe's paired interval of the seeds' mean 2x2 table scaled to n' questions
# (gap_interval95's floor). With one seed w and excess are unknown: questions only, seeds cannot be
# projected. Unpaired gaps (no per-question answers) are not projected.

WITHIN, BEYOND, UNDECIDED = "within", "beyond", "undecided"
MAX_QUESTIONS, MAX_SEEDS = 10_000_000, 1_000


def judge(ci_low: float | None, ci_high: float | None, max_gap: float) -> str | None:
    """WITHIN / BEYOND / UNDECIDED for a gap interval against ``-max_gap``; None without an interval."""
    if ci_low is None or ci_high is None:
        return None
    if ci_low > -max_gap:
        return WITHIN
    if ci_high < -max_gap:
        return BEYOND
    return UNDECIDED


def gap_components(answers: list[dict]) -> dict:
    """Variance components of the seeds' paired answers (per seed {"peft": [...], "full": [...]} on
    the same questions): ``gap``, ``n``, ``k``, ``tau2``, ``w``, ``excess`` (None for one seed) and
    ``cells``, the seeds' mean 2x2 table as fractions (both right, only PEFT, only full, neither)."""
    diffs = [[int(p) - int(f) for p, f in zip(a["peft"], a["full"])] for a in answers]
    k, n = len(diffs), len(diffs[0])
    dbar = [sum(d[i] for d in diffs) / k for i in range(n)]
    gap = sum(dbar) / n
    s = sum((x - gap) ** 2 for x in dbar) / (n - 1) if n > 1 else 0.0
    cells = [0.0, 0.0, 0.0, 0.0]
    for a in answers:
        for p, f in zip(a["peft"], a["full"]):
            cells[(0 if f else 3) if bool(p) == bool(f) else (1 if p else 2)] += 1 / (k * n)
    if k == 1:
        return {"gap": gap, "n": n, "k": 1, "tau2": s, "w": None, "excess": None, "cells": cells}
    noise = seed_noise(diffs)
    return {"gap": gap, "n": n, "k": k, "tau2": max(0.0, s - noise["w"] / k), "w": noise["w"],
            "excess": max(0.0, noise["s2_gap"] - noise["w"] / n), "cells": cells}


def projected_interval(c: dict, n: int, k: int) -> tuple[float, float]:
    """The 95% interval the gap in ``c`` (gap_components) would have on ``n`` questions and ``k`` seeds."""
    w, excess = c["w"] or 0.0, c["excess"] or 0.0
    se = math.sqrt((c["tau2"] + w / k) / n + excess / k)
    n_low, n_high = newcombe_paired95(*(x * n for x in c["cells"]))
    return max(-1.0, min(c["gap"] - Z95 * se, n_low)), min(1.0, max(c["gap"] + Z95 * se, n_high))


def _smallest(decides: Callable[[int], bool], start: int, stop: int) -> int | None:
    """The smallest x in [start, stop] with decides(x), by doubling then bisection (decides is monotone)."""
    hi = start
    while not decides(hi):
        if hi >= stop:
            return None
        hi = min(stop, hi * 2)
    lo = max(start, hi // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        if decides(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def to_decide(answers: list[dict], max_gap: float) -> dict:
    """How many questions (at today's seeds) or seeds (on today's questions) would take an undecided
    gap's interval off ``-max_gap``, if the gap stayed at its measured value: ``questions`` and
    ``seeds`` (totals, None where that alone cannot decide it or cannot be projected) and ``why``
    for each None."""
    c = gap_components(answers)
    n, k = c["n"], c["k"]
    decided = lambda lo_hi: judge(*lo_hi, max_gap) != UNDECIDED
    out: dict = {"questions": None, "seeds": None, "why": {}}
    if c["gap"] == -max_gap:
        out["why"] = {"questions": "the gap sits on the limit", "seeds": "the gap sits on the limit"}
        return out
    out["questions"] = _smallest(lambda m: decided(projected_interval(c, m, k)), n, MAX_QUESTIONS)
    if out["questions"] is None:
        out["why"]["questions"] = ("more questions alone cannot: the seeds' shared spread sets the interval"
                                   if c["excess"] else f"not within {MAX_QUESTIONS:,} questions")
    if k == 1:
        out["why"]["seeds"] = "one seed: training noise not measured (run at least 2 seeds to project it)"
    else:
        out["seeds"] = _smallest(lambda s: decided(projected_interval(c, n, s)), k, MAX_SEEDS)
        if out["seeds"] is None:
            out["why"]["seeds"] = f"more seeds alone cannot: question noise on {n} questions sets the interval"
    return out


def resolution(n: int, reference_acc: float, max_gap: float) -> dict:
    """Can ``n`` questions resolve ``max_gap`` at all? Two arms that agree on every question get
    Newcombe's interval of a tie at the reference accuracy, and one question moves an accuracy by
    1/n. ``ok``; ``tie_half_width`` (the narrowest interval's half-width); ``questions_needed``, the
    fewest questions that could resolve it."""
    def half(m: int) -> float:
        low, high = newcombe_paired95(reference_acc * m, 0.0, 0.0, (1 - reference_acc) * m)
        return max(-low, high)

    fits = lambda m: half(m) < max_gap and 1 / m <= max_gap
    return {"ok": fits(n), "tie_half_width": half(n), "step": 1 / n,
            "questions_needed": n if fits(n) else _smallest(fits, n, MAX_QUESTIONS)}
