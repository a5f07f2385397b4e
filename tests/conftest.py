import csv
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A tiny MMLU stand-in (our own questions), kept as rows in fixtures/mmlu.json and written out in
# the release layout below (MMLU_FIXTURE): every MMLU test runs on it.
MMLU_ROWS = Path(__file__).resolve().parent / "fixtures" / "mmlu.json"
# The full offline MMLU copy beside the project (../shared/data/mmlu), for the slow demo only;
# HARNESS_MMLU_DIR overrides.
MMLU_DIR = Path(os.environ.get("HARNESS_MMLU_DIR", ROOT.parent / "shared" / "data" / "mmlu"))

# ---------------------------------------------------------------- hermetic test session
# Set before any test module imports the stack, and inherited by every harness-run the tests
# start: the model caches (GGUF conversion, random-weight architectures), the Hugging Face and
# matplotlib caches, the home folder, temporary folders (the Trainer's output_dir) and the
# working folder of harness-run (Hydra's .hydra-runs/, default results/ and reports/) all live
# in one temporary folder, removed at the end. pytest_sessionfinish checks the checkout.
# A second import of this file (`from tests.conftest import ...`) reuses the first one's folder.
_first = next((m for m in (sys.modules.get("conftest"), sys.modules.get("tests.conftest"))
               if m is not None and getattr(m, "SESSION_TMP", None)), None)
SESSION_TMP = _first.SESSION_TMP if _first else Path(tempfile.mkdtemp(prefix="harness-tests-"))
RUN_CWD = SESSION_TMP / "cwd"
for _name, _sub in (("PEFT_HARNESS_CACHE", "cache/peft-harness"), ("HF_HOME", "cache/huggingface"),
                    ("XDG_CACHE_HOME", "cache"), ("MPLCONFIGDIR", "cache/matplotlib"), ("HOME", "home"),
                    ("TMPDIR", "tmp")):
    (SESSION_TMP / _sub).mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(SESSION_TMP / _sub)
RUN_CWD.mkdir(exist_ok=True)


def _write_mmlu_fixture(folder: Path) -> Path:
    """fixtures/mmlu.json as MMLU's release layout: <split>/<subject>_<split>.csv, no header."""
    for subject, splits in json.loads(MMLU_ROWS.read_text())["subjects"].items():
        for split, rows in splits.items():
            (folder / split).mkdir(parents=True, exist_ok=True)
            with open(folder / split / f"{subject}_{split}.csv", "w", newline="") as fh:
                csv.writer(fh).writerows(rows)
    return folder


MMLU_FIXTURE = SESSION_TMP / "mmlu"
if not (MMLU_FIXTURE / "test").is_dir():
    _write_mmlu_fixture(MMLU_FIXTURE)
tempfile.tempdir = None  # tempfile reads TMPDIR again
# harness-run from RUN_CWD still imports this checkout's harness
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

# Settings that make a tiny-random job take seconds. hardware=cpu: the price entry the
# tests expect, also on a machine with a GPU.
TINY = [
    "model=tiny-random",
    "hardware=cpu",
    "train.max_steps=5",
    "train.batch_size=2",
    "train.seq_len=64",
    "data.n_train=16",
    "data.n_heldout=8",
    "eval.mmlu.enabled=false",
    "eval.latency.reps=4",  # config.MIN_LATENCY_REPS
    "eval.latency.gen_tokens=2",
    "eval.variants.counts=[1,2]",
    "eval.variants.batch=2",
    "eval.variants.reps=4",
    "eval.variants.switch_reps=6",  # config.MIN_MEDIAN_REPS
    "eval.variants.gen_tokens=2",
    "report=false",
]


def composed(*overrides: str, config_name: str = "config") -> dict:
    """The resolved config of ``overrides``: the one way tests compose (harness.config.compose)."""
    from harness.config import compose

    return compose(overrides, config_name=config_name)


def planned(*overrides: str) -> dict:
    """The job harness-run would plan for ``overrides``."""
    from harness.plan import plan

    return plan(composed(*overrides))


@pytest.fixture
def mmlu_dir() -> Path:
    """The committed MMLU fixture (4 subjects x 4 test + 2 dev questions)."""
    return MMLU_FIXTURE


@pytest.fixture
def full_mmlu_dir() -> Path:
    """The full MMLU release (slow demo only)."""
    if not (MMLU_DIR / "test").is_dir():
        pytest.skip(f"no full MMLU copy at {MMLU_DIR} (set HARNESS_MMLU_DIR)")
    return MMLU_DIR


@pytest.fixture(scope="module")
def one_thread():
    """torch at one intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny ops gain nothing from threads, and on a shared, busy machine spinning OpenMP threads make
    timings (latency, step times) swing by 10x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def harness_run(*args: str, cwd: Path | None = None, timeout: int = 600,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point (python -m harness.run) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "harness.run", *args], cwd=cwd or RUN_CWD, capture_output=True, text=True,
        timeout=timeout, env=env,
    )


def harness_status(results: Path, env: dict | None = None) -> str:
    """harness-status over ``results``: its output (exit code 0 asserted)."""
    proc = subprocess.run([sys.executable, "-m", "harness.status", "--results", str(results)], cwd=RUN_CWD,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def start_harness_run(*args: str, env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    """Start harness-run in the background (output in ``.stdout``), for tests that kill or race it;
    ``new_session``: its own process group, so the whole sweep can be killed at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "harness.run", *args], cwd=RUN_CWD, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=new_session,
    )


# ---------------------------------------------------------------- skips in CI
# .ci/run sets HARNESS_STRICT_SKIPS=1: a skipped test fails the run unless it is listed here,
# with the reason printed. Keep this list short.
ALLOWED_SKIPS = {
    "tests/test_demo.py::*": "the slow demo needs the full MMLU release (../shared/data/mmlu or HARNESS_MMLU_DIR); "
                             "the MMLU fixture runs the same code everywhere else",
}


def disallowed_skips(skipped: list[tuple[str, str]], allowed: dict[str, str] = ALLOWED_SKIPS) -> list[tuple[str, str]]:
    """The (node id, reason) pairs of ``skipped`` that no pattern in ``allowed`` covers."""
    return [(node, why) for node, why in skipped if not any(fnmatch.fnmatch(node, pat) for pat in allowed)]


def _skipped(session) -> list[tuple[str, str]]:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    out = []
    for rep in (reporter.stats.get("skipped", []) if reporter else []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        out.append((rep.nodeid, reason.removeprefix("Skipped: ")))
    return out


def _checkout_files() -> set[str]:
    """Files in the checkout that git does not track (ignored ones too), bar caches of the tools."""
    names: set[str] = set()
    for extra in ([], ["--ignored"]):
        proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", *extra, "--", ".", ":!:.venv"],
                              cwd=ROOT, capture_output=True, text=True)
        names |= set(proc.stdout.splitlines())
    keep = lambda n: not any(part in n for part in ("__pycache__", ".pytest_cache", ".ruff_cache"))
    return {n for n in names if keep(n)}


def _is_xdist_worker(session) -> bool:
    """True in a pytest-xdist worker: the controller alone checks the checkout and the skips, once
    every worker has ended (a worker's view of the checkout is the others' work in progress)."""
    return hasattr(session.config, "workerinput")


def pytest_sessionstart(session):
    if not _is_xdist_worker(session):
        session.config._harness_checkout_before = _checkout_files()


def pytest_sessionfinish(session, exitstatus):
    problems = []
    before = getattr(session.config, "_harness_checkout_before", None)
    if before is not None:
        left = sorted(_checkout_files() - before)
        if left:
            problems.append(f"the tests left files in the checkout: {', '.join(left)}")
    if os.environ.get("HARNESS_STRICT_SKIPS") == "1" and not _is_xdist_worker(session):
        skipped = _skipped(session)
        for node, why in skipped:
            pattern = next((p for p in ALLOWED_SKIPS if fnmatch.fnmatch(node, p)), None)
            if pattern:
                print(f"\nallowed skip: {node}: {why} (listed: {ALLOWED_SKIPS[pattern]})")
        for node, why in disallowed_skips(skipped):
            problems.append(f"skipped, and not on tests/conftest.py ALLOWED_SKIPS: {node}: {why}")
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
    if problems:
        print("\n" + "\n".join(problems), file=sys.stderr)
        if session.exitstatus == 0:
            session.exitstatus = 1
