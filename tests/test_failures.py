"""A job that fails: the record says how (oom or failed) and in which phase, and carries what was
measured up to the failure, nothing computed from a budget it never trained.

Each failure is raised inside the real job code (``harness.job.execute`` on a planned tiny job),
by a monkeypatched function of the stack it calls; a job killed outright is in test_crash.py."""

from __future__ import annotations

import conftest
import pytest
import torch
import transformers
from conftest import TINY

from harness import failure, records
from harness import job as run
from harness.measure import serving

CPU_ALLOC = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
             "allocate 7516192768 bytes. Error code 12 (Cannot allocate memory)")


def planned(tmp_path, *overrides: str) -> dict:
    return conftest.planned("method=lora", *TINY, f"results_dir={tmp_path}", *overrides)


@pytest.mark.parametrize(
    "exc,oom",
    [
        (RuntimeError(CPU_ALLOC), True),
        (MemoryError(), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("std::bad_alloc"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("bad value"), False),
    ],
)
def test_what_counts_as_out_of_memory(exc, oom):
    assert failure.is_oom(exc) is oom


def test_a_cpu_allocation_failure_in_training_records_only_the_steps_it_trained(tmp_path, monkeypatch):
    job = planned(tmp_path, "projected_tokens=1000000")
    train_step = transformers.Trainer.training_step

    def fails_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:  # steps 0-2 trained
            raise RuntimeError(CPU_ALLOC)
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", fails_at_step_3)
    rec = run.execute(job)
    assert records.load_record(records.record_path(tmp_path, job["run_id"])) == rec  # as written
    assert rec["status"] == "oom" and rec["failed_phase"] == "train"
    assert rec["error"].startswith("RuntimeError: [enforce fail") and rec["error"].endswith("(in phase train)")
    m = rec["metrics"]
    # 3 steps × batch 2 × 64 positions were trained; the budget (5 steps) never was
    assert m["train_tokens"] == 3 * 2 * 64 and m.get("token_budget") is None
    assert m["tokens_per_s"] == pytest.approx(m["train_tokens"] / m["train_wall_excl_probe_s"])
    assert len(m["loss_curve"]) == 3 and m["peak_memory_bytes"] is not None
    # nothing projected from a run that did not finish, and no MFU without a finished training
    assert m["projected_cost_usd"] is None and m["projected_wall_h"] is None and m.get("mfu") is None
    assert m["cost_usd"] is not None  # the time it did take is paid for


@pytest.mark.parametrize(
    "phase,target,exc",
    [
        ("eval", (run, "evaluate_all"), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")),
        ("latency", (serving, "compare_latency"), MemoryError()),
    ],
)
def test_out_of_memory_after_training_names_its_phase_and_keeps_the_training_figures(tmp_path, monkeypatch, phase,
                                                                                      target, exc):
    job = planned(tmp_path, "eval.on_random_weights=true", "eval.indomain.batch_size=8")
    module, name = target
    real = getattr(module, name)

    def fails_for_the_arm(model, *args, **kwargs):
        if hasattr(model, "peft_config"):  # the trained arm; the base model's evaluation passes
            raise exc
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, name, fails_for_the_arm)
    rec = run.execute(job)
    assert rec["status"] == "oom" and rec["failed_phase"] == phase and rec["error"].endswith(f"(in phase {phase})")
    m = rec["metrics"]
    # training finished: its figures are measured and kept, MFU included
    assert m["train_tokens"] == m["token_budget"] == 5 * 2 * 64
    assert m["tokens_per_s"] > 0 and m["train_wall_s"] > 0 and m["peak_memory_bytes"] is not None
    assert m["peak_flops_per_s"] > 0 and m["mfu"] > 0
    base = records.find_ok(tmp_path, job["base_run_id"])
    assert base is not None and base["failed_phase"] is None


def test_an_ok_run_has_no_failed_phase(tmp_path):
    rec = run.execute(planned(tmp_path, "eval.latency.enabled=false"))
    assert rec["status"] == "ok" and rec["failed_phase"] is None and rec["error"] is None
    # where the run's time went, phase by phase; run in this (test) process: no start-up of its own
    spent, m = rec["metrics"]["phase_wall_s"], rec["metrics"]
    assert list(spent) == ["load", "train", "mfu", "footprint", "variants"], spent  # random weights: no evaluation
    assert all(s > 0 for s in spent.values()) and sum(spent.values()) <= m["run_wall_s"] < sum(spent.values()) + 1
    assert m["startup_wall_s"] is None
    # and the console says where the time went, longest phase first
    line = run.time_breakdown({"run_wall_s": 221.2, "startup_wall_s": 5.4,
                               "phase_wall_s": {"load": 1.3, "train": 152.2, "eval": 31.9, "footprint": 0.1}})
    assert line == "221 s: train 152, eval 32, load 1, start-up 5"


def test_phase_seconds_add_up_per_phase_in_job_order(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 6.0, 11.0])  # Phases() enters load, train, load again, eval, seconds()
    monkeypatch.setattr(failure.time, "perf_counter", lambda: next(clock))
    phases = failure.Phases()
    for phase in ("train", "load", "eval"):
        phases.enter(phase)
    assert phases.seconds() == {"load": 1.0 + 3.0, "train": 2.0, "eval": 5.0}


def test_the_phase_a_killed_job_was_in_is_read_from_what_it_left(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_JOB_ERROR_DIR", str(tmp_path))
    assert failure.killed(-9, tmp_path)["failed_phase"] == "load"  # died while starting
    phases = failure.Phases()
    phases.enter("train")
    phases.enter("eval")
    died = failure.killed(-9, tmp_path)
    assert died == {"status": "killed", "failed_phase": "eval", "error": (
        "job process exited with code -9: killed by SIGKILL (likely the host's out-of-memory killer or a "
        "scheduler) (in phase eval)")}
    assert failure.killed(137, tmp_path)["status"] == "killed"
    assert failure.killed(1, tmp_path) == {"status": "failed", "failed_phase": "eval",
                                           "error": "job process exited with code 1 (in phase eval)"}
    with pytest.raises(ValueError, match="phase 'evaluate' is unknown"):
        phases.enter("evaluate")


@pytest.mark.parametrize("status, error, expected", [
    ("killed", "job process exited with code -9: killed by SIGKILL (likely the host's out-of-memory killer or a "
     "scheduler) (in phase train)", "killed by SIGKILL (likely the host's out-of-memory killer or a scheduler) (in train)"),
    # a record written before status killed existed: its SIGKILL read as oom, shown as killed
    ("oom", "job process exited with code 137 (in phase train)",
     "killed by SIGKILL (likely the host's out-of-memory killer or a scheduler) (in train)"),
    ("oom", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB (in phase train)",
     "did not fit on 1x NVIDIA H200 (in train)"),
])
def test_the_report_shows_a_killed_run_as_killed_not_as_did_not_fit(status, error, expected):
    from harness.report.tables import failure_text

    rec = {"status": status, "error": error, "failed_phase": "train", "env": {"device_name": "NVIDIA H200"}}
    assert failure.was_killed(rec) is (expected.startswith("killed"))
    assert failure_text(rec) == expected
    assert failure_text(rec, short=True) == ("killed (in train)" if failure.was_killed(rec) else expected)


def test_an_old_oom_record_of_a_killed_process_still_loads(tmp_path):
    from test_faults import _record

    rec = {**_record("lora-r16-0123456789", "old"), "status": "oom", "failed_phase": "train",
           "error": "job process exited with code -9 (in phase train)"}
    records.write_record(tmp_path, rec)
    (loaded,) = records.load_records(tmp_path)
    assert loaded["status"] == "oom" and failure.was_killed(loaded)
    records.write_record(tmp_path, {**rec, "status": "killed"})
    assert records.load_records(tmp_path)[0]["status"] == "killed"
