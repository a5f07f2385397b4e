"""The job process: ``python -m harness.job <job.json> [--base]``.

``job.json`` is a job planned by ``harness.run.plan``. Without ``--base`` it trains, measures and
evaluates the arm and writes its record (on rank 0); with ``--base`` it writes the base-model
record. The sequential launcher runs it with plain python; a distributed job runs it on every
process under ``accelerate launch`` (see ``harness.distributed.launch_command``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.job", description=__doc__.splitlines()[0])
    parser.add_argument("job_file", help="a job planned by harness.run.plan, as JSON")
    parser.add_argument("--base", action="store_true", help="evaluate the base model instead of training the arm")
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job_file).read_text())

    from harness import records
    from harness.run import execute, execute_base

    if "HARNESS_RUN_LOCK_FD" in os.environ:  # the sweep's run-id lock, shared with this process
        records.take_over_holder(int(os.environ["HARNESS_RUN_LOCK_FD"]),
                                 records.lock_path(job["config"]["results_dir"], job["run_id"]))
    execute_base(job, own_process=True) if args.base else execute(job, own_process=True)


if __name__ == "__main__":
    main()
