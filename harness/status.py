"""harness-status: which jobs of a sweep are done, running, failed, oom, killed or missing.

    harness-status                      the latest sweep (or run) over results/
    harness-status --results DIR --all  every sweep and run over DIR, oldest first

A sweep is running (its launcher lives), finished (every job left a record) or stopped (its
launcher ended first: rerun it). A run started without -m is listed as a sweep of one job.

A job's state, from what the folder holds (see harness/sweep.py for the files):
running  its run id's lock is held (by a job of this sweep or of another one)
done     an ok record
failed   a failed record (the phase it failed in and its error are shown)
oom      an oom record (the device or allocator reported out of memory)
killed   a killed record (its process was killed by SIGKILL, exit code -9/137: likely the host's
         out-of-memory killer or a scheduler; an older record says oom for it)
missing  no record: not started yet (queued while the sweep's launcher lives), or started and
         interrupted (its lock is free): rerun the sweep, finished jobs are skipped
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from harness import records, sweep

STATES = ("done", "running", "failed", "oom", "killed", "missing")
ENDED = ("done", "failed", "oom", "killed")  # a record was left


def job_state(results_dir: str | Path, entry: dict | None, alive: bool) -> tuple[str, str]:
    """(state, detail) of one planned job; ``entry`` is what the job registered when it started."""
    if entry is None:
        return "missing", "queued: the sweep is still running" if alive else "not started"
    run_id = entry["run_id"]
    holder = records.lock_holder(results_dir, run_id)
    if holder is not None:
        return "running", f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    path = records.record_path(results_dir, run_id)
    if not path.exists():
        return "missing", f"interrupted: started {entry.get('started_at', '?')} on {entry.get('host', '?')}, no record"
    try:
        rec = records.load_record(path)
    except records.RecordError as exc:
        return "missing", f"unreadable record: {exc}"
    if rec["status"] == "ok":
        return "done", ""
    error, phase = rec.get("error") or "", rec.get("failed_phase")
    if phase:  # the phase first: a long error (CUDA's) would push it off the line
        error = f"in phase {phase}: {error.removesuffix(f' (in phase {phase})')}"
    return rec["status"], error[:160]


def varying_overrides(jobs: list[dict]) -> set[str]:
    """The override keys whose value differs between the sweep's jobs (the sweep's axes)."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job["overrides"]:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1}


def launcher_alive(results_dir: str | Path, sw: dict) -> bool:
    return records.holder_of(sweep.sweep_path(results_dir, sw["sweep_id"]) / "launcher.lock") is not None


def sweep_rows(results_dir: str | Path, sw: dict, alive: bool) -> list[dict]:
    """One row per planned job (or per started job when the plan is unknown)."""
    planned = sw.get("jobs") or [{"num": n, "overrides": e["overrides"]} for n, e in sorted(sw["registered"].items())]
    # a sweep's axes; a single job's whole command line
    axes = varying_overrides(planned) if len(planned) > 1 else {o.partition("=")[0] for j in planned for o in j["overrides"]}
    rows = []
    for job in planned:
        entry = sw["registered"].get(job["num"])
        state, detail = job_state(results_dir, entry, alive)
        point = " ".join(o for o in job["overrides"] if o.partition("=")[0] in axes)
        rows.append(
            {
                "num": job["num"],
                "state": state,
                "run_id": entry["run_id"] if entry else "-",
                "point": point,
                "detail": detail,
            }
        )
    return rows


def progress(rows: list[dict], alive: bool) -> str:
    """running (its launcher lives), finished (every job has a record) or stopped (it did not)."""
    if alive:
        return "running"
    if all(r["state"] in ENDED for r in rows):
        return "finished"
    return "stopped before every job ran (rerun the same command: finished jobs are skipped)"


def render(results_dir: str | Path, sw: dict) -> str:
    alive = launcher_alive(results_dir, sw)
    rows = sweep_rows(results_dir, sw, alive)
    counts = Counter(r["state"] for r in rows)
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES)
    kind = "run" if sw.get("launcher") == "single run" else "sweep"
    lines = [
        f"{kind} {sw['sweep_id']} ({sw.get('launcher', '?')}, started {sw.get('created_at', '?')}): "
        f"{progress(rows, alive)}; {len(rows)} job{'s' if len(rows) != 1 else ''}: {summary}"
    ]
    if sw.get("jobs") is None:
        lines.append("  (this sweeper's plan is unknown: only jobs that started are listed)")
    width = max([len(r["run_id"]) for r in rows] + [6])
    for r in rows:
        text = f"  {r['num']:>3}  {r['state']:<7}  {r['run_id']:<{width}}  {r['point']}"
        lines.append(text + (f"  [{r['detail']}]" if r["detail"] else ""))
    return "\n".join(lines)


def folder_summary(results_dir: str | Path) -> str:
    """Records by status and run ids being run now, for a folder without sweeps too."""
    counts = Counter(rec["status"] for rec in records.load_records(results_dir))
    running = sorted(
        p.stem
        for p in Path(results_dir, records.LOCK_DIR).glob("*.lock")
        if not p.stem.startswith("slot-") and records.lock_holder(results_dir, p.stem) is not None
    )
    text = f"{results_dir}: {sum(counts.values())} records ({', '.join(f'{counts[s]} {s}' for s in records.STATUSES)})"
    return text + (f"; running now: {', '.join(running)}" if running else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness-status", description=__doc__.split("\n\n")[0],
                                     epilog="exit codes: 0 shown; 2 no such results folder. Docs: docs/running.md#harness-status")
    parser.add_argument("--results", default="results", help="folder of run records (default: results)")
    parser.add_argument("--all", action="store_true", help="every sweep and run over the folder, not only the latest")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        print(
            f"harness-status: error: --results {args.results!r} is not a folder; pass the folder a sweep "
            "writes its records into",
            file=sys.stderr,
        )
        return 2
    print(folder_summary(args.results))
    sweeps = sweep.read_sweeps(args.results)
    if not sweeps:
        print("no sweeps or runs recorded in this folder (harness-run writes one per command)")
    for sw in sweeps if args.all else sweeps[-1:]:
        print(render(args.results, sw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
