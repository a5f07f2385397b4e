import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The offline MMLU copy beside the project (../shared/data/mmlu); HARNESS_MMLU_DIR overrides.
MMLU_DIR = Path(os.environ.get("HARNESS_MMLU_DIR", ROOT.parent / "shared" / "data" / "mmlu"))

# Settings that make a tiny-random job take seconds.
TINY = [
    "model=tiny-random",
    "train.max_steps=5",
    "train.batch_size=2",
    "train.seq_len=64",
    "data.n_train=16",
    "data.n_heldout=8",
    "eval.mmlu.enabled=false",
    "eval.latency.reps=2",
    "eval.latency.gen_tokens=2",
    "report=false",
]


@pytest.fixture
def mmlu_dir() -> Path:
    if not (MMLU_DIR / "test").is_dir():
        pytest.skip(f"no MMLU copy at {MMLU_DIR} (set HARNESS_MMLU_DIR)")
    return MMLU_DIR


def harness_run(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point (python -m harness.run) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "harness.run", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
