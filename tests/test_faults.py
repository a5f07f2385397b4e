"""One results folder, many writers, jobs that die: locks, atomic records, reruns after SIGKILL.

Every kill here is real (SIGKILL of a process or of a whole sweep's process group)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, TINY, harness_run, harness_status, start_harness_run

from harness import records

EVAL_TINY = ["eval.on_random_weights=true", "eval.indomain.batch_size=8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def held_locks(results: Path) -> list[str]:
    return [
        p.stem
        for p in (results / records.LOCK_DIR).glob("*.lock")
        if not p.stem.startswith("slot-") and records.lock_holder(results, p.stem)
    ]


def job_processes(results: Path, method: str) -> list[psutil.Process]:
    """Job processes (not base-model evaluations) of ``method`` writing into ``results``.

    Found by the job file named on their command line (``-c "...execute_file('/tmp/x.json', ...)"``
    today, ``-m harness.job /tmp/x.json`` tomorrow)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "execute_base" in cmd or "--base" in cmd:
            continue
        for path in re.findall(r"(/[^\s'\"]+\.json)", cmd):
            try:
                job = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            if (
                isinstance(job, dict)
                and job.get("method") == method
                and str(job.get("config", {}).get("results_dir")) == str(results)
            ):
                found.append(proc)
    return found


def no_temp_files(results: Path) -> bool:
    return not [p for p in results.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- locks (fast)

HOLDER = """
import sys, time
from harness import records
lock = records.run_lock(sys.argv[1], "lora-r16-0123456789")
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_lock_whose_holder_was_killed_never_blocks_a_rerun(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert records.lock_holder(tmp_path, "lora-r16-0123456789")["pid"] == holder.pid
        with pytest.raises(records.Timeout):
            records.run_lock(tmp_path, "lora-r16-0123456789", timeout=0.3).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the flock with its holder: free at once, no cleanup needed
    assert records.lock_holder(tmp_path, "lora-r16-0123456789") is None
    t0 = time.monotonic()
    with records.run_lock(tmp_path, "lora-r16-0123456789", timeout=1):
        assert records.lock_holder(tmp_path, "lora-r16-0123456789")["pid"] == os.getpid()
    assert time.monotonic() - t0 < 1


def _record(run_id: str, note: str) -> dict:
    return {
        "schema": records.SCHEMA,
        "run_id": run_id,
        "config_hash": "h",
        "pair_key": "p",
        "status": "ok",
        "error": None,
        "method": "lora",
        "rank": 16,
        "model": {},
        "config": {"note": note, "pad": "x" * 200_000},
        "env": {},
        "metrics": {m: None for m in records.REQUIRED_METRICS},
        "items_file": None,
    }


WRITER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_faults import _record
from harness import records
for i in range(150):
    records.write_record(sys.argv[1], _record("lora-r16-0123456789", str(i)))
"""


def test_readers_see_only_complete_records_while_a_job_writes(tmp_path, caplog):
    records.write_record(tmp_path, _record("lora-r16-0123456789", "first"))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(Path(__file__).parent)], env=ENV)
    reads = 0
    while writer.poll() is None or reads == 0:
        recs = records.load_records(tmp_path)  # a broken file would be skipped with a warning
        assert len(recs) == 1 and recs[0]["config"]["pad"] == "x" * 200_000
        reads += 1
    assert writer.returncode == 0
    assert "skipping" not in caplog.text
    assert records.load_records(tmp_path)[0]["config"]["note"] == "149"
    assert no_temp_files(tmp_path)


def test_a_rerun_never_overwrites_the_answers_of_the_record_in_place(tmp_path):
    first = [{"task": "indomain", "id": "q1", "pred": 0, "target": 0, "correct": True}]
    rec = _record("lora-r16-0123456789", "first")
    rec["items_file"] = records.write_items(tmp_path, rec["run_id"], first)
    records.write_record(tmp_path, rec)
    # a rerun writes its answers, then dies before its record: the record in place keeps its answers
    second = [{"task": "indomain", "id": "q1", "pred": 1, "target": 0, "correct": False}]
    name = records.write_items(tmp_path, rec["run_id"], second)
    assert name != rec["items_file"]
    assert records.read_items(tmp_path, records.find_ok(tmp_path, rec["run_id"])) == first
    # a rerun that commits its record takes its own answers; the earlier answers file goes
    rec2 = {**_record(rec["run_id"], "second"), "items_file": name}
    records.write_record(tmp_path, rec2)
    assert records.read_items(tmp_path, records.find_ok(tmp_path, rec["run_id"])) == second
    assert sorted(p.name for p in tmp_path.glob("*.items*")) == [name]


# ---------------------------------------------------------------- real jobs killed (slow)


@pytest.mark.slow
def test_a_sweep_killed_mid_job_reruns_only_what_did_not_finish(tmp_path):
    results = tmp_path / "results"
    args = ["-m", "method=full,lora,qlora", *TINY, *EVAL_TINY, f"results_dir={results}", "train.max_steps=40"]
    sweep = start_harness_run(*args, env=ENV, new_session=True)
    # mid-job: the full arm is recorded and the next arm's lock is held (its process training)
    first = wait_for(lambda: list(results.glob("full-*.json")), what="the first arm's record")[0]
    running = wait_for(lambda: [r for r in held_locks(results) if not r.startswith("full-")], what="the next job")
    wait_for(lambda: job_processes(results, running[0].split("-")[0]), what="the next job's process")
    time.sleep(1.0)
    os.killpg(sweep.pid, signal.SIGKILL)  # the whole sweep at once, as Slurm or a closed terminal does
    sweep.wait()
    wait_for(lambda: not job_processes(results, "lora") and not job_processes(results, "qlora"), 30, "no orphans")

    interrupted = running[0]
    kept = first.read_bytes()
    assert not records.record_path(results, interrupted).exists()  # no half-written record
    assert no_temp_files(results)
    assert held_locks(results) == []
    status = harness_status(results, env=ENV)
    assert re.search(rf"missing\s+{interrupted}\s+method=\w+\s+\[interrupted", status), status
    assert "1 done, 0 running, 0 failed, 0 oom, 0 killed, 2 missing" in status

    rerun = harness_run(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("skipped: an ok record exists") == 1  # the finished arm, only
    assert "another sweep is running it" not in rerun.stdout  # no stale lock
    assert f"[{interrupted}] " in rerun.stdout and first.read_bytes() == kept
    arms = [r for r in records.load_records(results) if r["method"] != "base"]
    assert sorted(r["method"] for r in arms) == ["full", "lora", "qlora"]
    assert all(r["status"] == "ok" for r in arms)
    assert len([r for r in records.load_records(results) if r["method"] == "base"]) == 1
    status = harness_status(results, env=ENV)
    assert "3 done, 0 running, 0 failed, 0 oom, 0 killed, 0 missing" in status, status


@pytest.mark.slow
def test_a_force_rerun_that_dies_keeps_the_earlier_ok_record(tmp_path):
    results = tmp_path / "results"
    args = ["method=lora", *TINY, *EVAL_TINY, f"results_dir={results}"]
    first = harness_run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    path = next(results.glob("lora-*.json"))
    before = {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()}

    rerun = start_harness_run(*args, "force=true", env=ENV)
    child = wait_for(lambda: job_processes(results, "lora"), what="the rerun's job process")[0]
    time.sleep(0.5)  # still importing or training: it has written nothing yet
    child.send_signal(signal.SIGKILL)  # as the OOM killer does: the job process only
    out, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, out[-3000:]
    assert "rerun died (exit code -9); the earlier ok record is kept" in out
    after = {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()}
    assert after == before  # the ok record and its answers, byte for byte; nothing half-written
    assert records.find_ok(results, path.stem)["status"] == "ok"
    assert held_locks(results) == []


@pytest.mark.slow
def test_two_sweeps_at_once_over_one_folder_run_each_job_and_the_base_model_once(tmp_path):
    results = tmp_path / "results"
    args = ["-m", "method=full,lora,qlora", *TINY, *EVAL_TINY, f"results_dir={results}"]
    procs = [start_harness_run(*args, env=ENV) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    both = "".join(outs)
    assert both.count("[base] ") == 1  # evaluated by one sweep; the other waited and reused it
    recs = records.load_records(results)
    assert sorted(r["method"] for r in recs) == ["base", "full", "lora", "qlora"]
    assert all(r["status"] == "ok" for r in recs)
    for r in recs:
        if r["method"] == "base":
            continue
        # the line a job prints when it starts: [run id] job k of n, elapsed ...: method ...
        started = len(re.findall(rf"^\[{r['run_id']}\] (job \d+ of \d+[^:]*: )?{r['method']}\b", both, re.M))
        assert started == 1, (r["run_id"], started)


def test_a_record_landing_while_the_report_reads_the_folder_is_not_listed_as_broken(tmp_path, monkeypatch):
    from harness import report

    records.write_record(tmp_path, _record("lora-r16-0123456789", "first"))
    first_pass = report.iter_records

    def job_lands_meanwhile(results_dir):
        yield from first_pass(results_dir)
        records.write_record(tmp_path, _record("full-0123456789", "landed"))  # a job finishing mid-build

    monkeypatch.setattr(report, "iter_records", job_lands_meanwhile)
    loaded, skipped = report._load(tmp_path)
    assert [r["run_id"] for r in loaded] == ["lora-r16-0123456789"] and skipped == []


@pytest.mark.slow
def test_a_killed_base_evaluation_is_recorded_and_the_sharded_arm_says_why_it_cannot_run(tmp_path):
    """The base model is evaluated in a process of its own before a distributed arm; SIGKILL it
    (as the host's OOM killer would a model too large for it): a `killed` base record, and the
    arm fails naming that record, not a bare "base-model record is missing"."""
    results = tmp_path / "results"
    sweep = start_harness_run("method=lora", *TINY, *EVAL_TINY, "distributed=ddp", "distributed.num_processes=2",
                              "distributed.main_process_port=29637", f"results_dir={results}", env=ENV)
    try:
        def base_process():  # this sweep's (other tests' sweeps may be evaluating a base beside it)
            for proc in psutil.process_iter(["cmdline"]):
                cmd = proc.info["cmdline"] or []
                if "--base" not in cmd or "harness.job" not in cmd:
                    continue
                try:
                    job = json.loads(Path(cmd[cmd.index("harness.job") + 1]).read_text())
                except (OSError, ValueError, IndexError):
                    continue
                if str(job["config"]["results_dir"]) == str(results):
                    return proc
            return None

        wait_for(base_process, timeout=120, what="the base-model evaluation's process").send_signal(signal.SIGKILL)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, out[-3000:]
    recs = {r["method"]: r for r in records.load_records(results)}
    assert recs["base"]["status"] == "killed" and "exited with code -9" in recs["base"]["error"]
    assert recs["lora"]["status"] == "failed"
    assert f"the base-model evaluation {recs['base']['run_id']} killed" in recs["lora"]["error"]
    # the report still builds, and says the base-model evaluation was killed
    from harness.report import build_report

    md = build_report(results, tmp_path / "reports")["at-a-glance.md"].read_text()
    assert "killed" in md
