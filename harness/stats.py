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

The report (tables) and the gate (``harness-check``) both call these functions on run records;
neither loads a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.records import read_items, stable_hash

TASKS = ("mmlu", "indomain")
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
    acc_p, acc_f = peft_metrics.get(f"{task}_acc"), full_metrics.get(f"{task}_acc")
    if acc_p is None or acc_f is None:
        return None
    se_p, se_f = peft_metrics.get(f"{task}_stderr"), full_metrics.get(f"{task}_stderr")
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


def group_fields(record: dict) -> dict:
    """What makes two runs comparable across result sets: model, data, eval settings, method, rank.

    The seed is left out (seeds are averaged), and so are the training settings: a change to them
    is exactly what the gate should notice, not a reason to skip the comparison.
    """
    config = record.get("config") or {}
    model = (record.get("model") or {}).get("name") or (config.get("model") or {}).get("name")
    return {
        "model": model,
        "data": (config.get("data") or {}).get("name"),
        "eval": config.get("eval") or {},
        "method": record.get("method"),
        "rank": record.get("rank"),
    }


def group_label(fields: dict, with_eval: bool = True) -> str:
    """Readable group name, e.g. ``Qwen/Qwen2.5-0.5B · demo · lora r8 · eval 1a2b3c4d``.

    No "|" in it: the name goes into markdown tables as is.
    """
    arm = fields["method"] + (f" r{fields['rank']}" if fields["rank"] is not None else "")
    label = f"{fields['model']} · {fields['data']} · {arm}"
    return label + f" · eval {stable_hash(fields['eval'])[:8]}" if with_eval else label


def comparable_key(record: dict) -> str:
    """Key of the gate's comparable group (same model, data, eval settings, method, rank)."""
    return group_label(group_fields(record))


def _lm_eval_version(record: dict) -> str | None:
    return ((record.get("env") or {}).get("versions") or {}).get("lm_eval")


def _seed(record: dict) -> Any:
    return (record.get("config") or {}).get("seed")


def pair_gaps(records: Iterable[dict], results_dir: str | Path) -> list[dict]:
    """One gap per (ok PEFT run with an ok full run of equal pair_key, task with accuracy).

    Ordered by comparable group, seed, task and run id, so reports and baselines are stable.
    """
    records = [r for r in records if r.get("status") == "ok"]
    full_by_pair: dict[str, dict] = {}
    for rec in sorted(records, key=lambda r: r["run_id"]):
        if rec["method"] == "full":
            # the first by run_id wins: a deterministic pick if a pair was run twice
            full_by_pair.setdefault(rec["pair_key"], rec)

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
        fields = group_fields(peft)
        for task in TASKS:
            gap = paired_gap(peft_items, full_items, task, peft["metrics"], full["metrics"])
            if gap is None:
                continue
            gaps.append(
                {
                    "key": comparable_key(peft),
                    **fields,
                    "seed": _seed(peft),
                    "pair_key": peft["pair_key"],
                    "task": task,
                    **gap,
                    "peft_run_id": peft["run_id"],
                    "full_run_id": full["run_id"],
                    "lm_eval": sorted({str(_lm_eval_version(r)) for r in (peft, full)}),
                    "ended_at": (peft.get("env") or {}).get("ended_at"),
                }
            )
    gaps.sort(key=lambda g: (g["key"], str(g["seed"]), TASKS.index(g["task"]), g["peft_run_id"]))
    return gaps


def seed_summary(gaps: Iterable[dict]) -> list[dict]:
    """Gaps averaged over seeds per (model, data, eval settings, method, rank, task).

    ``se`` is the standard error of the mean of k seeds from the per-seed eval noise,
    ``sqrt(sum se_i^2) / k`` (None if any seed has none); ``sd`` is the spread across seeds
    (ddof=1, None for a single seed), which also contains training noise. If one seed was run
    twice in a group (e.g. with other training settings) the newest run counts.
    """
    groups: dict[tuple[str, str], dict[Any, dict]] = {}
    for g in gaps:
        by_seed = groups.setdefault((g["key"], g["task"]), {})
        old = by_seed.get(g["seed"])
        if old is not None:
            log.warning("%s %s: seed %s run twice; using the newest", g["key"], g["task"], g["seed"])
            if (str(old.get("ended_at")), old["peft_run_id"]) > (str(g.get("ended_at")), g["peft_run_id"]):
                continue
        by_seed[g["seed"]] = g

    rows = []
    for (key, task), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][0], TASKS.index(kv[0][1]))):
        runs = [by_seed[s] for s in sorted(by_seed, key=str)]
        k = len(runs)
        values = [r["gap"] for r in runs]
        mean = sum(values) / k
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1)) if k > 1 else None
        ses = [r["se"] for r in runs]
        se = math.sqrt(sum(s**2 for s in ses)) / k if all(s is not None for s in ses) else None
        first = runs[0]
        rows.append(
            {
                "key": key,
                "model": first["model"],
                "data": first["data"],
                "eval": first["eval"],
                "method": first["method"],
                "rank": first["rank"],
                "task": task,
                "gap": mean,
                "sd": sd,
                "se": se,
                "n_seeds": k,
                "seeds": {r["seed"]: r["gap"] for r in runs},
                "paired": all(r["paired"] for r in runs),
                "lm_eval": sorted({v for r in runs for v in r["lm_eval"]}),
                "run_ids": sorted({rid for r in runs for rid in (r["peft_run_id"], r["full_run_id"])}),
            }
        )
    return rows
