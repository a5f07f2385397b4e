"""Gap statistics on constructed per-question answers whose results can be computed by hand."""

from __future__ import annotations

import math

import pytest

from harness.records import REQUIRED_METRICS, load_records, run_id_for, stable_hash, write_items, write_record
from harness.stats import comparable_key, mcnemar_exact_p, pair_gaps, paired_gap, seed_noise, seed_summary


def items(task: str, correct: list[bool], prefix: str = "q") -> list[dict]:
    return [
        {
            "task": task,
            "id": f"{prefix}{i}",
            "subject": "s",
            "category": None,
            "pred": 0,
            "target": 0 if ok else 1,
            "correct": ok,
        }
        for i, ok in enumerate(correct)
    ]


def record(
    method: str,
    rank: int | None,
    seed: int,
    *,
    status: str = "ok",
    model: str = "tiny",
    evals: dict | None = None,
    **metrics,
) -> dict:
    evals = evals if evals is not None else {"mmlu_limit": 20}
    config = {
        "model": {"name": model},
        "data": {"name": "demo"},
        "seed": seed,
        "eval": evals,
        "method": {"name": method, "r": rank},
    }
    config_hash = stable_hash(config)
    return {
        "schema": 1,
        "run_id": run_id_for(method, rank, config_hash),
        "config_hash": config_hash,
        "pair_key": stable_hash([model, "demo", seed, evals]),
        "eval_key": stable_hash([model, evals]),
        "status": status,
        "error": None,
        "method": method,
        "rank": rank,
        "model": {"name": model, "source": "test", "total_params": 1000, "random_weights": True},
        "config": config,
        "env": {
            "versions": {"lm_eval": "0.4.9"},
            "git_commit": "abc",
            "device": "cpu",
            "ended_at": "2025-01-01T00:00:00+00:00",
        },
        "items_file": None,
        "base_run_id": None,
        "metrics": {**{m: None for m in REQUIRED_METRICS}, **metrics},
    }


# 20 questions: 8 only PEFT right (b), 2 only full right (c), 6 both right, 4 both wrong
PEFT = [True] * 8 + [False] * 2 + [True] * 6 + [False] * 4
FULL = [False] * 8 + [True] * 2 + [True] * 6 + [False] * 4


def test_mcnemar_exact_by_hand():
    # b=8, c=2: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert mcnemar_exact_p(8, 2) == pytest.approx(0.109375)
    assert mcnemar_exact_p(2, 8) == pytest.approx(0.109375)
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(5, 5) == 1.0  # clipped: the doubled tail exceeds 1
    assert mcnemar_exact_p(0, 0) == 1.0


def test_paired_gap_by_hand():
    g = paired_gap(items("mmlu", PEFT), items("mmlu", FULL), "mmlu")
    assert g["paired"] is True
    assert (g["n"], g["b"], g["c"]) == (20, 8, 2)
    assert g["gap"] == pytest.approx(0.3)
    assert (g["peft_acc"], g["full_acc"]) == (pytest.approx(0.7), pytest.approx(0.4))
    # d = eight +1, two -1, ten 0; mean 0.3; sum of squared deviations 8*.49 + 2*1.69 + 10*.09 = 8.2
    se = math.sqrt(8.2 / 19 / 20)
    assert g["se"] == pytest.approx(se)
    assert g["ci_low"] == pytest.approx(0.3 - 1.96 * se)
    assert g["ci_high"] == pytest.approx(0.3 + 1.96 * se)
    assert g["mcnemar_p"] == pytest.approx(0.109375)


def test_paired_gap_aligns_on_id_and_task():
    peft = list(reversed(items("mmlu", PEFT)))  # order must not matter
    peft += items("mmlu", [True] * 5, prefix="only-peft-")  # no partner: ignored
    peft += items("indomain", [False] * 20)  # other task: ignored
    g = paired_gap(peft, items("mmlu", FULL), "mmlu")
    assert (g["n"], g["b"], g["c"]) == (20, 8, 2)
    assert g["gap"] == pytest.approx(0.3)


def test_identical_arms_have_zero_gap_and_p_one():
    g = paired_gap(items("mmlu", FULL), items("mmlu", FULL), "mmlu")
    assert (g["gap"], g["se"], g["mcnemar_p"]) == (0.0, 0.0, 1.0)


def test_unpaired_fallback_from_metrics():
    g = paired_gap(
        [], items("mmlu", FULL), "mmlu", {"mmlu_acc": 0.6, "mmlu_stderr": 0.03}, {"mmlu_acc": 0.5, "mmlu_stderr": 0.04}
    )
    assert g["paired"] is False and g["mcnemar_p"] is None
    assert g["gap"] == pytest.approx(0.1)
    assert g["se"] == pytest.approx(0.05)
    assert g["ci_low"] == pytest.approx(0.1 - 1.96 * 0.05)
    assert paired_gap([], [], "mmlu", {"mmlu_acc": None}, {"mmlu_acc": 0.5}) is None


def test_pair_gaps_pairs_only_ok_peft_with_full(tmp_path):
    full = record("full", None, 0, mmlu_acc=0.4)
    full["items_file"] = write_items(tmp_path, full["run_id"], items("mmlu", FULL))
    lora = record("lora", 8, 0, mmlu_acc=0.7, indomain_acc=0.9, indomain_stderr=0.03)
    lora["items_file"] = write_items(tmp_path, lora["run_id"], items("mmlu", PEFT))
    full["metrics"].update(indomain_acc=0.95, indomain_stderr=0.04)
    others = [
        record("base", None, 0, mmlu_acc=0.1),  # not PEFT
        record("lora", 16, 0, status="oom"),  # not ok
        record("lora", 8, 1, mmlu_acc=0.5),  # no full partner (seed 1)
    ]
    for rec in [full, lora, *others]:
        write_record(tmp_path, rec)

    gaps = pair_gaps(load_records(tmp_path), tmp_path)
    assert [(g["task"], g["paired"]) for g in gaps] == [("mmlu", True), ("indomain", False)]
    mmlu, indomain = gaps
    assert mmlu["gap"] == pytest.approx(0.3) and mmlu["mcnemar_p"] == pytest.approx(0.109375)
    assert (mmlu["peft_run_id"], mmlu["full_run_id"]) == (lora["run_id"], full["run_id"])
    assert (mmlu["method"], mmlu["rank"], mmlu["seed"], mmlu["model"], mmlu["data"]) == ("lora", 8, 0, "tiny", "demo")
    assert indomain["gap"] == pytest.approx(-0.05) and indomain["se"] == pytest.approx(0.05)
    assert mmlu["key"] == comparable_key(lora, full)


def _gap(seed, gap, se, method="lora", answers=None):
    return {
        "key": f"k-{method}",
        "group": f"g-{method}",
        "arm": f"a-{method}",
        "model": "m",
        "data": "d",
        "eval": {},
        "settings": {},
        "method": method,
        "rank": 8,
        "seed": seed,
        "task": "mmlu",
        "gap": gap,
        "se": se,
        "paired": answers is not None,
        "answers": answers,
        "peft_run_id": f"p{seed}",
        "full_run_id": f"f{seed}",
        "lm_eval": ["0.4.9"],
        "ended_at": None,
    }


def test_seed_summary_unpaired_mean_sd_se():
    rows = seed_summary(
        [_gap(0, -0.02, 0.01), _gap(1, -0.04, 0.02), _gap(2, -0.06, 0.02), _gap(0, 0.1, 0.05, method="qlora")]
    )
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["n_seeds"] == 3
    assert lora["gap"] == pytest.approx(-0.04)
    assert lora["sd"] == pytest.approx(0.02)  # deviations -+0.02, 0: sqrt(0.0008 / 2)
    # question noise as one seed's (mean of the squares), plus the spread over k seeds
    assert lora["se"] == pytest.approx(math.sqrt((0.01**2 + 0.02**2 + 0.02**2) / 3 + 0.02**2 / 3))
    assert lora["seeds"] == {0: -0.02, 1: -0.04, 2: -0.06}
    qlora = next(r for r in rows if r["method"] == "qlora")
    assert qlora["n_seeds"] == 1 and qlora["sd"] is None and qlora["se"] == pytest.approx(0.05)


def _paired(peft: list[bool], full: list[bool]) -> dict:
    ids = [f"q{i}" for i in range(len(peft))]
    return {"ids": ids, "targets": [0] * len(ids), "peft": peft, "full": full}


@pytest.mark.parametrize("k", [1, 2, 8])
def test_seeds_never_shrink_question_noise(k):
    # every seed answers identically: the question noise is one seed's, for any number of seeds
    one = paired_gap(items("mmlu", PEFT), items("mmlu", FULL), "mmlu")
    gaps = [_gap(s, one["gap"], one["se"], answers=_paired(PEFT, FULL)) for s in range(k)]
    (row,) = seed_summary(gaps)
    assert row["n_seeds"] == k and row["paired"] and row["n"] == 20
    assert row["gap"] == pytest.approx(0.3)
    assert row["se"] == pytest.approx(one["se"])
    assert row["se_q"] == pytest.approx(one["se"])


def test_seed_noise_by_hand():
    # 2 seeds, 4 questions; seed 0 d = (1, 0, 0, -1), seed 1 d = (1, 1, 1, 0)
    noise = seed_noise([[1, 0, 0, -1], [1, 1, 1, 0]])
    # gaps 0 and 0.75: s_g^2 = (0.375^2 * 2) / 1 = 0.28125
    assert noise["s2_gap"] == pytest.approx(0.28125)
    # per question var across 2 seeds (ddof 1): 0, 0.5, 0.5, 0.5: w = 1.5 / 4 = 0.375; w / n = 0.09375
    assert noise["w"] == pytest.approx(0.375)
    assert noise["v_seed"] == pytest.approx(0.28125)  # the spread is larger than the flips explain
    # dbar = (1, .5, .5, -.5), mean .375: sd^2 = (.390625 + .015625 * 2 + .765625) / 3 = 0.395833
    se_q = math.sqrt(0.3958333333 / 4)
    assert noise["se_q"] == pytest.approx(se_q)
    assert noise["se"] == pytest.approx(math.sqrt(se_q**2 + (0.28125 - 0.09375) / 2))
    # flips alone (no seed-level shift): the spread is floored at what the flips explain
    flips = seed_noise([[1, 0, 1, 0], [0, 1, 0, 1]])
    assert flips["s2_gap"] == 0 and flips["v_seed"] == pytest.approx(flips["w"] / 4) and flips["v_seed"] > 0


def _answered(rec: dict, correct: list[bool], task: str = "mmlu") -> dict:
    """``rec`` with its answers in memory (an items reader keyed on run_id) and its accuracy."""
    acc = sum(correct) / len(correct)
    rec["metrics"] |= {f"{task}_acc": acc, f"{task}_stderr": math.sqrt(acc * (1 - acc) / (len(correct) - 1)),
                       f"{task}_n": len(correct)}
    ANSWERS[rec["run_id"]] = items(task, correct)
    return rec


ANSWERS: dict[str, list[dict]] = {}


def read(rec: dict) -> list[dict]:
    return ANSWERS.get(rec["run_id"], [])


def test_accuracy_interval_one_seed_is_the_binomial_se_by_hand():
    from harness.stats import accuracy_interval, wilson95

    rec = _answered(record("full", None, 0), PEFT)  # 14 of 20
    acc = accuracy_interval([rec], "mmlu", read)
    se = math.sqrt(0.7 * 0.3 / 19)  # sample sd of 0/1 answers over sqrt(n), as lm-eval's stderr
    assert acc["mean"] == pytest.approx(0.7) and acc["se"] == pytest.approx(se) and acc["paired"]
    # the normal interval, widened where one seed's Wilson interval on the 20 questions reaches further
    wilson = wilson95(0.7, 20)
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((min(0.7 - 1.96 * se, wilson[0]),
                                                             max(0.7 + 1.96 * se, wilson[1])))
    # every question right: se 0, and yet not certain (it read [100%, 100%] before)
    perfect = accuracy_interval([_answered(record("full", None, 0, model="ace"), [True] * 128)], "mmlu", read)
    assert perfect["se"] == 0 and perfect["ci_high"] == 1.0
    assert perfect["ci_low"] == pytest.approx(0.9709, abs=1e-4)  # Wilson, 128 of 128
    # identical seeds: the same questions, so the interval does not shrink
    twins = [_answered(record("full", None, s), PEFT) for s in (1, 2)]
    assert accuracy_interval(twins, "mmlu", read)["se"] == pytest.approx(se)
    # without answers: from the record metrics, sqrt(mean se^2 + sd^2 / k)
    bare = [record("full", None, s, model="bare", mmlu_acc=a, mmlu_stderr=0.1) for s, a in ((0, 0.5), (1, 0.7))]
    assert accuracy_interval(bare, "mmlu", read)["se"] == pytest.approx(math.sqrt(0.01 + 0.02 / 2))
    assert accuracy_interval([record("full", None, 0, model="bare")], "mmlu", read) is None
    # an accuracy near 1 (or 0): the interval stops where accuracies do
    high = [record("full", None, 0, model="bare", mmlu_acc=0.99, mmlu_stderr=0.02)]
    assert accuracy_interval(high, "mmlu", read)["ci_high"] == 1.0
    low = [record("full", None, 0, model="bare", mmlu_acc=0.01, mmlu_stderr=0.02)]
    assert accuracy_interval(low, "mmlu", read)["ci_low"] == 0.0


def test_accuracy_difference_is_paired_per_seed_and_question():
    from harness.stats import accuracy_difference

    peft = _answered(record("lora", 8, 0), PEFT)
    full = _answered(record("full", None, 0), FULL)
    diff = accuracy_difference([peft], [full], "mmlu", read)
    gap = paired_gap(read(peft), read(full), "mmlu")
    assert diff["diff"] == pytest.approx(gap["gap"]) and diff["se"] == pytest.approx(gap["se"])
    assert diff["paired"] and diff["n_seeds"] == 1 and diff["significant"] == (gap["ci_low"] > 0)
    # one question apart of 20 is inside the noise
    near = _answered(record("lora", 8, 0, model="near"), FULL[:-1] + [True])
    other = _answered(record("full", None, 0, model="near"), FULL)
    assert not accuracy_difference([near], [other], "mmlu", read)["significant"]
    # no seed of equal pair_key: nothing to pair
    assert accuracy_difference([peft], [_answered(record("full", None, 5), FULL)], "mmlu", read) is None


def test_ratio_interval_is_the_paired_log_ratio_t_interval():
    from harness.stats import ratio_interval

    # log ratios 0 and ln 4: mean ln 2, sd ln4/sqrt2, t(0.975, df 1) = 12.7062
    ratio, lo, hi = ratio_interval([1.0, 4.0], [1.0, 1.0])
    half = 12.7062047 * (math.log(4) / math.sqrt(2)) / math.sqrt(2)
    assert ratio == pytest.approx(2.0)
    assert lo == pytest.approx(math.exp(math.log(2) - half)) and hi == pytest.approx(math.exp(math.log(2) + half))
    # pairing: a drift both sides share cancels to a zero-width interval
    assert ratio_interval([1.0, 2.0, 4.0], [0.5, 1.0, 2.0]) == pytest.approx((2.0, 2.0, 2.0))
    assert ratio_interval([3.0], [2.0]) == (pytest.approx(1.5), None, None)
    with pytest.raises(ValueError):
        ratio_interval([1.0], [1.0, 2.0])


def test_ratio_interval_covers_the_true_ratio_95_percent_of_the_time():
    import random

    from harness.stats import ratio_interval

    rng = random.Random(0)
    trials, covered = 2000, 0
    for _ in range(trials):
        drift = [rng.uniform(0.5, 2.0) for _ in range(8)]  # a machine whose speed wanders, shared
        base = [d * rng.lognormvariate(0, 0.05) for d in drift]
        variant = [1.03 * d * rng.lognormvariate(0, 0.05) for d in drift]
        _, lo, hi = ratio_interval(variant, base)
        covered += lo <= 1.03 <= hi
    assert 0.93 <= covered / trials <= 0.97


def test_a_gap_between_arms_that_never_disagree_is_not_a_point():
    """Both arms right on all 128 questions: se = 0, and gap ± 1.96·se read [+0.00, +0.00] in the
    demo's table. Newcombe's paired score interval floors it: 128 of 128 has Wilson [97.09%, 100%]."""
    from harness.stats import newcombe_paired95, wilson95

    right = [True] * 128
    (row,) = seed_summary([_gap(0, 0.0, 0.0, answers=_paired(right, right))])
    half = 1 - wilson95(1.0, 128)[0]
    assert row["se"] == 0 and (row["ci_low"], row["ci_high"]) == pytest.approx((-half, half))
    assert half == pytest.approx(0.0291, abs=1e-4)
    # an ordinary gap keeps its normal interval where that is the wider one, and the floor is
    # antisymmetric in the arms
    one = paired_gap(items("mmlu", PEFT), items("mmlu", FULL), "mmlu")
    (row,) = seed_summary([_gap(0, one["gap"], one["se"], answers=_paired(PEFT, FULL))])
    low, high = newcombe_paired95(*_cells(PEFT, FULL))
    assert row["ci_low"] == pytest.approx(min(one["gap"] - 1.96 * one["se"], low))
    assert row["ci_high"] == pytest.approx(max(one["gap"] + 1.96 * one["se"], high))
    assert newcombe_paired95(*_cells(FULL, PEFT)) == pytest.approx((-high, -low))


def _cells(a: list[bool], b: list[bool]) -> tuple[int, int, int, int]:
    return (sum(x and y for x, y in zip(a, b)), sum(x and not y for x, y in zip(a, b)),
            sum(y and not x for x, y in zip(a, b)), sum(not x and not y for x, y in zip(a, b)))


def test_newcombe_paired_interval_covers_95_percent():
    """Method 10 of Newcombe (1998) on simulated paired answers (128 questions), near the demo's
    regime (both arms near 100%) and mid-range: it covers the true difference at least ~95%."""
    import random

    from harness.stats import newcombe_paired95

    rng = random.Random(0)
    for probs in [(0.95, 0.02, 0.02, 0.01), (0.6, 0.1, 0.05, 0.25)]:
        theta, hits = probs[1] - probs[2], 0
        for _ in range(1000):
            cells = [0, 0, 0, 0]
            for _ in range(128):
                cells[rng.choices(range(4), probs)[0]] += 1
            low, high = newcombe_paired95(*cells)
            hits += low - 1e-12 <= theta <= high + 1e-12
        assert 0.93 <= hits / 1000 <= 0.995, (probs, hits)
