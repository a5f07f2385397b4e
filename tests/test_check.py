"""harness-check on constructed sweeps: regression -> 1, fine -> 0, cannot judge -> 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.check import GROUP_FIELDS, main
from harness.records import REQUIRED_METRICS, run_id_for, stable_hash, write_items, write_record

N = 200
EVAL = {"mmlu_limit": N, "num_fewshot": 0}


def write_sweep(
    results: Path,
    peft_right: int = 110,
    full_right: int = 120,
    seeds: tuple[int, ...] = (0, 1),
    evals: dict = EVAL,
    lm_eval: str = "0.4.9",
    model: str = "tiny",
    peft_status: str = "ok",
) -> Path:
    """A full and a LoRA r8 run per seed; question i is right when i < *_right (+ seed, for spread)."""
    for seed in seeds:
        pair_key = stable_hash([model, "demo", seed, evals])
        for method, rank, right in (("full", None, full_right), ("lora", 8, peft_right + seed)):
            config = {
                "model": {"name": model},
                "data": {"name": "demo"},
                "seed": seed,
                "eval": evals,
                "method": {"name": method},
            }
            run_id = run_id_for(method, rank, stable_hash(config))
            answers = [
                {
                    "task": "mmlu",
                    "id": f"q{i}",
                    "subject": "s",
                    "category": None,
                    "pred": 0,
                    "target": 0,
                    "correct": i < right,
                }
                for i in range(N)
            ]
            status = peft_status if method == "lora" else "ok"
            write_record(
                results,
                {
                    "schema": 1,
                    "run_id": run_id,
                    "config_hash": stable_hash(config),
                    "pair_key": pair_key,
                    "eval_key": stable_hash([model, evals]),
                    "status": status,
                    "error": None if status == "ok" else "CUDA out of memory",
                    "method": method,
                    "rank": rank,
                    "model": {"name": model, "source": "test", "total_params": 1000, "random_weights": True},
                    "config": config,
                    "env": {
                        "versions": {"lm_eval": lm_eval, "torch": "2.13"},
                        "git_commit": "abc",
                        "device": "cpu",
                        "device_name": "cpu",
                    },
                    "items_file": write_items(results, run_id, answers) if status == "ok" else None,
                    "base_run_id": None,
                    "metrics": {**{m: None for m in REQUIRED_METRICS}, "mmlu_acc": right / N, "mmlu_n": N},
                },
            )
    return results


@pytest.fixture
def baseline(tmp_path) -> Path:
    """A baseline made from the reference sweep (LoRA ~5 pp behind full)."""
    path = tmp_path / "baselines" / "peft-gap.json"
    assert main(["--baseline", str(path), "--results", str(write_sweep(tmp_path / "ref")), "--update-baseline"]) == 0
    return path


def check(baseline: Path, results: Path, *extra: str) -> int:
    return main(["--baseline", str(baseline), "--results", str(results), *extra])


def test_identical_rerun_passes(tmp_path, baseline):
    assert check(baseline, write_sweep(tmp_path / "cur")) == 0


def test_worse_peft_arm_fails(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", peft_right=20)) == 1
    err = capsys.readouterr().err
    assert "regression" in err and "lora r8" in err and "tolerance" in err


def test_small_drop_within_tolerance_passes(tmp_path, baseline):
    # 2 questions of 200 = 1 pp, well inside the ~3 pp tolerance of this sample size
    assert check(baseline, write_sweep(tmp_path / "cur", peft_right=108)) == 0


def test_narrowing_gap_passes(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", peft_right=130)) == 0
    assert "narrower" in capsys.readouterr().out


def test_floor_and_z_set_the_tolerance(tmp_path, baseline):
    cur = write_sweep(tmp_path / "cur", peft_right=108)
    assert check(baseline, cur, "--z", "0", "--floor-pp", "0.5") == 1
    assert check(baseline, cur, "--z", "0", "--floor-pp", "1.5") == 0


def test_mismatched_eval_setting_cannot_judge(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", evals={**EVAL, "num_fewshot": 5})) == 2
    assert "num_fewshot" in capsys.readouterr().err


def test_mismatched_lm_eval_version_cannot_judge(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", lm_eval="0.5.0")) == 2
    assert "lm-eval version" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content",
    [
        None,
        "{not json",
        json.dumps({"schema": 99, "groups": []}),
        json.dumps({"schema": 1, "groups": [{"key": "x"}]}),
        json.dumps({"schema": 1, "groups": [dict.fromkeys(GROUP_FIELDS, 0)]}),
    ],
)
def test_missing_or_invalid_baseline_cannot_judge(tmp_path, content, capsys):
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    assert check(path, write_sweep(tmp_path / "cur")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "baseline" in err[0]


def test_nothing_comparable_cannot_judge(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", model="other")) == 2
    assert "nothing comparable" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert check(baseline, tmp_path / "empty") == 2
    assert check(baseline, tmp_path / "does-not-exist") == 2


def test_failed_arm_cannot_pass(tmp_path, baseline, capsys):
    # an OOM'd PEFT arm leaves no gap: the gate must not pass by silence
    assert check(baseline, write_sweep(tmp_path / "cur", peft_status="oom")) == 2


def test_unknown_metric_is_a_usage_error(tmp_path, baseline):
    with pytest.raises(SystemExit) as exc:
        check(baseline, tmp_path, "--metrics", "mmlu,hellaswag")
    assert exc.value.code == 2


def test_step_summary_gets_the_table(tmp_path, baseline, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert check(baseline, write_sweep(tmp_path / "cur", peft_right=20)) == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, not overwritten
    assert "| group | metric | baseline gap | current gap | tolerance | verdict |" in text
    # seeds 0, 1: (20 - 120) / 200 and (21 - 120) / 200, mean -49.75 pp; baseline (-10 - 9) / 400
    assert "| mmlu | -4.75 pp | -49.75 pp |" in text and "REGRESSION" in text


def test_update_baseline_round_trips(tmp_path, baseline):
    data = json.loads(baseline.read_text())
    assert data["schema"] == 1
    made = data["made_from"]
    assert made["versions"]["lm_eval"] == "0.4.9" and made["eval"] == EVAL and made["device"] == "cpu"
    assert "git_commit" in made and data["created_at"]
    assert len(made["run_ids"]) == 4
    (group,) = data["groups"]
    assert (group["method"], group["rank"], group["metric"], group["n_seeds"]) == ("lora", 8, "mmlu", 2)
    assert group["seeds"] == {"0": pytest.approx(-0.05), "1": pytest.approx(-0.045)}
    assert group["gap"] == pytest.approx(-0.0475)
    assert group["se"] > 0

    # checking never rewrites the baseline; only --update-baseline does
    before = baseline.read_bytes()
    assert check(baseline, write_sweep(tmp_path / "cur", peft_right=20)) == 1
    assert baseline.read_bytes() == before
    assert check(baseline, tmp_path / "cur", "--update-baseline") == 0
    assert json.loads(baseline.read_text())["groups"][0]["gap"] == pytest.approx(-0.4975)
    assert check(baseline, tmp_path / "cur") == 0
    assert not list(baseline.parent.glob("*.tmp"))
