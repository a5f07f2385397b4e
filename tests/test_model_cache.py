"""The model cache on a cold start: processes that start together (the ranks of a distributed
job, parallel jobs) build a cache folder once and all load it."""

import os
import subprocess
import sys

from conftest import ROOT

LOAD = (
    "from harness.models import load_model; "
    "m = load_model({'name': 'tiny-random', 'source': 'config', 'arch': 'tiny-random'}); "
    "print('loaded', m.total_params)"
)


def test_processes_starting_together_on_a_cold_cache_all_load(tmp_path):
    env = {**os.environ, "PEFT_HARNESS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-800:] for o in outs)
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1  # the same model for all
    arch = tmp_path / "cache" / "arch"
    assert [p.name for p in arch.iterdir() if ".tmp" in p.name] == []  # no builder's leftovers
