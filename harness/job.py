"""The job process: ``python -m harness.job <job.json> [--base]``.

``job.json`` is a job planned by ``harness.run.plan``. Without ``--base`` it trains, measures and
evaluates the arm and writes its record (on rank 0); with ``--base`` it writes the base-model
record. The sequential launcher runs it with plain python; a distributed job runs it on every
process under ``accelerate launch`` (see ``harness.distributed.launch_command``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.job", description=__doc__.splitlines()[0])
    parser.add_argument("job_file", help="a job planned by harness.run.plan, as JSON")
    parser.add_argument("--base", action="store_true", help="evaluate the base model instead of training the arm")
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job_file).read_text())

    from harness.run import execute, execute_base

    execute_base(job, own_process=True) if args.base else execute(job, own_process=True)


if __name__ == "__main__":
    main()
