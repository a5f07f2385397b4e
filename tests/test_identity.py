"""One identity: run (config_hash), pair (pair_key) and comparison group, agreed on by plan, stats,
report and gate. Configs are composed through Hydra and planned by harness.plan.plan, as harness-run does."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import planned

from harness import identity
from harness.check import main as check_main
from harness.config import CONF_DIR
from harness.records import REQUIRED_METRICS, write_items, write_record
from harness.report import AT_A_GLANCE, build_report
from harness.stats import pair_gaps, seed_summary


def job(*overrides: str) -> dict:
    return planned("model=tiny-random", *overrides)


@pytest.mark.parametrize(
    "override",
    [
        "results_dir=elsewhere",
        "reports_dir=elsewhere",
        "force=true",
        "isolate=false",
        "report=false",
        "projected_tokens=1000000",
        "eval.latency.reps=9",
        "eval.latency.enabled=false",
        "hardware.price_per_core_hour_usd=9.5",
        "hardware.price_source=elsewhere",
        "distributed.main_process_port=29600",
    ],
)
def test_what_does_not_change_a_result_stays_out(override):
    a, b = job("hardware=cpu"), job("hardware=cpu", override)
    assert (a["config_hash"], a["pair_key"], a["run_id"], a["eval_key"]) == (
        b["config_hash"], b["pair_key"], b["run_id"], b["eval_key"])


@pytest.mark.parametrize("override", ["method.learning_rate=5e-4", "method.alpha=8", "method.target_modules=[q_proj]",
                                      "method.r=8"])
def test_method_settings_are_other_runs_of_one_pair(override):
    a, b = job("method=lora"), job("method=lora", override)
    assert a["config_hash"] != b["config_hash"] and a["pair_key"] == b["pair_key"]


@pytest.mark.parametrize("override", ["seed=1", "train.max_steps=7", "data.n_heldout=8", "eval.mmlu.limit=2",
                                      "distributed=ddp"])
def test_what_the_arms_share_is_the_pair(override):
    a, b = job("method=lora"), job("method=lora", override)
    assert a["pair_key"] != b["pair_key"]


@pytest.mark.parametrize("override", ["train.max_grad_norm=1.0", "train.lr_scheduler_kwargs={}"])
def test_a_later_setting_at_its_neutral_value_leaves_identity_alone(override):
    """Settings added after runs existed: at the value that reproduces the old behaviour they leave
    every run id, pair and baseline group as it was."""
    a, b = job("method=lora"), job("method=lora", override)
    assert (a["config_hash"], a["pair_key"]) == (b["config_hash"], b["pair_key"])
    assert override.split("=")[0].split(".")[1] not in identity.result_config(a["config"])["train"]


@pytest.mark.parametrize("overrides", [["train.max_grad_norm=0.3"],
                                       ["+train.lr_scheduler_kwargs.num_cycles=0.4", "train.lr_scheduler=cosine"]])
def test_a_later_setting_set_away_from_neutral_is_another_pair(overrides):
    a = job("method=lora", "train.lr_scheduler=cosine")
    b = job("method=lora", "train.lr_scheduler=cosine", *overrides)
    assert a["pair_key"] != b["pair_key"]


def test_world_size_is_part_of_the_pair():
    a = job("method=lora", "distributed=ddp", "distributed.num_processes=2")
    b = job("method=lora", "distributed=ddp", "distributed.num_processes=4")
    assert a["pair_key"] != b["pair_key"]


def _write(results: Path, planned: dict, right: int, n: int = 16) -> dict:
    """A record as harness-run writes it, with made-up answers (question i right when i < right)."""
    items = [{"task": "indomain", "id": f"heldout-{i}", "subject": "s", "category": None, "pred": 0, "target": 0,
              "correct": i < right} for i in range(n)]
    rec = {
        "schema": 1, "run_id": planned["run_id"], "config_hash": planned["config_hash"],
        "pair_key": planned["pair_key"], "eval_key": planned["eval_key"], "status": "ok", "error": None,
        "method": planned["method"], "rank": planned["rank"],
        "model": {"name": "tiny-random", "source": "config", "total_params": 1000, "random_weights": False},
        "config": planned["config"], "env": {"versions": {"lm_eval": "0.4.13"}, "device": "cpu"},
        "items_file": write_items(results, planned["run_id"], items), "base_run_id": None,
        "metrics": {**dict.fromkeys(REQUIRED_METRICS), "indomain_acc": right / n, "indomain_n": n},
    }
    write_record(results, rec)
    return rec


def test_a_learning_rate_sweep_is_two_groups_everywhere(tmp_path):
    """full + LoRA at two learning rates x two seeds: plan, stats, report and gate agree."""
    results = tmp_path / "results"
    planned = []
    for seed in (0, 1):
        planned.append(job("method=full", f"seed={seed}", "hardware=cpu"))
        for lr in ("1e-4", "1e-3"):
            planned.append(job("method=lora", f"seed={seed}", f"method.learning_rate={lr}", "hardware=cpu"))
    for p in planned:
        _write(results, p, right=16 if p["method"] == "full" else (12 if p["config"]["method"]["learning_rate"] == 1e-4 else 14) - p["config"]["seed"])

    # plan: one pair per seed, shared by the full run and both LoRA runs
    assert len({p["pair_key"] for p in planned}) == 2
    # stats: two groups (one per learning rate), each pooling exactly the two seeds
    rows = seed_summary(pair_gaps(_records(results), results))
    assert len(rows) == 2 and all(r["n_seeds"] == 2 for r in rows)
    assert sorted(r["gap"] for r in rows) == [pytest.approx((-4.5) / 16), pytest.approx((-2.5) / 16)]
    assert all(" lr " in r["key"] for r in rows) and len({r["group"] for r in rows}) == 2
    # report: one table, three columns (full and one per learning rate), a gap in each LoRA column
    md = build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text()
    header = next(line for line in md.split("\n## ", 2)[2].splitlines() if line.startswith("|"))  # after the verdict
    assert "full FT (2 seeds)" in header and "LoRA r=16 lr 0.0001 (2 seeds)" in header
    assert "LoRA r=16 lr 0.001 (2 seeds)" in header
    assert md.count("-28.12 ± 4.42 pp") == 1 and md.count("-15.62 ± 4.42 pp") == 1
    # gate: a baseline of two groups, and a rerun of the same records passes
    baseline = tmp_path / "baseline.json"
    assert check_main(["--baseline", str(baseline), "--results", str(results), "--update-baseline"]) == 0
    import json

    groups = json.loads(baseline.read_text())["groups"]
    assert sorted(g["group"] for g in groups) == sorted(r["group"] for r in rows)
    assert check_main(["--baseline", str(baseline), "--results", str(results)]) == 0


def test_a_full_learning_rate_sweep_is_an_ambiguous_reference(tmp_path, capsys):
    results = tmp_path / "results"
    fulls = [_write(results, job("method=full", f"method.learning_rate={lr}", "hardware=cpu"), 16) for lr in ("1e-4", "3e-4")]
    _write(results, job("method=lora", "hardware=cpu"), 12)
    refs, ambiguous = identity.full_references(_records(results))
    assert refs == {} and list(ambiguous.values()) == [sorted(f["run_id"] for f in fulls)]
    assert pair_gaps(_records(results), results) == []  # never "whichever sorts first"
    baseline = tmp_path / "baseline.json"
    assert check_main(["--baseline", str(baseline), "--results", str(results), "--update-baseline"]) == 2
    assert "--reference" in capsys.readouterr().err
    # the explicit choice
    chosen = pair_gaps(_records(results), results, references=[fulls[1]["run_id"]])
    assert {g["full_run_id"] for g in chosen} == {fulls[1]["run_id"]}


def _records(results: Path) -> list[dict]:
    from harness.records import load_records

    return load_records(results)


def test_skip_on_rerun_says_when_code_or_packages_changed(tmp_path):
    """An ok record made with another commit and torch is skipped, and the skip says so."""
    from conftest import TINY, harness_run

    planned = job("method=lora", *TINY[1:], f"results_dir={tmp_path}")
    rec = _write(tmp_path, planned, 4, n=8)
    rec["env"] = {"versions": {"torch": "0.0.1"}, "git_commit": "0" * 40}
    write_record(tmp_path, rec)
    assert identity.provenance_changes(rec, CONF_DIR.parent)[-1] == f"torch 0.0.1 -> {_version('torch')}"
    proc = harness_run("method=lora", *TINY, f"results_dir={tmp_path}", "isolate=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if "skipped" in ln)
    assert "made with other code or packages" in line and "torch 0.0.1 ->" in line
    assert "git commit 0000000000 ->" in line or not (CONF_DIR.parent / ".git").exists()


def _version(pkg: str) -> str:
    import importlib.metadata as md

    return md.version(pkg)


def test_a_base_model_record_is_reused_only_on_the_same_hardware_and_precision(tmp_path, monkeypatch):
    """A CPU fp32 base evaluation is not the base of a run on other hardware or in another precision."""
    from conftest import TINY

    from harness import job as run
    from harness.records import find_ok

    args = [*TINY[1:], f"results_dir={tmp_path}", "eval.on_random_weights=true", "eval.indomain.batch_size=8",
            "eval.latency.enabled=false"]
    cpu = job("method=lora", *args)
    run.execute(cpu)  # evaluates the base model and records it
    assert find_ok(tmp_path, cpu["base_run_id"])["config"]["hardware"]["name"] == "cpu"
    for other in ("hardware=h200", "train.precision=bf16", "model.dtype=bf16"):
        assert find_ok(tmp_path, job("method=lora", *args, other)["base_run_id"]) is None, other
    # the same hardware and precision: another seed and method reuse it, not evaluating again
    again = job("method=full", *args, "seed=1")
    assert again["base_run_id"] == cpu["base_run_id"]
    monkeypatch.setattr(run, "base_record", lambda *a, **k: pytest.fail("the base model was evaluated again"))
    assert run.execute(again)["base_run_id"] == cpu["base_run_id"]
