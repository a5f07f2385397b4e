"""harness-run: the Hydra entry point. Orchestration only: plan a job, skip or run it, record it.
Nothing imports this module: planning is ``harness.plan``, a job's work ``harness.job``.

One job = one arm (method) of a paired comparison:
load base model -> apply method -> train (measured) -> evaluate -> write the run record.
Each job runs in a fresh Python process by default (``isolate=true``) so one run's
allocations, caches and compiled kernels never leak into the next run's figures, and a crash
(or the OOM killer) in one run still leaves a record and lets the sweep go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness import console, failure, identity, records, sweep, tracking, tuning
from harness.config import CONF_DIR, UsageError, usage_exit
from harness.plan import check_inputs, plan
from harness.records import new_record

LOCK_PROBE_S = 2.0  # how long a job waits for its run id's lock before leaving it to the holder
# the command's jobs, when Hydra runs them in this process (the sequential launcher): for the
# "job k of n, elapsed, ETA" line; set by main()
_progress: dict = {"n": 0, "t0": 0.0, "ran_s": []}


# ---------------------------------------------------------------- running one job in its own processes


def run_isolated(job: dict, base: bool = False, lock: records.FileLock | None = None) -> None:
    """Run the job in fresh processes (``python -m harness.job``, under ``accelerate launch`` for
    several); if an arm's processes end without a record, write one from what they left.

    ``lock``: the job's held run-id lock, shared with the job process, so that the lock outlives
    a sweep killed while the job goes on (the job still writes its record): a rerun then skips
    it as running rather than training it a second time beside it."""
    from harness import distributed

    cfg = job["config"]
    results_dir = cfg["results_dir"]
    run_id = job["base_run_id"] if base else job["run_id"]
    before = records.record_stamp(results_dir, run_id)
    with tempfile.TemporaryDirectory(prefix="harness-job-") as tmp:
        job_file = str(Path(tmp, "job.json"))
        Path(job_file).write_text(json.dumps(job))
        env = {**distributed.launch_env(cfg, base), "HARNESS_JOB_ERROR_DIR": tmp}
        if lock is not None:
            env["HARNESS_RUN_LOCK_FD"] = str(records.lock_fd(lock))
        proc = subprocess.run(distributed.launch_command(job_file, cfg, base), cwd=os.getcwd(), env=env,
                              pass_fds=(records.lock_fd(lock),) if lock is not None else ())
        # the first rank to fail is the cause; the others then lose their peers
        errors = [json.loads(p.read_text())
                  for p in sorted(Path(tmp).glob("rank*.json"), key=lambda p: p.stat().st_mtime_ns)]
        died = failure.killed(proc.returncode, tmp)  # where it was, should it have left no account
    # on several machines, machine 0 (where rank 0 runs) records the job
    if (proc.returncode != 0 and records.record_stamp(results_dir, run_id) == before
            and not cfg["distributed"].get("machine_rank")):
        if records.find_ok(results_dir, run_id):  # a force=true rerun died: the ok record stays
            print(f"[{run_id}] rerun died (exit code {proc.returncode}); the earlier ok record is kept",
                  flush=True)
            return
        from harness.job import base_job_of

        # a base evaluation killed (host OOM, a scheduler) is recorded as such, as an arm is
        rec = new_record(base_job_of(job) if base else job, sweep.launch_env())
        # a rank's own account (an oom when the device said so), or killed by SIGKILL (-9: likely
        # the host's OOM killer or a scheduler) before it could say why
        rec.update({**died, **errors[0]} if errors else died)
        records.write_record(results_dir, rec)
        tracking.safe_log_record(rec, results_dir)


# ---------------------------------------------------------------- Hydra app


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    console.quiet()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    os.environ[sweep.ENV_LAUNCHER] = sweep.launcher_kind(hc.launcher.get("_target_"))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    with contextlib.ExitStack() as stack:
        if os.environ[sweep.ENV_LAUNCHER] == "parallel":
            # first this machine's share (GPUs, threads), before anything can touch a GPU
            try:
                stack.enter_context(sweep.parallel_slot(resolved))
            except sweep.SlotError as exc:
                usage_exit(str(exc))
        try:
            job = plan(resolved)
            check_inputs(job["config"])
        except UsageError as exc:
            if multirun:
                sweep.discard_if_unstarted(resolved["results_dir"], hc)
            usage_exit(str(exc))
        if multirun:
            sweep.register_job(job["config"]["results_dir"], hc, job)
        elif os.environ[sweep.ENV_LAUNCHER] == "sequential":  # harness-status lists single runs too
            stack.callback(sweep.register_single_run(job["config"]["results_dir"], hc, job).release)
        run_job(job, stack, job_num=hc.job.num if multirun else None)


def _skip_done(job: dict) -> bool:
    """True (and says so) when an ok record of ``job`` exists and force is off."""
    existing = records.find_ok(job["config"]["results_dir"], job["run_id"])
    if not existing or job["config"]["force"]:
        return False
    changes = identity.provenance_changes(existing, CONF_DIR.parent)
    made_with = f"; it was made with other code or packages ({', '.join(changes)})" if changes else ""
    print(f"[{job['run_id']}] skipped: an ok record exists{made_with} (force=true reruns it)", flush=True)
    for missing in missing_measurements(job["config"], existing):
        print(f"[{job['run_id']}] note: {missing}", flush=True)
    return True


def missing_measurements(cfg: dict, existing: dict) -> list[str]:
    """Measurements this config asks for that the existing record lacks: settings outside the
    run's identity (the latency probe) do not make a new run, so a skip must say how to get them."""
    metrics = existing.get("metrics") or {}
    out = []
    if (cfg["eval"]["latency"]["enabled"] and metrics.get("latency_reps") is None
            and not (metrics.get("skipped_measurements") or {}).get("latency")):
        out.append("the existing record has no latency measurement (it ran with eval.latency.enabled=false); "
                   "add force=true to rerun it with the latency probe")
    if (cfg["eval"]["variants"]["enabled"] and metrics.get("variants") is None
            and not (metrics.get("skipped_measurements") or {}).get("variants")):
        out.append("the existing record has no serving-N-variants measurement (it ran before eval.variants or "
                   "with eval.variants.enabled=false); add force=true to rerun it with it")
    return out


def run_job(job: dict, stack: contextlib.ExitStack, job_num: int | None = None) -> None:
    """Skip, or run ``job`` (and the base-model evaluation it needs) under its run-id lock;
    ``job_num``: its number in the sweep (from 0), for the progress line."""
    cfg = job["config"]
    results_dir = cfg["results_dir"]
    if _skip_done(job):
        return
    try:  # a moment's wait, so that harness-status probing the lock is never taken for a holder
        lock = stack.enter_context(records.run_lock(results_dir, job["run_id"], timeout=LOCK_PROBE_S))
    except records.Timeout:
        holder = records.lock_holder(results_dir, job["run_id"]) or {}
        print(f"[{job['run_id']}] skipped: another sweep is running it (pid {holder.get('pid', '?')} "
              f"on {holder.get('host', '?')})", flush=True)
        return
    # another sweep may have finished it while this one planned
    if _skip_done(job):
        return
    rank_text = "" if job["rank"] is None else f" r={job['rank']}"
    print(f"[{job['run_id']}] {progress_text(job_num)}{job['method']}{rank_text} model={cfg['model']['name']} "
          f"seed={cfg['seed']}", flush=True)
    t0 = time.monotonic()
    try:
        _run_arm(job, cfg, results_dir, lock)
    finally:
        _progress["ran_s"].append(time.monotonic() - t0)


def progress_text(job_num: int | None) -> str:
    """``job 2 of 5, elapsed 3.1 min, ETA 4.7 min: `` (the ETA from the jobs that ran so far)."""
    n = _progress["n"]
    if job_num is None or n < 2 or not _progress["t0"]:
        return ""
    k = job_num + 1
    text = f"job {k} of {n}, elapsed {console.duration(time.monotonic() - _progress['t0'])}"
    if _progress["ran_s"]:
        text += f", ETA {console.duration(statistics.fmean(_progress['ran_s']) * (n - k + 1))}"
    return text + ": "


def _run_arm(job: dict, cfg: dict, results_dir: str, lock) -> None:
    """The base-model evaluation the arm needs (once per folder), then the arm itself."""
    from harness.job import should_evaluate

    random_weights = cfg["model"]["source"] == "config"
    distributed = cfg["distributed"]["strategy"] != "none"  # always its own processes (accelerate launch)
    if should_evaluate(cfg, random_weights):
        # exactly once per folder: jobs running at once wait here for the one evaluating it
        with records.run_lock(results_dir, job["base_run_id"]) as base_lock:
            if not records.find_ok(results_dir, job["base_run_id"]):
                # its own process too when isolated, so its evaluation leaves nothing in the
                # process whose training memory is measured
                if cfg["isolate"] or distributed:
                    run_isolated(job, base=True, lock=base_lock)
                else:
                    try:
                        from harness.job import execute_base

                        execute_base(job)
                    except Exception:  # the arm tries again in execute() and records the failure
                        traceback.print_exc()
    if cfg["isolate"] or distributed:
        run_isolated(job, lock=lock)
    else:
        from harness.job import execute

        execute(job)


def outcomes(jobs: list[dict], done_before: set[str]) -> dict[str, int]:
    """ok / failed / skipped counts of a command's planned jobs (and, of the failed, how many
    were oom and killed), from the records they left
    (one count per run id: the full arm of an r sweep is one job). A job whose ok record existed
    before the command (and force is off) was skipped; one that left no record was not run here
    (another sweep held it, or hardware=auto planned it on another node)."""
    counts = {"ok": 0, "failed": 0, "skipped": 0, "no record": 0, "oom": 0, "killed": 0}
    for run_id, job in {j["run_id"]: j for j in jobs}.items():
        if run_id in done_before and not job["config"]["force"]:
            counts["skipped"] += 1
            continue
        try:
            rec = records.load_record(records.record_path(job["config"]["results_dir"], run_id))
        except (OSError, records.RecordError, ValueError):
            counts["no record"] += 1
            continue
        counts["ok" if rec.get("status") == "ok" else "failed"] += 1
        if rec.get("status") in ("oom", "killed"):  # of the failed: how
            counts[rec["status"]] += 1
    return counts


def summary_line(counts: dict[str, int], jobs: list[dict]) -> str:
    n = sum(counts[k] for k in ("ok", "failed", "skipped", "no record"))
    how = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("oom", "killed") if counts.get(s))
    parts = [f"{counts['ok']} ok", f"{counts['failed']} failed" + (f" ({how})" if how else ""),
             f"{counts['skipped']} skipped"]
    if counts["no record"]:
        parts.append(f"{counts['no record']} without a record")
    line = f"harness-run: {n} job{'s' if n != 1 else ''}: {', '.join(parts)}"
    cfg = jobs[0]["config"]
    if cfg.get("report", True):
        reports = Path(cfg["reports_dir"])
        line += f"; report: {reports / 'at-a-glance.md'}, {reports / 'index.html'}"
    return line


def main() -> None:
    """Exit 0 when every job ended ok or was skipped, 1 when any failed (its record written; the
    sweep went on), 2 on a usage error (preflight, before any job)."""
    from harness.plan import preflight

    jobs = preflight(sys.argv[1:], CONF_DIR)  # every job of the command, before the first one runs
    done_before = {j["run_id"] for j in jobs if records.find_ok(j["config"]["results_dir"], j["run_id"])}
    if jobs and (note := tuning.plan_note(jobs, jobs[0]["config"]["results_dir"])):
        print(note, flush=True)
    _progress.update(n=len(jobs), t0=time.monotonic())
    try:
        hydra_main()
    except ValueError as exc:  # Hydra's own usage rule, e.g. -m with --cfg
        if not str(exc).startswith("Only one of"):
            raise
        usage_exit(str(exc))
    if not jobs:  # Hydra's own commands (--help, --cfg, ...)
        return
    counts = outcomes(jobs, done_before)
    print(summary_line(counts, jobs), flush=True)
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    main()
