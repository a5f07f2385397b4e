"""Every job of a command is checked before the first runs; a user's own config folder on top."""

import random

import pytest
from conftest import TINY, harness_run
from test_data_files import fuzz_files

from harness import plan as preflight
from harness.config import CONF_DIR

FILE_TINY = [a for a in TINY if not a.startswith("data.")]  # data=file has no n_train / n_heldout


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    return lines[0]


def test_a_bad_path_in_the_third_job_stops_the_sweep_before_anything_runs(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"prompt": "p", "completion": " c"}\n')
    (tmp_path / "b.jsonl").write_text(good.read_text())
    results = tmp_path / "results"
    proc = harness_run("-m", "data=file", f"data.path={good},{tmp_path / 'b.jsonl'},{tmp_path / 'missing.jsonl'}",
                       *FILE_TINY, f"results_dir={results}", cwd=tmp_path)
    assert f"data.path='{tmp_path / 'missing.jsonl'}' does not exist" in one_error_line(proc)
    assert "#0 :" not in proc.stdout and "trainable params" not in proc.stdout  # no job launched
    assert not results.exists() and not (tmp_path / ".hydra-runs").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model=hub"], "model.path is required with model=hub"),
        (["data=file"], "data.path is required with data=file"),
        (["-m", "method=full,lora", "data=file"], "data.path is required with data=file"),
        (["train.no_such_key=1"], "Could not override 'train.no_such_key'"),
    ],
)
def test_a_missing_value_is_one_line_not_a_traceback(tmp_path, args, needle):
    proc = harness_run(*args, f"results_dir={tmp_path / 'results'}", cwd=tmp_path)
    assert needle in one_error_line(proc)
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "argv,n_jobs",
    [
        ([], 1),
        (["experiment=demo"], 3),  # the preset's own hydra.sweeper.params
        (["experiment=ci-smoke", "method=lora"], 1),  # the command line narrows the preset's sweep
        (["-m", "method=full,lora", "method.r=8,16", "seed=0,1"], 8),
    ],
)
def test_jobs_are_expanded_as_hydra_expands_them(argv, n_jobs):
    configs = preflight.job_configs(argv, CONF_DIR)
    assert len(configs) == n_jobs
    if argv[:1] == ["-m"]:
        assert sorted({(c.method.name, c.method.r, c.seed) for c in configs}) == sorted(
            {(m, r, s) for m in ("full", "lora") for r in (8, 16) for s in (0, 1)})


def test_corrupted_data_files_fail_in_preflight_with_one_line(tmp_path, capsys):
    """A sample of the loader fuzz, through the sweep-wide check in-process."""
    paths = list(fuzz_files(tmp_path, 400, seed=14))
    for path, kind in random.Random(0).sample(paths, 12):
        results = tmp_path / "results"
        with pytest.raises(SystemExit) as stop:
            preflight.preflight(["-m", "method=full,lora", *FILE_TINY, "data=file", f"data.path={path}",
                             f"results_dir={results}"], CONF_DIR)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(err) == 1 and str(path) in err[0], (kind, err)
        assert not results.exists()


def test_corrupted_data_files_through_the_cli(tmp_path):
    for path, kind in list(fuzz_files(tmp_path, 400, seed=14))[:400:250]:  # two of them
        results = tmp_path / "results"
        proc = harness_run(*FILE_TINY, "data=file", f"data.path={path}", f"results_dir={results}", cwd=tmp_path)
        assert str(path) in one_error_line(proc), kind
        assert not results.exists()


USER_MODEL = """# a user's own model option, beside the packaged ones
name: my-tiny
source: config
path: null
arch: tiny-random
gguf: null
"""


@pytest.mark.slow
def test_a_users_config_folder_adds_options(tmp_path):
    user = tmp_path / "my-conf"
    (user / "model").mkdir(parents=True)
    (user / "model" / "my-tiny.yaml").write_text(USER_MODEL)
    # both ways Hydra offers: --config-dir, and hydra.searchpath
    for extra in (["--config-dir", str(user)], [f"hydra.searchpath=[file://{user}]"]):
        (cfg,) = preflight.job_configs([*extra, "model=my-tiny"], CONF_DIR)
        assert cfg.model.name == "my-tiny" and cfg.method.name == "lora"  # packaged defaults still there
    results = tmp_path / "results"
    proc = harness_run("--config-dir", str(user), "model=my-tiny", *[a for a in TINY if not a.startswith("model=")],
                       "isolate=false", f"results_dir={results}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name.split("-")[0] for p in results.glob("*.json")] == ["lora"]
    proc = harness_run("model=my-tiny", f"results_dir={results}", cwd=tmp_path)  # without the folder: unknown
    assert "model='my-tiny' is unknown" in one_error_line(proc)


def test_hydras_own_flags_answer_once(tmp_path):
    proc = harness_run("--version", cwd=tmp_path)
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).count("Hydra 1.") == 1
    proc = harness_run("--no-such-flag", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("usage:") == 1
    proc = harness_run("--cfg", "job", "model=hub", cwd=tmp_path)  # shows the config; nothing runs, nothing checked
    assert proc.returncode == 0 and "path: ???" in proc.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["data.overlong=cut"], "data.overlong='cut' is invalid; give one of truncate, drop"),
        # every job is planned: the second seq_len leaves no room for a completion token
        (["-m", "train.seq_len=64,16", "data.min_prompt_tokens=16"], "data.min_prompt_tokens=16 is invalid"),
        # a schedule the Trainer cannot build fails here, not after the model has loaded
        (["train.lr_scheduler=warmup_stable_decay"], "missing 1 required positional argument: 'num_decay_steps'"),
        (["+train.lr_scheduler_kwargs.num_decay=3"], "unexpected keyword argument 'num_decay'"),
    ],
)
def test_fit_settings_are_checked_before_anything_runs(tmp_path, capsys, args, needle):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as stop:
        tiny = [a for a in TINY if not a.startswith("train.seq_len=")]
        preflight.preflight([*args, *tiny, f"results_dir={results}"], CONF_DIR)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not results.exists()


def test_planning_a_default_schedule_imports_no_trainer_code():
    """Every harness-run plans its jobs in the parent: checking a schedule that needs no arguments
    must not import transformers (seconds per command; it slowed the fast suite by 2.5 minutes)."""
    import subprocess
    import sys

    code = ("import sys; from harness.schedule import check_schedule; "
            "check_schedule({'lr_scheduler': 'linear', 'lr_scheduler_kwargs': {}, 'warmup_steps': 2, 'max_steps': 9}); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
