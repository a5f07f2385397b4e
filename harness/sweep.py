"""Sweeps across launchers: the sweep's plan on disk, and the share of a machine a parallel job gets.

Three launchers run the jobs of ``harness-run -m``: Hydra's default (one job after another),
``hydra/launcher=parallel`` (submitit's local executor: several at once on this machine) and
``hydra/launcher=slurm`` (one Slurm array task per job). Whatever runs them, a sweep leaves in
its results folder::

    .sweeps/<sweep_id>/manifest.json   written before the first job: every planned job
                                       (its number and overrides), the launcher, the time
    .sweeps/<sweep_id>/jobs/<num>.json written by each job when it starts: its run ids
    .sweeps/<sweep_id>/launcher.lock   held while the process that launched the sweep lives

(a run started without ``-m`` leaves the same, as a sweep of one job), so ``harness-status`` can say which planned jobs are done, running, failed, oom or missing.
Run ids are taken from the jobs themselves, not planned ahead: ``hardware=auto`` resolves on
the node that runs the job (a Slurm login node has no GPU).

A parallel job first takes one of ``parallel.jobs`` slots (an flock under ``.locks/``, shared by
every sweep writing to the folder): slot k owns GPUs k·g … k·g+g−1 of the sweep's GPUs
(``CUDA_VISIBLE_DEVICES``) and cores/jobs CPU threads (``OMP_NUM_THREADS``), so jobs that run at
once do not share a device or oversubscribe the cores unnoticed; the record says what it had.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from hydra.experimental.callback import Callback

from harness import records

SWEEP_DIR = ".sweeps"
# set by the launching process, read by the jobs (and their child processes)
ENV_DEVICES = "HARNESS_SWEEP_DEVICES"  # the GPUs the sweep may use, as CUDA_VISIBLE_DEVICES lists them
ENV_LAUNCHER = "HARNESS_LAUNCHER"
ENV_SLOT = "HARNESS_SLOT"
LAUNCHERS = {"LocalLauncher": "parallel", "SlurmLauncher": "slurm"}
CPU_JOBS_DEFAULT = 2  # parallel.jobs=null on a machine without GPUs
SLOT_POLL_S = 0.5


class SlotError(ValueError):
    """A parallel sweep asked for more GPUs per job than the machine has."""


def launcher_kind(target: str | None) -> str:
    """'sequential', 'parallel' or 'slurm' from the Hydra launcher's ``_target_``."""
    return LAUNCHERS.get(str(target or "").rsplit(".", 1)[-1], "sequential")


def sweep_id(sweep_dir: str) -> str:
    """One id per Hydra sweep folder (the launching process and every job agree on it)."""
    return records.stable_hash(str(Path(sweep_dir).resolve()))[:12]


def sweep_path(results_dir: str | Path, sid: str) -> Path:
    return Path(results_dir) / SWEEP_DIR / sid


def _write_json(path: Path, obj: dict) -> None:
    records._atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the sweep's plan


def planned_overrides(hydra_cfg) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper expands them (None for other sweepers)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(hydra_cfg.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _write_plan(results_dir: str | Path, sid: str, sweep_dir: str, launcher: str, overrides: list,
                jobs: list[list[str]] | None) -> Path:
    """The manifest every sweep leaves (a run without ``-m`` too); returns the sweep's folder."""
    folder = sweep_path(results_dir, sid)
    _write_json(folder / "manifest.json", {
        "sweep_id": sid,
        "created_at": now_iso(),
        "created_ns": time.time_ns(),  # orders two sweeps started in the same second
        "sweep_dir": str(Path(sweep_dir).resolve()),
        "launcher": launcher,
        "overrides": overrides,
        "jobs": None if jobs is None else [{"num": i, "overrides": o} for i, o in enumerate(jobs)],
        "host": os.uname().nodename,
        "pid": os.getpid(),
    })
    return folder


def _write_job(folder: Path, num: int, overrides: list, job: dict) -> None:
    """A started job's run ids, beside its sweep's manifest."""
    _write_json(folder / "jobs" / f"{num}.json", {
        "num": num,
        "overrides": overrides,
        "run_id": job["run_id"],
        "base_run_id": job["base_run_id"],
        "method": job["method"],
        "started_at": now_iso(),
        "host": os.uname().nodename,
        "pid": os.getpid(),
    })


def write_manifest(results_dir: str | Path, hydra_cfg) -> Path:
    """A multirun's plan, written before its first job; returns the sweep's folder."""
    return _write_plan(results_dir, sweep_id(str(hydra_cfg.sweep.dir)), str(hydra_cfg.sweep.dir),
                       launcher_kind(hydra_cfg.launcher.get("_target_")), list(hydra_cfg.overrides.task),
                       planned_overrides(hydra_cfg))


def register_job(results_dir: str | Path, hydra_cfg, job: dict) -> None:
    """A started multirun job's run ids."""
    folder = sweep_path(results_dir, sweep_id(str(hydra_cfg.sweep.dir)))
    _write_job(folder, int(hydra_cfg.job.num), list(hydra_cfg.overrides.task), job)


def register_single_run(results_dir: str | Path, hydra_cfg, job: dict) -> records.FileLock:
    """A run started without ``-m``: a sweep of one job for ``harness-status`` (its manifest,
    its job, and its launcher lock, held by this process until it ends; returned to release)."""
    sid = sweep_id(f"{hydra_cfg.run.dir}#{os.getpid()}")  # two runs can start in the same second
    overrides = list(hydra_cfg.overrides.task)
    folder = _write_plan(results_dir, sid, str(hydra_cfg.run.dir), "single run", overrides, [overrides])
    lock = launcher_lock(folder)
    lock.acquire()
    _write_job(folder, 0, overrides, job)
    return lock


def launcher_lock(folder: Path) -> records.FileLock:
    """The lock held while the process that launched the sweep lives."""
    return records.FileLock(folder / "launcher.lock", thread_local=False, fallback_to_soft=False,
                            preserve_lock_file=True)


def discard_if_unstarted(results_dir: str | Path, hydra_cfg) -> None:
    """Remove the sweep's folder when it stops on a usage error before any job started."""
    import shutil

    folder = sweep_path(results_dir, sweep_id(str(hydra_cfg.sweep.dir)))
    if folder.is_dir() and not any(folder.glob("jobs/*.json")):
        shutil.rmtree(folder, ignore_errors=True)
        for parent in (folder.parent, folder.parent.parent):  # .sweeps, then results_dir, when empty
            with contextlib.suppress(OSError):
                parent.rmdir()


def read_sweeps(results_dir: str | Path) -> list[dict]:
    """Every sweep of ``results_dir``, oldest first: its manifest with ``registered`` {num: job}."""
    sweeps = []
    for manifest in sorted(Path(results_dir).glob(f"{SWEEP_DIR}/*/manifest.json")):
        try:
            sweep = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        sweep["registered"] = {}
        for path in manifest.parent.glob("jobs/*.json"):
            try:
                entry = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            sweep["registered"][int(entry["num"])] = entry
        sweeps.append(sweep)
    return sorted(sweeps, key=lambda s: (s.get("created_at", ""), s.get("created_ns", 0)))


# ---------------------------------------------------------------- what a job had


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]  # NVML count: does not initialize CUDA


def launch_env() -> dict:
    """Fields for the record's ``env``: how the job was launched and what it was given."""
    env: dict = {
        "launcher": os.environ.get(ENV_LAUNCHER, "sequential"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES") or None,
        "parallel_slot": os.environ.get(ENV_SLOT),
    }
    slurm = {
        k.removeprefix("SLURM_").lower(): os.environ[k]
        for k in (
            "SLURM_JOB_ID",
            "SLURM_ARRAY_JOB_ID",
            "SLURM_ARRAY_TASK_ID",
            "SLURM_RESTART_COUNT",
            "SLURM_JOB_PARTITION",
            "SLURM_JOB_NODELIST",
        )
        if k in os.environ
    }
    if slurm:
        env["slurm"] = slurm
    return env


def slot_plan(cfg: dict, gpus: list[str], cores: int) -> tuple[int, int, int]:
    """(jobs at once, GPUs per job, CPU threads per job) for a parallel sweep on this machine."""
    par = cfg.get("parallel") or {}
    distributed = cfg.get("distributed") or {}
    per_job = int(par.get("gpus_per_job") or max(1, int(distributed.get("num_processes") or 1)))
    if gpus:
        if per_job > len(gpus):
            raise SlotError(
                f"parallel.gpus_per_job={per_job} is more than the {len(gpus)} GPU(s) visible "
                f"({','.join(gpus)}); give at most {len(gpus)}"
            )
        jobs = min(int(par["jobs"]) if par.get("jobs") is not None else len(gpus), len(gpus) // per_job)
    else:  # never two jobs on one GPU; on a CPU, the cores are shared out
        per_job = 0
        jobs = int(par["jobs"]) if par.get("jobs") is not None else CPU_JOBS_DEFAULT
    if jobs < 1:
        raise SlotError(f"parallel.jobs={jobs} is invalid; give a positive integer")
    return jobs, per_job, max(1, cores // jobs)


@contextlib.contextmanager
def parallel_slot(cfg: dict) -> Iterator[dict]:
    """Wait for a free slot of this machine, give its GPUs and thread budget to the job, free it after."""
    gpus = os.environ.get(ENV_DEVICES)
    gpus = [d for d in gpus.split(",") if d.strip()] if gpus is not None else visible_gpus()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs, per_job, threads = slot_plan(cfg, gpus, cores)
    results_dir = cfg["results_dir"]
    waited = False
    while True:
        for k in range(jobs):
            lock = records.run_lock(results_dir, f"slot-{k}")
            try:
                lock.acquire(blocking=False)
            except records.Timeout:
                continue
            try:
                given = {"slot": f"{k}/{jobs}", "gpus": gpus[k * per_job : (k + 1) * per_job], "threads": threads}
                os.environ[ENV_SLOT] = given["slot"]
                if gpus:
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(given["gpus"])
                for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                    os.environ[var] = str(threads)
                if "torch" in sys.modules:  # a job run in this process (isolate=false)
                    sys.modules["torch"].set_num_threads(threads)
                print(
                    f"parallel slot {given['slot']}: GPUs {','.join(given['gpus']) or 'none'}, {threads} CPU thread(s)",
                    flush=True,
                )
                yield given
                return
            finally:
                lock.release()
        if not waited:
            print(f"waiting for one of {jobs} parallel slots to free up", flush=True)
            waited = True
        time.sleep(SLOT_POLL_S)


# ---------------------------------------------------------------- Hydra callback


_LAUNCHER_LOCKS: dict[str, records.FileLock] = {}  # not on the callback: submitit pickles it


class SweepCallback(Callback):
    """In the process that launches a sweep: write its manifest, hold its launcher lock, and
    hand the sweep's GPUs to parallel jobs (submitit's local executor resets
    CUDA_VISIBLE_DEVICES for each job it starts)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if "estimate" in config:  # harness-estimate composes this config too, and writes no results
            return
        hc = config.hydra
        if launcher_kind(hc.launcher.get("_target_")) == "parallel" and ENV_DEVICES not in os.environ:
            os.environ[ENV_DEVICES] = ",".join(visible_gpus())
        folder = write_manifest(config.results_dir, hc)
        lock = launcher_lock(folder)
        lock.acquire()
        _LAUNCHER_LOCKS[str(folder)] = lock

    def on_multirun_end(self, config, **kwargs) -> None:
        for lock in _LAUNCHER_LOCKS.values():
            lock.release()
        _LAUNCHER_LOCKS.clear()
