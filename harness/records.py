"""Run records: the contract between the run, report and check stages.

One JSON file per run in ``results_dir``: ``<run_id>.json``, written atomically (temp file in
the same folder + ``os.replace``), so a crash never leaves a half-written record. Per-question
answers live beside it in ``<run_id>.items.<digest>.jsonl.gz`` (one JSON object per line:
``{"task": "mmlu"|"indomain", "id": str, "subject": str, "category": str|None,
"pred": int, "target": int, "correct": bool}``) and are referenced by ``items_file``: a rerun
writes its answers under a new name, and the record's rename is the one commit point, so a
rerun that dies leaves the previous record and its answers as they were.

Jobs that run at once share the folder. ``run_lock`` is a lock per run id under ``.locks/``,
taken with ``flock``: the kernel drops it when its holder dies, so a killed job never blocks a
rerun. Readers only see whole records (temp files start with ``.`` and end in ``.tmp``).

Schema 1 (fields other stages rely on)::

    schema        1
    run_id        "<method>[-r<rank>]-<config_hash[:10]>"   ("base-<hash>" for the base model)
    config_hash   sha256 of the resolved config fields that change the result
    pair_key      sha256 of everything but the method and its settings (model, data, seed,
                  token budget, train settings shared by arms, eval settings). Equal pair_key
                  means a fair pair.
    eval_key      identity.base_key: sha256 of (model, eval settings, data, hardware name,
                  train.precision): the base-model record shared by all arms and seeds
    status        "ok" | "failed" | "oom" (a device/allocator out-of-memory error) | "killed" (SIGKILL)
    error         message or null; on failure it ends with "(in phase <failed_phase>)"
    failed_phase  null when ok; else where the job failed or was killed (harness.failure.PHASES):
                  "load" | "base_eval" | "train" | "mfu" | "eval" | "footprint" | "latency" | "variants"
    method        "base" | "full" | "lora" | "qlora" | other PEFT type name
    rank          int or null
    model         {"name", "source", "total_params", "random_weights": bool}
    config        the resolved config (dict)
    env           {"versions": {pkg: ver}, "git_commit", "device", "device_name",
                   "device_count", "cpu_threads", "host", "started_at", "ended_at",
                   "launcher": "sequential"|"parallel"|"slurm", "cuda_visible_devices",
                   "parallel_slot": "k/jobs" or null, "slurm": {job_id, array_task_id, …} when on Slurm}
    items_file    file name of the per-question answers beside the record, or null
    base_run_id   run_id of the base-model record this arm is compared with, or null
    metrics       see docs/records.md and docs/measurements.md; null where not measured
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

SCHEMA = 1
STATUSES = ("ok", "failed", "oom", "killed")
REQUIRED_FIELDS = (
    "schema",
    "run_id",
    "config_hash",
    "pair_key",
    "status",
    "error",
    "method",
    "rank",
    "model",
    "config",
    "env",
    "metrics",
)
REQUIRED_METRICS = (
    "trainable_params",
    "total_params",
    "peak_memory_bytes",
    "train_wall_s",
    "tokens_per_s",
    "train_tokens",
    "cost_usd",
    "mmlu_acc",
    "mmlu_stderr",
    "mmlu_n",
)

LOCK_DIR = ".locks"

log = logging.getLogger(__name__)


class RecordError(ValueError):
    """A record that does not parse or does not follow the schema."""


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys): equal content, equal hash."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_id_for(method: str, rank: int | None, config_hash: str) -> str:
    rank_part = f"-r{rank}" if rank is not None else ""
    return f"{method}{rank_part}-{config_hash[:10]}"


def empty_metrics() -> dict:
    return {name: None for name in REQUIRED_METRICS}


def new_record(job: dict, env: dict) -> dict:
    """The record of a planned ``job`` (``plan.plan``) before anything is measured: its identity,
    config and null metrics, status ok until a phase fails."""
    cfg = job["config"]
    return {
        "schema": SCHEMA, "run_id": job["run_id"], "config_hash": job["config_hash"],
        "pair_key": job["pair_key"], "eval_key": job["eval_key"], "status": "ok", "error": None, "failed_phase": None,
        "method": job["method"], "rank": job["rank"],
        "model": {"name": cfg["model"]["name"], "source": cfg["model"]["source"], "total_params": None,
                  "random_weights": cfg["model"]["source"] == "config"},
        "config": cfg, "env": env, "items_file": None, "base_run_id": None, "metrics": empty_metrics(),
    }


def record_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / f"{run_id}.json"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(results_dir: str | Path, record: dict) -> Path:
    """Validate and write ``record`` atomically; returns its path.

    The rename is the commit point of a run: answers files of ``run_id`` that the new record
    does not reference (an earlier run's) are removed only after it."""
    validate(record)
    path = record_path(results_dir, record["run_id"])
    _atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())
    for old in Path(results_dir).glob(f"{record['run_id']}.items*.jsonl.gz"):
        if old.name != record.get("items_file"):
            old.unlink(missing_ok=True)
    return path


def write_items(results_dir: str | Path, run_id: str, items: Iterable[dict]) -> str:
    """Write per-question answers as gzipped JSONL; returns the file name to put in the record.

    The name carries a digest of the answers, so a rerun never overwrites the file that the
    current record of ``run_id`` points to."""
    lines = "".join(json.dumps(it, sort_keys=True) + "\n" for it in items)
    # mtime=0 keeps the bytes reproducible for the same answers
    data = gzip.compress(lines.encode(), mtime=0)
    name = f"{run_id}.items.{hashlib.sha256(data).hexdigest()[:12]}.jsonl.gz"
    _atomic_write_bytes(Path(results_dir) / name, data)
    return name


def record_stamp(results_dir: str | Path, run_id: str) -> tuple[int, int] | None:
    """(inode, mtime) of ``run_id``'s record, or None: tells whether a job wrote its record."""
    try:
        st = record_path(results_dir, run_id).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


# ---------------------------------------------------------------- locks


def lock_path(results_dir: str | Path, name: str) -> Path:
    return Path(results_dir) / LOCK_DIR / f"{name}.lock"


def _write_holder(fd: int, **extra) -> None:
    """Say in the lock file who holds it (shown by harness-status)."""
    holder = {"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def run_lock(results_dir: str | Path, name: str, timeout: float = -1) -> FileLock:
    """The lock of run id ``name`` in ``results_dir`` (not yet taken; ``with`` or ``acquire``).

    ``flock`` only, never a lock file whose mere existence means "held" (filelock's soft
    fallback): the kernel releases an flock when its holder dies, so a killed job never leaves
    a stale lock. On a filesystem without flock (Lustre mounted without ``-o flock``) taking
    it fails loudly instead. The file itself stays (``preserve_lock_file``): waiters and later
    holders share one inode. ``timeout``: seconds to wait; negative waits for ever."""
    path = lock_path(results_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, timeout=timeout, thread_local=False, fallback_to_soft=False, preserve_lock_file=True,
                    on_acquired=_write_holder)


def lock_fd(lock: FileLock) -> int:
    """The open file descriptor behind a held ``lock``: a child process given it (``pass_fds``)
    shares the flock, which the kernel then releases only when the last holder of it exits."""
    fd = lock._context.lock_file_fd  # filelock keeps it private; there is no public accessor
    if fd is None:
        raise RuntimeError(f"lock {lock.lock_file} is not held")
    return fd


def take_over_holder(fd: int, path: str | Path) -> bool:
    """In a job process given its sweep's held lock as ``fd``: name this process the holder (the
    sweep's pid kept as ``sweep_pid``), so that a rerun after the sweep was killed names the process
    that still trains. False, writing nothing, when ``fd`` is not that lock file (a launcher in
    between closed it, and the number now belongs to another file)."""
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
    if not same:
        return False
    try:
        sweep = json.loads(os.pread(fd, 4096, 0) or b"{}").get("pid")
    except (OSError, ValueError):
        sweep = None
    _write_holder(fd, sweep_pid=sweep)
    return True


def lock_holder(results_dir: str | Path, name: str) -> dict | None:
    """Who holds run id ``name``'s lock now ({"pid", "host", "since"}), or None when it is free."""
    return holder_of(lock_path(results_dir, name))


def holder_of(path: Path) -> dict | None:
    """Who holds the lock file ``path`` now, or None when it is free (or does not exist)."""
    if not path.exists():
        return None
    probe = FileLock(path, thread_local=False, fallback_to_soft=False, preserve_lock_file=True)
    try:
        probe.acquire(blocking=False)
    except Timeout:
        try:
            return json.loads(path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}
    probe.release()
    return None


def read_items(results_dir: str | Path, record: dict) -> list[dict]:
    """Per-question answers of ``record`` ([] when it has none). Read once per file version: a
    report reads each file from several statistics (gaps, losses, forgetting, intervals)."""
    name = record.get("items_file")
    if not name:
        return []
    path = Path(results_dir) / name
    try:
        st = path.stat()
    except OSError:
        return []
    return list(_read_items_file(str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=4096)
def _read_items_file(path: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    # keyed by the file's version as well as its name: a rewritten file is read again
    with gzip.open(path, "rt") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def validate(record: dict) -> None:
    """Raise RecordError naming the first problem with ``record``."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise RecordError(f"missing fields: {', '.join(missing)}")
    if record["schema"] != SCHEMA:
        raise RecordError(f"schema {record['schema']!r} is not {SCHEMA}")
    if record["status"] not in STATUSES:
        raise RecordError(f"status {record['status']!r} is not one of {', '.join(STATUSES)}")
    if not isinstance(record["metrics"], dict):
        raise RecordError("metrics is not an object")
    missing = [m for m in REQUIRED_METRICS if m not in record["metrics"]]
    if missing:
        raise RecordError(f"missing metrics: {', '.join(missing)}")


def load_record(path: str | Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: {exc}") from exc
    validate(record)
    return record


def iter_records(results_dir: str | Path) -> Iterator[tuple[Path, dict]]:
    """Valid records in ``results_dir`` in file-name order; broken ones are skipped with a warning."""
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            yield path, load_record(path)
        except RecordError as exc:
            log.warning("skipping %s: %s", path.name, exc)


def load_records(results_dir: str | Path) -> list[dict]:
    return [rec for _, rec in iter_records(results_dir)]


def find_ok(results_dir: str | Path, run_id: str) -> dict | None:
    """The record for ``run_id`` if it exists, parses and has status ok."""
    path = record_path(results_dir, run_id)
    if not path.exists():
        return None
    try:
        rec = load_record(path)
    except RecordError:
        return None
    return rec if rec["status"] == "ok" else None
