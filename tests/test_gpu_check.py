"""benchmarks/gpu_check.py on a CPU: its arguments, that without a GPU every check is NOT RUN
(never pass) with a non-zero exit, its summary and exit codes, and the GPU machine's wheel list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_without_a_gpu_every_check_is_not_run_and_the_exit_is_non_zero(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the check would run")
    proc = run_check("--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["check"] for r in lines] == list(gpu_check.CHECKS)
    assert all(r["status"] == "NOT RUN" and r["why"] == "no CUDA device" for r in lines)
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("gpu-check: 0 pass, 0 FAIL, 11 NOT RUN")
    for name in gpu_check.CHECKS:
        assert f"{name}: NOT RUN" in summary
    assert "2-GPU: DDP, FSDP world 2, NCCL gather: NOT RUN" in summary
    assert '"status": "pass"' not in proc.stdout
    assert not (tmp_path / "docs").exists()  # no page without a device


def test_arguments():
    proc = run_check("--help")
    assert proc.returncode == 0 and "--download-wheels" in proc.stdout and "--steps" in proc.stdout
    bad = run_check("--steps", "2")
    assert bad.returncode == 2 and "--steps must be at least 3" in bad.stderr
    unknown = run_check("--no-such-flag")
    assert unknown.returncode == 2 and "unrecognized arguments" in unknown.stderr


@pytest.mark.parametrize("statuses, code", [
    (["pass", "pass"], 0),
    (["pass", "NOT RUN"], 3),  # one GPU: the 2-GPU check could not run
    (["pass", "FAIL", "NOT RUN"], 1),
    (["NOT RUN", "NOT RUN"], 2),
])
def test_summary_names_every_check_not_run_and_exits_non_zero_unless_all_ran_and_passed(statuses, code):
    results = [{"check": f"check {i}", "status": s} for i, s in enumerate(statuses)]
    line, got = gpu_check.summary(results)
    assert got == code
    for i, s in enumerate(statuses):
        if s == "NOT RUN":
            assert f"check {i}: NOT RUN" in line
    assert f"{statuses.count('pass')} pass, {statuses.count('FAIL')} FAIL, {statuses.count('NOT RUN')} NOT RUN" in line


def test_the_wheel_list_pins_constraints_versions_and_leaves_the_image_its_torch():
    specs = gpu_check.wheel_specs()
    names = {s.partition("==")[0] for s in specs}
    # what the GPU machine's image lacks, at the versions the harness is tested with
    assert {"hydra-core", "omegaconf", "datasets", "lm_eval", "bitsandbytes"} <= names
    assert not names & {"torch", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow"}
    pins = gpu_check.pinned()
    for spec in specs:
        name, _, version = spec.partition("==")
        assert version == pins[gpu_check._norm(name)]
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith("bitsandbytes=="):
            assert f"bitsandbytes=={line.split('==')[1]}" in specs


def test_the_wheel_folder_is_ignored_by_git_and_named_by_make():
    assert ".gpu-wheels/" in (ROOT / ".gitignore").read_text().splitlines()
    make = (ROOT / "Makefile").read_text()
    assert "gpu-wheels:" in make and "gpu-check:" in make and "--download-wheels" in make
    assert not (ROOT / "benchmarks" / "gpu_distributed_check.py").exists()


def test_missing_packages_without_wheels_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GPU_WHEELS", (*gpu_check.GPU_WHEELS, ("no-such-dist", "no_such_module_xyz")))
    assert gpu_check.missing_modules() == ["no-such-dist"]
    why = gpu_check.ensure_imports(tmp_path / "none")
    assert "no-such-dist" in why and "make gpu-wheels" in why
