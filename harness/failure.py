"""A job's failure: the phase it was in, and whether it ran out of memory or was killed.

    phases = failure.Phases()            # "load" from the start
    phases.enter("train")                # at each phase boundary of the job
    ...
    except Exception as exc:
        record.update(failure.fields(exc, phases.current))   # status, error, failed_phase

The job process also leaves its current phase in ``HARNESS_JOB_ERROR_DIR`` (one small file per
rank), so that when the process is killed outright (SIGKILL: the kernel's OOM killer, a scheduler,
a person) the parent that writes its record still knows where it died. No torch import: the parent
uses it.

Statuses: ``oom`` only when a device or allocator said so (an out-of-memory error raised in the
job, or left by a rank); ``killed`` for a process ended by SIGKILL with no such account: the host
running out of memory is the likely cause, but a SIGKILL says nothing about the GPU. Records
written before ``killed`` existed say ``oom`` for those (``was_killed`` tells them apart).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

# In the order a job runs them. "load": process start, data, base-model record lookup, model and
# method, trainer; "base_eval": evaluating the base model in the arm's process (its own process
# failed); "mfu": the device-peak matmul after training; "footprint": adapter/checkpoint sizes.
PHASES = ("load", "base_eval", "train", "mfu", "eval", "footprint", "latency", "variants")
# What an allocator failure says: CUDA ("CUDA out of memory", "CUDA error: out of memory"), MPS,
# the CPU allocator ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."),
# C++ std::bad_alloc, cuBLAS workspace allocation.
OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
             "cublas_status_alloc_failed")
# exit codes of a process killed by SIGKILL, as subprocess (-9) or a shell (137) reports it
KILLED_CODES = (-9, 137)
# what a SIGKILL most likely was: stated as likely, since the signal does not say who sent it
KILLED_CAUSE = "killed by SIGKILL (likely the host's out-of-memory killer or a scheduler)"


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error on any device: torch.OutOfMemoryError, MemoryError, or an
    allocator's RuntimeError (the CPU allocator raises a plain RuntimeError)."""
    if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    return any(text in str(exc).lower() for text in OOM_TEXTS)


def error_text(message: str, phase: str) -> str:
    """The record's error line: the message and the phase it failed in."""
    return f"{message.strip()[:2000]} (in phase {phase})"


def fields(exc: BaseException, phase: str) -> dict:
    """status, error and failed_phase of a record whose job raised ``exc`` in ``phase``."""
    return {"status": "oom" if is_oom(exc) else "failed",
            "error": error_text(f"{type(exc).__name__}: {exc}", phase), "failed_phase": phase}


def _phase_file(folder: str | Path, rank: int) -> Path:
    return Path(folder, f"phase-rank{rank}.txt")


class Phases:
    """The phase a job process is in (``current``), also left in ``HARNESS_JOB_ERROR_DIR``, and
    the wall time spent in each phase so far (``seconds()``; a phase entered twice adds up)."""

    def __init__(self) -> None:
        self.current = ""
        self._spent: dict[str, float] = {}
        self._since = 0.0
        self.enter("load")

    def enter(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} is unknown; valid: {', '.join(PHASES)}")
        self._close()
        self.current = phase
        folder = os.environ.get("HARNESS_JOB_ERROR_DIR")
        if folder:
            _phase_file(folder, int(os.environ.get("RANK", "0"))).write_text(phase)

    def _close(self) -> None:
        now = time.perf_counter()
        if self.current:
            self._spent[self.current] = self._spent.get(self.current, 0.0) + now - self._since
        self._since = now

    def seconds(self) -> dict[str, float]:
        """Wall seconds per phase reached, the current one up to now, in the order of PHASES."""
        self._close()
        return {p: self._spent[p] for p in PHASES if p in self._spent}


def process_age_s() -> float | None:
    """Seconds since this process was created: its start-up (interpreter, imports) when called
    at a job's start. None where the OS does not say."""
    try:
        return max(0.0, time.time() - psutil.Process().create_time())
    except psutil.Error:  # the process table unreadable: no figure, not a guess
        return None


def last_phase(folder: str | Path) -> str:
    """The latest phase any rank of a job reached (from the files ``Phases`` left in ``folder``);
    "load" when none was left (the process died while starting)."""
    reached = []
    for path in Path(folder).glob("phase-rank*.txt"):
        try:
            reached.append(path.read_text().strip())
        except OSError:
            continue
    reached = [p for p in reached if p in PHASES]
    return max(reached, key=PHASES.index) if reached else "load"


def killed(returncode: int, folder: str | Path) -> dict:
    """status, error and failed_phase of a job process that ended with ``returncode`` and left no
    account of its own (killed before it could say why)."""
    phase = last_phase(folder)
    if returncode in KILLED_CODES:
        return {"status": "killed", "error": error_text(f"job process exited with code {returncode}: {KILLED_CAUSE}",
                                                        phase), "failed_phase": phase}
    return {"status": "failed", "error": error_text(f"job process exited with code {returncode}", phase),
            "failed_phase": phase}


def was_killed(record: dict) -> bool:
    """A record of a job process killed by SIGKILL: status ``killed``, or an ``oom`` written by an
    older harness for an exit code -9/137 (no device reported running out of memory)."""
    if record.get("status") == "killed":
        return True
    error = str(record.get("error") or "")
    return record.get("status") == "oom" and any(
        error.startswith(f"job process exited with code {code}") for code in KILLED_CODES)
