"""The verdict: judged states from run records, the questions that would decide an undecided gap
(checked against a simulation), no verdict where accuracy means nothing, and the CLI's limits."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import RUN_CWD
from test_report import GiB, MiB, make_record

from harness.report import AT_A_GLANCE, build_report
from harness.report.verdict import LIMIT_KEYS, VERDICT_JSON, Limits, LimitsError, load_limits
from harness.stats import (
    BEYOND,
    UNDECIDED,
    WITHIN,
    gap_components,
    gap_interval95,
    judge,
    projected_interval,
    seed_noise,
    to_decide,
)


def _answers(right: set[int], n: int) -> list[bool]:
    return [i in right for i in range(n)]


def sweep(results: Path, peft_right: list[set[int]], full_right: set[int] | None = None, n: int = 200,
          peft_cost: float = 0.01, full_cost: float = 0.5, **peft_metrics) -> None:
    """full FT and LoRA r=16 over len(peft_right) seeds on ``n`` in-domain questions; full FT gets
    ``full_right`` (default: the first 60%) right on every seed, LoRA seed s gets ``peft_right[s]``."""
    full_right = set(range(int(0.6 * n))) if full_right is None else full_right
    for seed, right in enumerate(peft_right):
        common = dict(seed=seed, total_params=1_000_000, memory_device="cuda", full_checkpoint_bytes=4 * GiB,
                      full_checkpoint_bytes_estimated=False, train_tokens=1000, train_tokens_real=800)
        make_record(results, "full", indomain_correct=_answers(full_right, n), trainable_params=1_000_000,
                    peak_memory_bytes=4 * GiB, cost_usd=full_cost, **common)
        make_record(results, "lora", rank=16, indomain_correct=_answers(right, n), trainable_params=10_000,
                    peak_memory_bytes=GiB, cost_usd=peft_cost, adapter_serving_bytes=40 * MiB,
                    latency_prefill_dynamic_overhead=0.12, latency_prefill_merged_overhead=0.0,
                    **{**common, **peft_metrics})


def verdict_of(results: Path, tmp_path: Path, **limits) -> dict:
    build_report(results, tmp_path / "reports", limits=Limits(**limits))
    out = json.loads((tmp_path / "reports" / VERDICT_JSON).read_text())
    (table,) = out["tables"]
    return table


def lora(v: dict) -> dict:
    (arm,) = [a for a in v["arms"] if a["method"] == "lora"]
    return arm


# ---------------------------------------------------------------- the three judged states


def test_within_picks_the_cheaper_peft_arm_and_says_why(tmp_path):
    n = 200
    # LoRA agrees with full FT on every question but 2 of the 120 it gets right: gap -1 pp, tight
    sweep(tmp_path / "r", [set(range(118)) | {150, 151}] * 2, n=n)
    v = verdict_of(tmp_path / "r", tmp_path, max_gap=5.0)
    assert v["state"] == "verdict" and v["task"] == "indomain"
    arm = lora(v)
    assert arm["judgement"] == WITHIN and arm["ci_pp"][0] > -5
    assert v["pick"] == "LoRA r=16"
    text = v["recommendation"]
    assert text.startswith("Pick LoRA r=16") and "within the 5 pp limit" in text
    assert "$0.0100 against $0.500" in text  # measured costs, mean over seeds
    # the latency as the probe measured it, the merged variant's included (not assumed to be 0)
    assert "at +12% prefill latency with the adapters applied dynamically (merged: +0%)" in text
    md = (tmp_path / "reports" / AT_A_GLANCE).read_text()
    assert md.index("## Verdict") < md.index("## tiny-model on demo")  # the verdict comes first
    page = (tmp_path / "reports" / "index.html").read_text()
    assert '<section id="verdict">' in page and "Pick LoRA r=16" in page


def test_beyond_picks_full_fine_tuning(tmp_path):
    # LoRA gets 60 of full FT's 120 right: -30 pp, far beyond a 5 pp limit
    sweep(tmp_path / "r", [set(range(60))], n=200)
    v = verdict_of(tmp_path / "r", tmp_path, max_gap=5.0)
    assert lora(v)["judgement"] == BEYOND and lora(v)["ci_pp"][1] < -5
    assert v["pick"] == "full FT"
    assert v["recommendation"].startswith("Pick full fine-tuning: every judged PEFT arm loses more than 5 pp")


def test_undecided_says_what_would_decide_it(tmp_path):
    # LoRA misses 8 of full's 120 and gets 2 others: -3 pp [~-6, ~0]; a 2 pp limit lies inside the interval
    right = set(range(112)) | {150, 151}
    sweep(tmp_path / "r", [right, right - {0} | {152}], n=200)
    v = verdict_of(tmp_path / "r", tmp_path, max_gap=2.0)
    arm = lora(v)
    assert arm["judgement"] == UNDECIDED and arm["ci_pp"][0] < -2 < arm["ci_pp"][1]
    need = arm["to_decide"]
    assert need["questions"] > 200 and (need["seeds"] is None or need["seeds"] > 2)
    assert v["pick"] is None and v["recommendation"].startswith("No pick yet: LoRA r=16 is undecided")
    assert f"~{need['questions']:,} questions (now 200)" in v["recommendation"]


def test_judge_edges():
    assert judge(-0.009, 0.02, 0.01) == WITHIN
    assert judge(-0.05, -0.011, 0.01) == BEYOND
    assert judge(-0.02, 0.0, 0.01) == UNDECIDED
    assert judge(None, None, 0.01) is None


# ---------------------------------------------------------------- the projection, against a simulation


def _interval(answers: list[dict]) -> tuple[float, float]:
    """What seed_summary computes for these answers: gap -/+ 1.96 se, Newcombe's floor."""
    diffs = [[int(p) - int(f) for p, f in zip(a["peft"], a["full"])] for a in answers]
    gap = sum(map(sum, diffs)) / (len(diffs) * len(diffs[0]))
    return gap_interval95(gap, seed_noise(diffs)["se"], answers)


def test_questions_to_decide_match_a_simulation_with_the_same_variances():
    """Draw n' questions from the measured per-question pairs (the same variances): at the
    projected n' the simulated interval's near edge sits on the limit on average, while at half
    of n' it still straddles it."""
    rng = random.Random(0)
    n, m = 300, 0.02
    full = [i < 180 for i in range(n)]
    peft = [(i < 180 and i % 12 != 0) or (180 <= i < 186) for i in range(n)]  # -3 pp
    answers = [{"peft": peft, "full": full}]
    lo, hi = _interval(answers)
    assert judge(lo, hi, m) == UNDECIDED
    need = to_decide(answers, m)["questions"]
    assert need > n

    def edge(size: int, reps: int = 300) -> float:
        """Mean distance of the interval's upper edge above -m (positive: still undecided)."""
        total = 0.0
        for _ in range(reps):
            idx = [rng.randrange(n) for _ in range(size)]
            total += _interval([{"peft": [peft[i] for i in idx], "full": [full[i] for i in idx]}])[1] + m
        return total / reps

    gap = (sum(peft) - sum(full)) / n
    half_width = abs(gap + m)
    assert abs(edge(need)) < 0.15 * half_width  # on the limit, within the simulation's noise
    assert edge(need // 2) > 0.3 * half_width  # half as many questions: clearly still undecided


def test_projection_reproduces_todays_interval_and_seeds_shrink_only_seed_noise():
    rng = random.Random(1)
    n = 150
    full = [rng.random() < 0.6 for _ in range(n)]
    # seeds that move together (seed s gets more of full FT's right answers wrong): training noise
    seeds = [{"peft": [f and rng.random() > 0.04 + 0.12 * s for f in full], "full": full} for s in range(3)]
    c = gap_components(seeds)
    lo, hi = _interval(seeds)
    assert projected_interval(c, n, 3) == pytest.approx((lo, hi), abs=1e-12)
    # more seeds narrow the interval, but never below what the questions alone leave
    wide, narrow = projected_interval(c, n, 3), projected_interval(c, n, 300)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    q_only = 2 * 1.96 * (c["tau2"] / n) ** 0.5
    assert narrow[1] - narrow[0] >= q_only * 0.99


# ---------------------------------------------------------------- no verdict


def test_too_few_questions_for_the_limit_is_no_verdict(tmp_path):
    # 40 questions: one question is 2.5 pp, coarser than a 1 pp limit, whatever the answers
    sweep(tmp_path / "r", [set(range(24))], n=40)
    v = verdict_of(tmp_path / "r", tmp_path, max_gap=1.0)
    assert v["state"] == "no verdict" and v["pick"] is None
    assert "40 in-domain questions cannot resolve 1 pp" in v["recommendation"]
    assert v["resolution"]["questions_needed"] >= 100


def test_failed_reference_is_no_verdict(tmp_path):
    results = tmp_path / "r"
    make_record(results, "full", status="oom", error="CUDA out of memory")
    make_record(results, "lora", rank=16, indomain_correct=_answers(set(range(50)), 100), cost_usd=0.01)
    v = verdict_of(results, tmp_path)
    assert v["state"] == "no verdict"
    assert "full fine-tuning did not finish (did not fit on 1x NVIDIA H200)" in v["recommendation"]


def test_budget_and_variants(tmp_path):
    sweep(tmp_path / "r", [set(range(120))], n=200, peft_cost=2.0, full_cost=3.0)
    v = verdict_of(tmp_path / "r", tmp_path, max_gap=5.0, budget_usd=1.0, variants=20, target_tokens=8000)
    # the measured rate per real training token (800 per run) x 8000 tokens: 10x the run's cost
    assert lora(v)["cost"]["usd"] == pytest.approx(20.0) and not lora(v)["cost"]["estimated"]
    assert "per 1M real training tokens" in lora(v)["cost"]["label"]
    assert v["pick"] is None and v["recommendation"].startswith("No arm meets both limits: LoRA r=16 is within 5 pp")
    s = lora(v)["serving"]
    assert s["adapters_bytes"] == 4 * GiB + 20 * 40 * MiB and s["merged_bytes"] == 20 * 4 * GiB
    assert v["full"]["serving"]["merged_bytes"] == 20 * 4 * GiB


def test_serving_n_variants_is_measured_where_a_record_served_that_n(tmp_path):
    """With eval.variants' figures at N = --variants, the verdict quotes them (one 4-bit base holds
    far less than the footprint row's fp32 checkpoint); at another N it computes, and says so."""
    entry = {"n": 8, "resident_bytes": 300 * MiB, "merged_bytes": 8 * 4 * GiB,
             "mixed_vs_merged_prefill": {"ratio": 1.25, "ci": [1.2, 1.3]}}
    sweep(tmp_path / "r", [set(range(120))], n=200, variants=[{"n": 1, "resident_bytes": 200 * MiB}, entry],
          variants_settings={"batch": 4})
    v = verdict_of(tmp_path / "r", tmp_path, max_gap=5.0, variants=8)
    s = lora(v)["serving"]
    assert s["adapters_bytes"] == 300 * MiB and s["computed"] is False and "(measured)" in s["label"]
    assert s["mixed_prefill_overhead"] == pytest.approx(0.25)
    assert "serving 8 variants takes 300 MiB (one base + adapters, measured)" in v["recommendation"]
    # a batch of 4 holds 4 of the 8 variants: the text says so, not "a mixed batch of the 8"
    assert ("a mixed batch of 4 requests, each for another of the 8 variants, prefills at +25% against one "
            "merged model") in v["recommendation"]
    computed = lora(verdict_of(tmp_path / "r", tmp_path, max_gap=5.0, variants=20))["serving"]
    assert computed["computed"] is True and computed["adapters_bytes"] == 4 * GiB + 20 * 40 * MiB


# ---------------------------------------------------------------- limits: file and flags


def test_limits_file_flags_override_and_unknown_keys_refused(tmp_path):
    f = tmp_path / "limits.yaml"
    f.write_text("max_gap: 2\nvariants: 20\nbudget_usd: 500\n")
    limits = load_limits(f, {"max_gap": 0.5, "variants": None})
    assert limits == Limits(max_gap=0.5, variants=20, budget_usd=500)
    f.write_text("max_gapp: 2\n")
    with pytest.raises(LimitsError, match="unknown key.*max_gapp.*valid: max_gap"):
        load_limits(f)
    with pytest.raises(LimitsError, match="max_gap"):
        load_limits(None, {"max_gap": -1})


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.report", *args], cwd=RUN_CWD, capture_output=True,
                          text=True)


def test_cli_limits_and_usage_errors(tmp_path):
    sweep(tmp_path / "r", [set(range(120))], n=200)
    (tmp_path / "limits.yaml").write_text("max_gap: 3\nvariants: 4\n")
    proc = _report("--results", str(tmp_path / "r"), "--reports", str(tmp_path / "out"), "--limits",
                   str(tmp_path / "limits.yaml"), "--budget-usd", "100")
    assert proc.returncode == 0, proc.stderr
    assert "verdict:" in proc.stdout
    out = json.loads((tmp_path / "out" / VERDICT_JSON).read_text())
    assert out["limits"]["max_gap"] == 3 and out["limits"]["variants"] == 4 and out["limits"]["budget_usd"] == 100
    for bad in (["--max-gap", "0"], ["--target-model", "llama-9-arch"], ["--target-hardware", "tpu-v9"],
                ["--limits", str(tmp_path / "missing.yaml")]):
        proc = _report("--results", str(tmp_path / "r"), "--reports", str(tmp_path / "bad"), *bad)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert len(proc.stderr.strip().splitlines()[-1]) > 10 and "Traceback" not in proc.stderr


def test_the_run_schema_and_the_report_share_the_limits_and_their_defaults():
    """harness-run's verdict settings (conf/config.yaml, config.VerdictConfig) are the report's
    Limits: the same keys, the same defaults."""
    from dataclasses import fields

    import yaml

    from harness.config import CONF_DIR, VerdictConfig

    assert [f.name for f in fields(VerdictConfig)] == list(LIMIT_KEYS)
    assert yaml.safe_load((CONF_DIR / "config.yaml").read_text())["verdict"] == asdict(Limits())
