"""harness-check on constructed sweeps: regression -> 1, fine -> 0, cannot judge -> 2 (which wins).

Records are built through harness.identity (config_hash, pair_key, run_id), as harness-run does.
The shape follows the committed ci-smoke baseline: 128 held-out questions, full FT 125 right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import identity
from harness.check import GROUP_FIELDS, answers_path, main
from harness.records import REQUIRED_METRICS, write_items, write_record

ROOT = Path(__file__).resolve().parent.parent
N = 128
EVAL = {"mmlu": {"enabled": False}, "indomain": {"enabled": True}, "latency": {"enabled": False}}


def config(method: str, seed: int, *, n: int = N, evals: dict = EVAL, model: str = "tiny", lr: float | None = None,
           rank: int | None = None) -> dict:
    return {
        "model": {"name": model},
        "data": {"name": "demo", "n_heldout": n},
        "train": {"max_steps": 60},
        "seed": seed,
        "eval": evals,
        "method": {"name": method, "r": rank, "learning_rate": lr or (1e-4 if method == "full" else 1e-3)},
        "results_dir": "anywhere",  # not part of any identity
    }


def write_run(results: Path, cfg: dict, right: set[int] | int, *, n: int = N, lm_eval: str = "0.4.13",
              status: str = "ok", items: bool = True) -> dict:
    """One run record; question i is answered right when i is in ``right`` (or i < right)."""
    method, rank = cfg["method"]["name"], cfg["method"]["r"]
    right = set(range(right)) if isinstance(right, int) else right
    run_id = identity.run_id(method, rank, cfg)
    answers = [
        {"task": "indomain", "id": f"heldout-{i}", "subject": "s", "category": None, "pred": 0,
         "target": i % 4, "correct": i in right}
        for i in range(n)
    ]
    record = {
        "schema": 1,
        "run_id": run_id,
        "config_hash": identity.config_hash(cfg),
        "pair_key": identity.pair_key(cfg),
        "eval_key": identity.base_key(cfg),
        "status": status,
        "error": None if status == "ok" else "CUDA out of memory",
        "method": method,
        "rank": rank,
        "model": {"name": cfg["model"]["name"], "source": "test", "total_params": 1000, "random_weights": True},
        "config": cfg,
        "env": {"versions": {"lm_eval": lm_eval, "torch": "2.13"}, "git_commit": "abc", "device": "cpu",
                "device_name": "cpu"},
        "items_file": write_items(results, run_id, answers) if status == "ok" and items else None,
        "base_run_id": None,
        "metrics": {**{m: None for m in REQUIRED_METRICS}, "indomain_acc": len(right & set(range(n))) / n,
                    "indomain_stderr": 0.03, "indomain_n": n},
    }
    write_record(results, record)
    return record


def write_sweep(results: Path, lora_right: int = 100, full_right: int = 125, seeds: tuple[int, ...] = (0,),
                spread: int = 0, rank: int = 16, **kw) -> Path:
    """Full and LoRA per seed; LoRA answers ``lora_right`` questions right, the first ``spread * seed``
    of them traded for others (so seeds differ question by question, not in accuracy)."""
    for seed in seeds:
        write_run(results, config("full", seed, **{k: v for k, v in kw.items() if k in ("n", "evals", "model")}),
                  full_right, **{k: v for k, v in kw.items() if k in ("n", "lm_eval", "items")})
        shift = spread * seed
        lora = set(range(shift, lora_right)) | set(range(N - shift, N)) if shift else lora_right
        write_run(results, config("lora", seed, rank=rank, **{k: v for k, v in kw.items() if k in ("n", "evals", "model")}),
                  lora, **{k: v for k, v in kw.items() if k in ("n", "lm_eval", "items", "status")})
    return results


@pytest.fixture
def baseline(tmp_path) -> Path:
    """A baseline made from three seeds of the ci-smoke shape (LoRA 100/128, full 125/128)."""
    path = tmp_path / "baselines" / "ci-smoke.json"
    ref = write_sweep(tmp_path / "ref", seeds=(0, 1, 2), spread=2)
    assert main(["--baseline", str(path), "--results", str(ref), "--update-baseline"]) == 0
    return path


def check(baseline: Path, results: Path, *extra: str) -> int:
    return main(["--baseline", str(baseline), "--results", str(results), *extra])


# ---------------------------------------------------------------- the three cases


def test_regression_on_the_same_questions_fails(tmp_path, baseline, capsys):
    # LoRA 100 -> 88 of the same 128 (gap -19.5 -> -28.9 pp): the old gate let it through
    assert check(baseline, write_sweep(tmp_path / "cur", lora_right=88, seeds=(5,))) == 1
    err = capsys.readouterr().err
    assert "regression" in err and "lora r16" in err and "tolerance" in err


def test_fewer_questions_cannot_judge(tmp_path, baseline, capsys):
    # data.n_heldout=8: the same regression on 8 questions is not comparable
    assert check(baseline, write_sweep(tmp_path / "cur", lora_right=5, full_right=8, n=8)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "fewer questions (8) than the baseline (128)" in err[-1]


def test_missing_answers_cannot_judge(tmp_path, baseline, capsys):
    # the same regression without the per-question files: unpaired where the baseline is paired
    assert check(baseline, write_sweep(tmp_path / "cur", lora_right=88, items=False)) == 2
    assert "unpaired" in capsys.readouterr().err.strip().splitlines()[-1]


def test_other_questions_cannot_judge(tmp_path, baseline, capsys):
    cur = write_sweep(tmp_path / "cur")
    for path in cur.glob("*.items*.jsonl.gz"):  # same count, other questions under other ids
        import gzip

        lines = gzip.decompress(path.read_bytes()).decode().replace("heldout-", "other-")
        path.write_bytes(gzip.compress(lines.encode()))
    assert check(baseline, cur) == 2
    assert "other questions" in capsys.readouterr().err


# ---------------------------------------------------------------- verdicts


def test_rerun_with_other_seeds_passes(tmp_path, baseline):
    assert check(baseline, write_sweep(tmp_path / "cur", seeds=(7,), spread=2)) == 0
    assert check(baseline, write_sweep(tmp_path / "cur2", seeds=(3, 4), spread=1)) == 0


def test_narrowing_gap_passes(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", lora_right=120)) == 0
    assert "narrower" in capsys.readouterr().out


def test_floor_and_z_set_the_tolerance(tmp_path, baseline):
    cur = write_sweep(tmp_path / "cur", lora_right=98)  # 2 of 128 = 1.56 pp
    assert check(baseline, cur, "--z", "0", "--floor-pp", "1") == 1
    assert check(baseline, cur, "--z", "0", "--floor-pp", "2") == 0


def test_cannot_judge_wins_over_regression(tmp_path, capsys):
    ref = write_sweep(tmp_path / "ref", seeds=(0, 1), spread=2)
    write_sweep(ref, seeds=(0, 1), spread=2, rank=8)  # a second group: LoRA r8
    path = tmp_path / "baseline.json"
    assert check(path, ref, "--update-baseline") == 0
    cur = write_sweep(tmp_path / "cur", lora_right=60)  # r16 regressed
    write_sweep(cur, rank=8)
    next(cur.glob("lora-r8-*.items*.jsonl.gz")).unlink()  # r8 unpaired
    assert check(path, cur) == 2
    captured = capsys.readouterr()
    assert "REGRESSION" in captured.out and "lora r8" in captured.err and "unpaired" in captured.err


def test_new_group_without_baseline_does_not_fail(tmp_path, baseline, capsys):
    cur = write_sweep(tmp_path / "cur")
    write_sweep(cur, rank=64, lora_right=10)  # a new arm, no baseline: shown, not judged
    assert check(baseline, cur) == 0
    assert "new (no baseline)" in capsys.readouterr().out


def test_mismatched_setting_cannot_judge(tmp_path, baseline, capsys):
    evals = {**EVAL, "mmlu": {"enabled": False, "num_fewshot": 5}}
    assert check(baseline, write_sweep(tmp_path / "cur", evals=evals)) == 2
    assert "eval.mmlu.num_fewshot" in capsys.readouterr().err


def test_mismatched_lm_eval_version_cannot_judge(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", lm_eval="0.5.0")) == 2
    assert "lm-eval version" in capsys.readouterr().err


def test_failed_arm_cannot_pass(tmp_path, baseline):
    # an OOM'd PEFT arm leaves no gap: the gate must not pass by silence
    assert check(baseline, write_sweep(tmp_path / "cur", status="oom")) == 2


def test_several_full_runs_in_one_pair_need_a_reference(tmp_path, baseline, capsys):
    cur = write_sweep(tmp_path / "cur")
    other_full = write_run(cur, config("full", 0, lr=3e-4), 120)
    assert check(baseline, cur) == 2
    assert "several full fine-tuning runs share one pair" in capsys.readouterr().err
    # naming the reference is the explicit choice; the other full run makes another group
    assert check(baseline, cur, "--reference", next(p.stem for p in cur.glob("full-*.json")
                                                      if p.stem != other_full["run_id"])) == 0


@pytest.mark.parametrize(
    "content",
    [
        None,
        "{not json",
        json.dumps({"schema": 99, "groups": []}),
        json.dumps({"schema": 2, "groups": [{"key": "x"}]}),
        json.dumps({"schema": 2, "groups": [dict.fromkeys(GROUP_FIELDS, 0)]}),
    ],
)
def test_missing_or_invalid_baseline_cannot_judge(tmp_path, content, capsys):
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    assert check(path, write_sweep(tmp_path / "cur")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "baseline" in err[0]


def test_missing_answers_file_cannot_judge(tmp_path, baseline, capsys):
    answers_path(baseline).unlink()
    assert check(baseline, write_sweep(tmp_path / "cur")) == 2
    assert "answers" in capsys.readouterr().err


def test_nothing_comparable_cannot_judge(tmp_path, baseline, capsys):
    assert check(baseline, write_sweep(tmp_path / "cur", model="other")) == 2
    assert "no ok paired PEFT/full result" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert check(baseline, tmp_path / "empty") == 2
    assert check(baseline, tmp_path / "does-not-exist") == 2


def test_unknown_metric_is_a_usage_error(tmp_path, baseline, capsys):
    assert check(baseline, tmp_path, "--metrics", "mmlu,hellaswag") == 2  # no run scored hellaswag
    assert "--metrics 'hellaswag': no run in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        check(baseline, tmp_path, "--metrics", ",")
    assert exc.value.code == 2


def test_step_summary_gets_the_table(tmp_path, baseline, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert check(baseline, write_sweep(tmp_path / "cur", lora_right=88)) == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, not overwritten
    assert "| group | metric | baseline gap | current gap | change | tolerance | verdict |" in text
    # baseline: (100 - 125) / 128 every seed; current (88 - 125) / 128; change -12 / 128
    assert "| -19.53 pp (3 seeds) | -28.91 pp (1 seed) | -9.38 pp |" in text and "REGRESSION" in text


def test_update_baseline_round_trips(tmp_path, baseline):
    data = json.loads(baseline.read_text())
    assert data["schema"] == 2 and data["created_at"]
    made = data["made_from"]
    assert made["versions"]["lm_eval"] == "0.4.13" and made["device"] == "cpu" and "git_commit" in made
    assert "constraints_sha256" in made and len(made["run_ids"]) == 6
    (group,) = data["groups"]
    assert (group["method"], group["rank"], group["metric"], group["n_seeds"]) == ("lora", 16, "indomain", 3)
    assert (group["n"], group["paired"]) == (128, True) and group["questions"]
    assert group["gap"] == pytest.approx(-25 / 128) and group["v_seed"] > 0
    answers = json.loads(answers_path(baseline).read_text())["groups"][f"{group['group']}/indomain"]
    assert sorted(answers["seeds"]) == ["0", "1", "2"]
    assert answers["ids"] == sorted(f"heldout-{i}" for i in range(N))  # sorted by id, as text
    assert answers["seeds"]["0"]["full"] == "".join("1" if int(q.split("-")[1]) < 125 else "0" for q in answers["ids"])

    # checking never rewrites the baseline; only --update-baseline does
    before = baseline.read_bytes()
    assert check(baseline, write_sweep(tmp_path / "cur", lora_right=60)) == 1
    assert baseline.read_bytes() == before
    assert check(baseline, tmp_path / "cur", "--update-baseline") == 0
    assert json.loads(baseline.read_text())["groups"][0]["gap"] == pytest.approx(-65 / 128)
    assert check(baseline, tmp_path / "cur") == 0
    assert not list(baseline.parent.glob("*.tmp"))


def test_console_script_exit_codes(tmp_path, baseline):
    """The installed ``harness-check`` entry point returns the gate's exit code to the shell."""
    script = Path(sys.executable).parent / "harness-check"
    if not script.exists():
        pytest.skip("harness-check is not installed beside this interpreter")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = lambda results: subprocess.run([str(script), "--baseline", str(baseline), "--results", str(results)],
                                         capture_output=True, text=True, env=env, timeout=120).returncode
    assert run(write_sweep(tmp_path / "ok")) == 0
    assert run(write_sweep(tmp_path / "worse", lora_right=88)) == 1
    assert run(write_sweep(tmp_path / "few", n=8, full_right=8, lora_right=5)) == 2


def test_ci_smoke_config_has_a_baseline_group():
    """The committed baseline must hold the group `make ci-smoke` produces, or CI's gate judges nothing
    ("new group" passes). Fails when a config key or default that enters run hashes changes without
    `make refresh-baseline`."""
    from conftest import planned

    def job(method: str) -> dict:
        return planned("experiment=ci-smoke", f"method={method}", "seed=0")

    lora, full = job("lora"), job("full")
    key = identity.gap_key({"config": lora["config"], "method": "lora"}, {"config": full["config"], "method": "full"})
    baseline = json.loads((ROOT / "results" / "baselines" / "ci-smoke.json").read_text())
    groups = {g["group"] for g in baseline["groups"]}
    assert key in groups, (
        "the ci-smoke config's comparison group is not in results/baselines/ci-smoke.json: "
        "run `make refresh-baseline`")
    assert full["pair_key"] == lora["pair_key"]
