"""What does freezing the stack's objects out of the garbage collector save a job process?

``harness.job`` imports what training uses and calls ``gc.freeze()`` (``import_the_stack``) before
the job makes any object of its own. This runs one planned job (tiny-random LoRA at the test
suite's settings by default) as its own process, alternately as shipped and with
``import_the_stack`` replaced by a no-op (the lazy imports and a collector that walks every
import-time object on each ``gc.collect()``), ``--rounds`` times each, and prints each process's
wall time, the medians and their ratio. Target: frozen / unfrozen < 1 (the job collects about ten
times: before each memory measurement, and accelerate before each device-cache clear).

    flock /tmp/harness-cpu.lock .venv/bin/python -m benchmarks.bench_job_startup [--rounds 3] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.config import compose
from harness.plan import plan

# the test suite's tiny job (tests/conftest.py TINY), LoRA
TINY = ["model=tiny-random", "hardware=cpu", "method=lora", "train.max_steps=5", "train.batch_size=2",
        "train.seq_len=64", "data.n_train=16", "data.n_heldout=8", "eval.mmlu.enabled=false",
        "eval.latency.reps=4", "eval.latency.gen_tokens=2", "eval.variants.counts=[1,2]", "eval.variants.batch=2",
        "eval.variants.reps=4", "eval.variants.switch_reps=6", "eval.variants.gen_tokens=2", "report=false"]

UNFROZEN = "import sys, harness.job as j; j.import_the_stack = lambda: None; j.main(sys.argv[1:])"


def run_once(job_file: Path, results: Path, frozen: bool) -> float:
    shutil.rmtree(results, ignore_errors=True)
    cmd = ([sys.executable, "-m", "harness.job", str(job_file)] if frozen
           else [sys.executable, "-c", UNFROZEN, str(job_file)])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides replacing the tiny job's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-job-startup-") as tmp:
        results = Path(tmp, "results")
        job = plan(compose([*(args.overrides or TINY), f"results_dir={results}"]))
        job_file = Path(tmp, "job.json")
        job_file.write_text(json.dumps(job))
        walls: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.rounds):
            for frozen in (False, True):  # alternate: a slow spell of the machine hits both
                walls[frozen].append(run_once(job_file, results, frozen))
                print(f"round {i + 1}: {'frozen  ' if frozen else 'unfrozen'} {walls[frozen][-1]:.2f} s", flush=True)
    frozen, unfrozen = statistics.median(walls[True]), statistics.median(walls[False])
    print(f"{job['run_id']}: job process median {unfrozen:.2f} s unfrozen, {frozen:.2f} s frozen: "
          f"ratio {frozen / unfrozen:.2f} ({args.rounds} rounds each)")


if __name__ == "__main__":
    main()
