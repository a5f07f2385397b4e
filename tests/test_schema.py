"""The typed config schema (harness/config.py): bad settings end in one line and exit code 2 before
anything runs, and the package's layers hold (no module imports the entry point)."""

import ast
import random
import shutil
from pathlib import Path

import pytest

from harness import config
from harness.config import CONF_DIR, UsageError, compose, validate
from harness.plan import preflight
from tests.conftest import TINY, harness_run

ROOT = Path(__file__).resolve().parent.parent


def test_every_group_option_and_preset_passes_the_schema():
    needs = {"data=file": ["data.path=x.jsonl"], "data=hub": ["data.dataset=x"], "model=hub": ["model.path=x"],
             "model=gguf": ["model.gguf.path=x"]}
    for group in ("model", "method", "data", "hardware", "distributed", "experiment"):
        for option in config.group_options(group):
            overrides = [f"{group}={option}", *needs.get(f"{group}={option}", [])]
            validate(compose(overrides))
    validate(compose([], "estimate"), config.EstimateConfig)


@pytest.mark.parametrize("override, needle", [
    ("train.max_steps=abc", "train.max_steps='abc' is invalid; give an integer >= 1"),
    ("train.batch_size=0", "train.batch_size=0 is invalid"),
    ("train.optim=adam", "train.optim='adam' is invalid; give one of adamw_torch"),
    ("train.precision=fp8", "train.precision='fp8' is invalid; give one of auto, fp32, bf16"),
    ("+train.max_step=2", "train.max_step is not a setting of train; did you mean train.max_steps?"),
    ("eval.latency.reps=2", f"eval.latency.reps=2 is invalid; give an integer >= {config.MIN_LATENCY_REPS}"),
    ("method.learning_rate=fast", "method.learning_rate='fast' is invalid; give a number > 0"),
    ("+foo=1", "foo is not a setting of the config"),
])
def test_the_issue_examples_are_refused_with_one_line(tmp_path, capsys, override, needle):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as stop:
        preflight([*TINY, f"results_dir={results}", override], CONF_DIR)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not results.exists()


def test_target_modules_are_checked_against_the_architecture(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        preflight([*TINY, f"results_dir={tmp_path / 'r'}", "method.target_modules=[foo_proj]"], CONF_DIR)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "matches no module" in err[0] and "q_proj" in err[0], err
    # a module the model has passes
    assert preflight([*TINY, f"results_dir={tmp_path / 'r'}", "method.target_modules=[q_proj,v_proj]"], CONF_DIR)


def test_mmlu_from_the_hub_offline_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [a for a in TINY if not a.startswith("eval.mmlu")] + ["model=smollm2-135m", f"results_dir={tmp_path}/r"]
    with pytest.raises(SystemExit) as stop:
        preflight(args, CONF_DIR)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "HF_HUB_OFFLINE=1" in err[0] and "eval.mmlu.dir" in err[0], err


def _bad_overrides(rng: random.Random, n: int) -> list[str]:
    """Random bad overrides: wrong types, unknown keys and groups, out-of-range and unknown enum values."""
    settings = config.settings_of()
    wrong = ["abc", "1.5x", "[1,2]", "{a: 1}", "-7", "0", "true", "''", "3.5", "null"]
    out = []
    while len(out) < n:
        name, kind = rng.choice(settings)
        pick = rng.random()
        if pick < 0.25:
            out.append(f"+{name}_{rng.choice(['x', 'typo', '2'])}={rng.choice(wrong)}")  # unknown key
        elif pick < 0.35:
            out.append(f"{rng.choice(config.GROUPS[:7])}=no-such-{rng.randint(0, 99)}")  # unknown group option
        elif pick < 0.42:
            out.append(f"+{rng.choice(['foo', 'trian', 'evals'])}.{rng.choice(['a', 'b'])}=1")  # unknown group
        else:
            out.append(f"{name}={rng.choice(wrong)}")  # a value that may be of the wrong type or range
    return out


def _is_valid(override: str) -> bool:
    try:
        validate(compose([*TINY, override]))
    except UsageError:
        return False
    except Exception:  # Hydra refuses it while composing: that is a usage error too
        return False
    return True


@pytest.mark.parametrize("cases, least", [
    pytest.param(40, 25, id="40-cases"),
    pytest.param(300, 200, id="300-cases", marks=pytest.mark.slow),  # about a minute: in .ci/run
])
def test_fuzz_bad_overrides_end_in_exit_2_with_one_line_and_nothing_written(tmp_path, capsys, cases, least):
    rng = random.Random(cases)
    results = tmp_path / "results"
    tried = refused = 0
    for override in _bad_overrides(rng, cases):
        if not override.startswith("+") and "=no-such-" not in override and _is_valid(override):
            continue  # a value the setting accepts (e.g. 0 for a count): not a bad override
        tried += 1
        with pytest.raises(SystemExit) as stop:
            preflight([*TINY, f"results_dir={results}", override], CONF_DIR)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("harness-run: error: "), (override, err)
        assert not results.exists(), override
        refused += 1
    assert tried >= least and refused == tried


def test_a_bad_setting_from_the_shell_exits_2_before_any_job(tmp_path):
    proc = harness_run("-m", *TINY, f"results_dir={tmp_path / 'r'}", "method=full,lora", "train.precision=fp8")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "harness-run: error: train.precision='fp8' is invalid; give one of auto, fp32, bf16"]
    assert not (tmp_path / "r").exists()


def test_the_scheduler_set_is_the_trainers():
    from transformers import SchedulerType

    assert set(config.SCHEDULERS) == {s.value for s in SchedulerType}


def test_the_optimizer_set_is_what_the_estimator_and_the_trainer_know():
    from transformers.training_args import OptimizerNames

    from harness.estimate import OPTIMIZERS

    # estimate.OPTIMIZERS also models adamw_bnb_32bit, which is no Trainer name: a run could not use it
    assert set(config.OPTIMIZERS) == set(OPTIMIZERS) & {o.value for o in OptimizerNames}


# ---------------------------------------------------------------- layers of the package

# A module may import modules of its own layer or below (lazy imports inside functions count).
LAYERS = [
    {"config", "console", "records", "failure", "schedule"},
    {"identity", "stats", "data", "models", "methods", "distributed", "sweep", "measure", "tuning", "tracking"},
    {"train", "evaluate", "nll"},
    {"plan", "job", "estimate"},
    {"run"},
    {"report", "check", "status"},
]
ENTRY_POINT = "harness.run"


def _layer(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    for i, names in enumerate(LAYERS):
        if parts[0] in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_schema.py LAYERS")


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "harness":
                found |= {f"harness.{a.name}" for a in node.names}
            elif node.module.startswith("harness."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness.")}
    return found - {module}


def layer_violations(package: Path) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "harness":
            continue
        for dep in sorted(_imports(path, module)):
            if dep == ENTRY_POINT or dep.startswith(ENTRY_POINT + "."):
                out.append(f"{module} imports the entry point {dep}")
            elif dep.split(".")[1] != module.split(".")[1] and _layer(dep) > _layer(module):
                out.append(f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})")
    return out


def test_the_package_keeps_its_layers():
    assert layer_violations(ROOT / "harness") == []


def test_the_layer_check_fails_when_a_module_imports_the_entry_point(tmp_path):
    copy = tmp_path / "harness"
    shutil.copytree(ROOT / "harness", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "stats.py").write_text((copy / "stats.py").read_text() + "\n\ndef _x():\n    from harness.run import main\n")
    (copy / "records.py").write_text((copy / "records.py").read_text() + "\n\ndef _y():\n    from harness import stats\n")
    found = layer_violations(copy)
    assert "harness.stats imports the entry point harness.run" in found
    assert any(v.startswith("harness.records (layer 0) imports harness.stats") for v in found)
