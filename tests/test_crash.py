"""Crashes inside a job, black-box through harness-run: out of memory, and a job process killed.

The fault is injected from outside the harness: a ``sitecustomize.py`` put first on PYTHONPATH
(test-only, below) is loaded by every Python process the command starts, and when
HARNESS_TEST_FAULT is set it replaces transformers' ``Trainer.training_step`` (as the module
is imported) with the fault. The harness itself has no hook for it.
"""

import json
import os

import pytest
from conftest import ROOT, TINY, harness_run

from harness import records

FAULT_HOOK = '''
# Test-only fault injection (tests/test_crash.py); not part of the harness.
import importlib.abc, importlib.util, os, signal, sys

_FAULT = os.environ.get("HARNESS_TEST_FAULT")


class _FaultInTrainingStep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)

            def training_step(self, *args, **kwargs):
                if _FAULT == "oom":
                    import torch
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
                if _FAULT == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if _FAULT == "exit137":
                    os._exit(137)

            module.Trainer.training_step = training_step

        spec.loader.exec_module = exec_module
        return spec


if _FAULT:
    sys.meta_path.insert(0, _FaultInTrainingStep())
'''


def run_with_fault(tmp_path, fault: str, *args: str):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    env = {**os.environ, "HARNESS_TEST_FAULT": fault, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    results = tmp_path / "results"
    proc = harness_run("method=lora", *TINY, f"results_dir={results}", *args, cwd=tmp_path, env=env)
    return proc, results


def test_out_of_memory_inside_a_run_is_recorded_as_oom(tmp_path):
    proc, results = run_with_fault(tmp_path, "oom", "isolate=true")
    assert proc.returncode == 0, proc.stderr[-3000:]  # a failed run is recorded; the sweep goes on
    (rec,) = records.load_records(results)
    assert rec["status"] == "oom" and rec["method"] == "lora"
    assert rec["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "] oom: record" in proc.stdout


@pytest.mark.parametrize("fault,code", [("sigkill", -9), ("exit137", 137)])
def test_a_killed_job_process_gets_its_record_from_the_parent(tmp_path, fault, code):
    proc, results = run_with_fault(tmp_path, fault, "isolate=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = results.glob("lora-*.json")
    rec = json.loads(path.read_text())
    # killed outright (the kernel's OOM killer sends SIGKILL): counted as out of memory
    assert rec["status"] == "oom" and f"exited with code {code}" in rec["error"]
    assert rec["method"] == "lora" and rec["run_id"] == path.stem
    assert not list(results.glob("*.tmp*"))  # nothing half-written beside it
