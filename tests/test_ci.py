"""CI parity and the skip policy: GitHub runs .ci/run itself; a skip must be on the named list."""

import os
import subprocess
import sys

import pytest
import yaml
from conftest import ALLOWED_SKIPS, ROOT, disallowed_skips


def test_the_workflow_runs_ci_run_itself():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "peft-gap.yml").read_text())
    (job,) = workflow["jobs"].values()
    runs = [step.get("run", "").strip() for step in job["steps"]]
    assert ".ci/run" in runs
    # no second pipeline beside it: no other step installs or tests
    assert not [r for r in runs if r and r != ".ci/run"]
    script = (ROOT / ".ci" / "run").read_text()
    assert "HARNESS_STRICT_SKIPS=1 make test-all" in script and "apt-get install -y -qq chromium" in script
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_allowed_skips_are_few_and_say_why():
    assert 0 < len(ALLOWED_SKIPS) <= 5 and all(len(why) > 20 for why in ALLOWED_SKIPS.values())
    skipped = [("tests/test_demo.py::test_demo_sweep", "no MMLU"), ("tests/test_report.py::test_render", "no browser")]
    assert disallowed_skips(skipped) == [("tests/test_report.py::test_render", "no browser")]


# as `make test` runs the suite (2 pytest-xdist workers: the checks run in the controller) and in one process
WORKERS = pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])


@WORKERS
def test_strict_mode_fails_a_run_with_an_unlisted_skip(tmp_path, workers):
    (tmp_path / "test_skips.py").write_text("import pytest\n\ndef test_x():\n    pytest.skip('no widget here')\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", *workers,
           "--rootdir", str(tmp_path), str(tmp_path / "test_skips.py")]
    # the relaxed run must not inherit the strict mode of the session running this test (.ci/run)
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_STRICT_SKIPS"}
    env["PYTHONPATH"] = f"{ROOT / 'tests'}{os.pathsep}{ROOT}"
    relaxed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    strict = subprocess.run(cmd, cwd=tmp_path, env={**env, "HARNESS_STRICT_SKIPS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert strict.returncode == 1
    assert "not on tests/conftest.py ALLOWED_SKIPS: test_skips.py::test_x: no widget here" in strict.stderr


@WORKERS
def test_a_file_left_in_the_checkout_fails_the_session(tmp_path, workers):
    """The conftest check that keeps the suite hermetic, caught in the act."""
    probe = ROOT / "left-by-a-test.tmp"
    (tmp_path / "test_leaves.py").write_text(f"def test_x():\n    open({str(probe)!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                               *workers, "--rootdir", str(tmp_path), str(tmp_path / "test_leaves.py")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink(missing_ok=True)
    assert proc.returncode == 1 and "the tests left files in the checkout: left-by-a-test.tmp" in proc.stderr
