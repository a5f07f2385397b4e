"""Crashes inside a job, black-box through harness-run: out of memory, and a job process killed.

The fault is injected from outside the harness: a ``sitecustomize.py`` put first on PYTHONPATH
(test-only, below) is loaded by every Python process the command starts, and when
HARNESS_TEST_FAULT is set it replaces transformers' ``Trainer.training_step`` (as the module
is imported) with the fault. The harness itself has no hook for it.
"""

import json
import os
import re
import subprocess
import sys
import threading

import psutil
import pytest
from conftest import ROOT, TINY, harness_run

from harness import records

FAULT_HOOK = '''
# Test-only fault injection (tests/test_crash.py); not part of the harness.
import importlib.abc, importlib.util, os, signal, sys

# one fault per seed: HARNESS_TEST_FAULT=oom,sigkill,exit137 gives seed 0 "oom", seed 1 "sigkill", ...
_FAULTS = os.environ.get("HARNESS_TEST_FAULT", "").split(",")


class _FaultInTrainingStep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            original = module.Trainer.training_step

            def training_step(self, *args, **kwargs):
                fault = _FAULTS[self.args.seed]
                if fault == "oom":
                    import torch
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
                if fault == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault == "exit137":
                    os._exit(137)
                if fault == "wait":  # until the test opens the gate, then train as usual
                    import time
                    while not os.path.exists(os.environ["HARNESS_TEST_GATE"]):
                        time.sleep(0.05)
                return original(self, *args, **kwargs)

            module.Trainer.training_step = training_step

        spec.loader.exec_module = exec_module
        return spec


if any(_FAULTS):
    sys.meta_path.insert(0, _FaultInTrainingStep())
'''


def test_oom_and_killed_job_processes_each_get_a_record(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    env = {**os.environ, "HARNESS_TEST_FAULT": "oom,sigkill,exit137", "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    results = tmp_path / "results"
    # one job per seed, each in its own process (isolate=true), each with its fault
    proc = harness_run("-m", "method=lora", "seed=0,1,2", *TINY, f"results_dir={results}", "isolate=true",
                       cwd=tmp_path, env=env)
    # failed runs are recorded, the sweep goes on, and the command says so: exit 1, one summary line
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "harness-run: 3 jobs: 0 ok, 3 failed (1 oom, 2 killed), 0 skipped"
    recs = {r["config"]["seed"]: r for r in records.load_records(results)}
    assert sorted(recs) == [0, 1, 2] and all(r["method"] == "lora" for r in recs.values())
    # an OutOfMemoryError raised inside the run: the job's own record says oom
    assert recs[0]["status"] == "oom" and recs[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert recs[0]["failed_phase"] == "train" and recs[0]["error"].endswith("(in phase train)")
    # its own process: the start-up (interpreter, imports) is measured apart from the phases
    assert recs[0]["metrics"]["startup_wall_s"] > 0.5 and list(recs[0]["metrics"]["phase_wall_s"]) == ["load", "train"]
    # killed outright (SIGKILL: the kernel's OOM killer, a scheduler, a person), or exit 137 as a
    # shell reports it: the parent writes the record, killed, not out of memory (no device said so)
    for seed, code in ((1, -9), (2, 137)):
        assert recs[seed]["status"] == "killed" and f"exited with code {code}" in recs[seed]["error"], recs[seed]
        assert "killed by SIGKILL (likely the host's out-of-memory killer or a scheduler)" in recs[seed]["error"]
        # where it died: the phase the job process left beside it before it was killed
        assert recs[seed]["failed_phase"] == "train" and recs[seed]["error"].endswith("(in phase train)")
        assert json.loads(records.record_path(results, recs[seed]["run_id"]).read_text()) == recs[seed]
    # nothing half-written beside them (.locks/ and .sweeps/ are the sweep's bookkeeping folders)
    assert not [p for p in results.iterdir() if p.is_file() and p.suffix != ".json"]


@pytest.mark.slow
def test_a_job_outliving_its_killed_sweep_keeps_its_run_locked(tmp_path):
    """SIGKILL the sweep while its job process trains: the job goes on (it writes its own record),
    and a sweep started meanwhile skips the job as running instead of training it a second time
    beside it (two trainings at once would also skew each other's timings). The job process shares
    the sweep's run-id lock; before, the lock died with the sweep."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    gate = tmp_path / "gate"
    env = {**os.environ, "HARNESS_TEST_FAULT": "wait", "HARNESS_TEST_GATE": str(gate),
           "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    results = tmp_path / "results"
    args = ["method=lora", *TINY, f"results_dir={results}", "isolate=true"]
    sweep = subprocess.Popen([sys.executable, "-m", "harness.run", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(180, sweep.kill)  # a job that never reaches training fails, not hangs
    watchdog.start()
    try:
        for line in sweep.stdout:  # until the job process is in its first training step
            if "trainable params" in line:
                break
        jobs = psutil.Process(sweep.pid).children(recursive=True)
        assert jobs, "the job process should be running"
        sweep.kill()
        sweep.wait()
        again = harness_run(*args, cwd=tmp_path, env=env, timeout=60)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "skipped: another sweep is running it" in again.stdout, again.stdout[-2000:]
        # it names the job process that still trains, not the killed sweep
        named = re.search(r"another sweep is running it \(pid (\d+) on", again.stdout)
        assert named and int(named.group(1)) in {j.pid for j in jobs}, (again.stdout[-2000:], sweep.pid)
        assert not [r for r in records.load_records(results) if r["method"] == "lora"]  # still training
        gate.write_text("")  # the orphaned job trains on and writes its record
        gone, alive = psutil.wait_procs(jobs, timeout=120)
        assert not alive
        recs = [r for r in records.load_records(results) if r["method"] == "lora"]
        assert len(recs) == 1 and recs[0]["status"] == "ok" and recs[0]["metrics"]["train_tokens"] > 0
    finally:
        watchdog.cancel()
        gate.write_text("")
        for proc in psutil.Process().children(recursive=True):
            proc.kill()


def test_a_job_names_itself_the_lock_holder_only_through_its_own_lock(tmp_path):
    """``take_over_holder`` writes only into the run's lock file: a descriptor number that now
    belongs to another file (a launcher in between closed the inherited one) is left untouched."""
    with records.run_lock(tmp_path, "run-a") as lock:
        other = tmp_path / "other.txt"
        other.write_text("keep me")
        with open(other, "r+b") as f:
            assert not records.take_over_holder(f.fileno(), records.lock_path(tmp_path, "run-a"))
        assert other.read_text() == "keep me"
        sweep_pid = records.lock_holder(tmp_path, "run-a")["pid"]
        assert records.take_over_holder(records.lock_fd(lock), records.lock_path(tmp_path, "run-a"))
        holder = records.lock_holder(tmp_path, "run-a")
        assert holder["sweep_pid"] == sweep_pid and holder["pid"] == os.getpid()
