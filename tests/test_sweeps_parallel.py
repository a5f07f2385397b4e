"""Launchers: the parallel preset (submitit's local executor, for real), the Slurm preset (its
sbatch script, built without a cluster), parallel slots, and harness-status."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, RUN_CWD, TINY, harness_run, harness_status, start_harness_run
from hydra import compose, initialize_config_dir
from test_faults import ENV, job_processes, no_temp_files, wait_for

from harness import records, sweep
from harness.identity import NON_RESULT_KEYS
from harness.plan import plan
from harness.report import build_report

EVAL_TINY = ["eval.on_random_weights=true", "eval.indomain.batch_size=8"]


def compose_cfg(*overrides: str, hydra: bool = True):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def status_of(results: Path) -> str:
    return harness_status(results, env=ENV)


# ---------------------------------------------------------------- presets and slots (fast)


def test_launcher_presets_compose_on_submitit():
    slurm = compose_cfg("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and sweep.launcher_kind(slurm._target_) == "slurm"
    assert slurm.tasks_per_node == 1 and slurm.gpus_per_task == 4 and slurm.max_num_timeout > 0
    local = compose_cfg("hydra/launcher=parallel").hydra.launcher
    assert sweep.launcher_kind(local._target_) == "parallel" and local.gpus_per_node == 0
    assert sweep.launcher_kind("hydra._internal.core_plugins.basic_launcher.BasicLauncher") == "sequential"


def test_parallel_settings_do_not_change_run_ids():
    from omegaconf import OmegaConf

    assert "parallel" in NON_RESULT_KEYS
    ids = set()
    for jobs in ("null", "3"):
        cfg = compose_cfg("model=tiny-random", f"parallel.jobs={jobs}", hydra=False)
        ids.add(plan(OmegaConf.to_container(cfg, resolve=True))["run_id"])
    assert len(ids) == 1


@pytest.mark.parametrize(
    "par,gpus,cores,expected",
    [
        ({"jobs": None, "gpus_per_job": None}, ["0", "1", "2", "3"], 16, (4, 1, 4)),
        ({"jobs": None, "gpus_per_job": 2}, ["0", "1", "2", "3"], 16, (2, 2, 8)),
        ({"jobs": 8, "gpus_per_job": None}, ["0", "1"], 16, (2, 1, 8)),  # never two jobs on one GPU
        ({"jobs": None, "gpus_per_job": None}, [], 8, (2, 0, 4)),
        ({"jobs": 4, "gpus_per_job": None}, [], 2, (4, 0, 1)),
    ],
)
def test_slot_plan(par, gpus, cores, expected):
    assert sweep.slot_plan({"parallel": par, "distributed": {"num_processes": 1}}, gpus, cores) == expected


def test_slot_plan_takes_gpus_per_job_from_distributed_and_rejects_too_many():
    cfg = {"parallel": {"jobs": None, "gpus_per_job": None}, "distributed": {"num_processes": 4}}
    assert sweep.slot_plan(cfg, [str(i) for i in range(8)], 32) == (2, 4, 16)
    with pytest.raises(sweep.SlotError, match="parallel.gpus_per_job=4 is more than the 2 GPU"):
        sweep.slot_plan(cfg, ["0", "1"], 32)
    with pytest.raises(sweep.SlotError, match="parallel.jobs=0 is invalid"):
        sweep.slot_plan({"parallel": {"jobs": 0}}, [], 8)


SLOT_USER = textwrap.dedent("""
    import os, sys, time
    from harness import sweep
    cfg = {"results_dir": sys.argv[1], "parallel": {"jobs": None, "gpus_per_job": 2},
           "distributed": {"num_processes": 1}}
    with sweep.parallel_slot(cfg):
        print("got", os.environ["CUDA_VISIBLE_DEVICES"], os.environ["OMP_NUM_THREADS"], time.monotonic(), flush=True)
        time.sleep(float(sys.argv[2]))
    print("freed", time.monotonic(), flush=True)
""")


def test_parallel_slots_give_jobs_their_own_gpus_and_queue_the_rest(tmp_path):
    env = {**ENV, sweep.ENV_DEVICES: "4,5,6,7"}  # the sweep's GPUs; no GPU is touched

    def start(hold: str) -> subprocess.Popen:
        cmd = [sys.executable, "-c", SLOT_USER, str(tmp_path), hold]
        return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    procs = [start("3"), start("3")]
    heads = [p.stdout.readline() + p.stdout.readline() for p in procs]  # both hold a slot now
    procs.append(start("0"))
    outs = [p.communicate(timeout=60)[0] for p in procs]
    outs = [h + o for h, o in zip(heads + [""], outs)]
    got = [next(line.split()[1:] for line in o.splitlines() if line.startswith("got ")) for o in outs]
    freed = [float(next(line.split()[1] for line in o.splitlines() if line.startswith("freed "))) for o in outs]
    assert {got[0][0], got[1][0]} == {"4,5", "6,7"}, outs  # two slots of two GPUs: no GPU shared
    assert all(g[1] == str(max(1, len(os.sched_getaffinity(0)) // 2)) for g in got)
    # the third job waited for a slot: it started only after one of the first two freed theirs
    assert "waiting for one of 2 parallel slots" in outs[2]
    assert float(got[2][2]) >= min(freed[:2])


PORT_USER = textwrap.dedent("""
    import sys, time
    from harness import distributed, sweep
    cfg = {"results_dir": sys.argv[1], "parallel": {"jobs": 2, "gpus_per_job": None},
           "distributed": {"strategy": sys.argv[3], "num_processes": 2, "num_machines": 1, "main_process_port": 29500},
           "train": {"grad_accum": 1, "max_grad_norm": 1.0}}
    with sweep.parallel_slot(cfg) as given:
        cmd = distributed.launch_command("/tmp/j.json", cfg)
        print("port", given["slot"], cmd[cmd.index("--main_process_port") + 1], flush=True)
        time.sleep(float(sys.argv[2]))
""")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_jobs_in_two_parallel_slots_rendezvous_on_two_ports(tmp_path, strategy):
    """Two jobs side by side (hydra/launcher=parallel) each launch accelerate: one port per slot."""
    env = {**ENV, sweep.ENV_DEVICES: ""}  # no GPU: two CPU slots
    procs = [subprocess.Popen([sys.executable, "-c", PORT_USER, str(tmp_path), "4", strategy], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    ports = dict(line.split()[1:] for o in outs for line in o.splitlines() if line.startswith("port "))
    assert sorted(ports) == ["0/2", "1/2"], outs  # both held a slot at once
    assert ports == {"0/2": "29500", "1/2": "29501"}


def test_the_port_is_as_given_outside_a_slot_and_on_several_machines(monkeypatch):
    from harness import distributed

    dist = {"strategy": "ddp", "num_processes": 2, "num_machines": 1, "main_process_port": 29600}
    monkeypatch.delenv(sweep.ENV_SLOT, raising=False)
    assert distributed.rendezvous_port(dist) == 29600
    monkeypatch.setenv(sweep.ENV_SLOT, "3/4")
    assert distributed.rendezvous_port(dist) == 29603
    assert distributed.rendezvous_port({**dist, "num_machines": 2, "main_process_ip": "10.0.0.1"}) == 29600


# ---------------------------------------------------------------- the Slurm submission (no cluster)

FAKE_SBATCH = """#!/bin/sh
cp "$1" "$CAPTURE_DIR/sbatch-$(basename "$1")"
echo "sbatch: error: no cluster here (test double)" >&2
exit 1
"""


def test_slurm_submission_carries_partition_gpus_time_limit_and_requeue(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CAPTURE_DIR": str(tmp_path)}
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.run",
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj42",
            "hydra.launcher.qos=high",
            "hydra.launcher.gpus_per_node=8",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.max_num_timeout=5",
            "hydra.launcher.mem_gb=200",
            "hydra.launcher.setup=[source .venv/bin/activate]",
            f"hydra.sweep.dir={sweep_dir}",
            "model=tiny-random",
            "method=full,lora,qlora",
            "seed=0,1",
            f"results_dir={tmp_path / 'results'}",
        ],
        cwd=RUN_CWD,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "no cluster here" in proc.stderr + proc.stdout
    scripts = list(tmp_path.glob("sbatch-*"))
    assert len(scripts) == 1  # one array submission for the whole sweep
    text = scripts[0].read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --gpus-per-task=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-gpu=8",
        "#SBATCH --nodes=1",
        "#SBATCH --mem=200GB",
        "#SBATCH --time=90",
        "#SBATCH --array=0-5%6",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "source .venv/bin/activate",
    ):
        assert line in text.splitlines(), (line, text)
    # submitit requeues a timed-out task up to max_num_timeout times (kept with each submission)
    pickles = list((sweep_dir / ".submitit").rglob("*.pkl"))
    assert len(pickles) == 6
    countdowns = {pickle.loads(p.read_bytes())._timeout_countdown for p in pickles}
    assert countdowns == {5}
    # the sweep's plan was written before any job: six planned jobs, none started yet
    assert "0 done, 0 running, 0 failed, 0 oom, 0 killed, 6 missing" in status_of(tmp_path / "results")


# ---------------------------------------------------------------- real parallel sweeps (slow)


@pytest.mark.slow
def test_four_jobs_in_parallel_into_one_folder(tmp_path):
    results, sweep_dir = tmp_path / "results", tmp_path / "sweep"
    proc = harness_run(
        "-m",
        "hydra/launcher=parallel",
        "parallel.jobs=4",
        "method=full,lora",
        "seed=0,1",
        *TINY,
        *EVAL_TINY,
        f"results_dir={results}",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = records.load_records(results)
    arms = [r for r in recs if r["method"] != "base"]
    base = [r for r in recs if r["method"] == "base"]
    assert len(arms) == 4 and all(r["status"] == "ok" for r in arms) and len(base) == 1
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.out"))
    assert logs.count("[base] ") == 1  # evaluated once; the other jobs waited for it and reused it
    assert {r["base_run_id"] for r in arms} == {base[0]["run_id"]}
    # what each job had, in its record: its own slot, a quarter of the cores, the launcher
    assert {r["env"]["launcher"] for r in recs} == {"parallel"}
    assert sorted(r["env"]["parallel_slot"] for r in arms) == ["0/4", "1/4", "2/4", "3/4"]
    assert all(r["env"]["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 4) for r in arms)
    spans = sorted((r["env"]["started_at"], r["env"]["ended_at"]) for r in arms)
    assert spans[1][0] <= spans[0][1]  # jobs ran at the same time
    # a report built from the folder agrees with the records
    build_report(results, tmp_path / "reports")
    runs = pd.read_csv(tmp_path / "reports" / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(r["run_id"] for r in recs) and set(runs["status"]) == {"ok"}
    arms_csv = pd.read_csv(tmp_path / "reports" / "arms.csv").set_index("method")
    assert arms_csv.loc["base", "n_runs"] == 1
    assert arms_csv.loc["full", "n_ok"] == arms_csv.loc["lora", "n_ok"] == 2  # two seeds each
    assert no_temp_files(results)
    assert "4 done, 0 running, 0 failed, 0 oom, 0 killed, 0 missing" in status_of(results)


@pytest.mark.slow
def test_a_job_killed_like_the_oom_killer_in_a_parallel_sweep_gets_a_killed_record(tmp_path):
    results, sweep_dir = tmp_path / "results", tmp_path / "sweep"
    sweep_proc = start_harness_run(
        "-m", "hydra/launcher=parallel", "parallel.jobs=2", "method=full,lora", *TINY, f"results_dir={results}",
        f"hydra.sweep.dir={sweep_dir}", "train.max_steps=40", env=ENV, new_session=True,
    )
    try:
        victim = wait_for(lambda: job_processes(results, "full"), what="the full arm's job process")[0]
        time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)  # what the kernel's OOM killer sends
        out, _ = sweep_proc.communicate(timeout=600)
    finally:
        if sweep_proc.poll() is None:
            os.killpg(sweep_proc.pid, signal.SIGKILL)
    assert sweep_proc.returncode == 1, out[-3000:]  # a job failed (its record written); the sweep went on
    assert "harness-run: 2 jobs: 1 ok, 1 failed (1 killed), 0 skipped" in out
    recs = {r["method"]: r for r in records.load_records(results)}
    # a SIGKILL, not an out-of-memory error of the device: killed, its likely cause stated as likely
    assert recs["full"]["status"] == "killed" and "exited with code -9" in recs["full"]["error"]
    assert "killed by SIGKILL (likely the host's out-of-memory killer or a scheduler)" in recs["full"]["error"]
    assert recs["full"]["env"]["launcher"] == "parallel"  # written by its parent, which knows its slot
    assert recs["lora"]["status"] == "ok"
    status = status_of(results)
    assert "1 done, 0 running, 0 failed, 0 oom, 1 killed, 0 missing" in status, status


# ---------------------------------------------------------------- harness-status (fast)


def test_status_names_each_planned_job_done_running_failed_oom_killed_or_missing(tmp_path):
    from omegaconf import OmegaConf
    from test_faults import _record

    from harness import status

    methods = ["full", "lora", "qlora", "dora", "ia3", "loha", "rslora"]
    hc = OmegaConf.create(
        {
            "sweep": {"dir": str(tmp_path / "sweep")},
            "launcher": {"_target_": "x.SlurmLauncher"},
            "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
            "overrides": {"task": [f"method={','.join(methods)}", "seed=0"]},
            "job": {"num": 0},
        }
    )
    sweep.write_manifest(tmp_path, hc)
    for num, method in enumerate(methods[:6]):  # the seventh never started
        hc.job.num = num
        hc.overrides.task = [f"method={method}", "seed=0"]
        sweep.register_job(tmp_path, hc, {"run_id": f"{method}-0123456789", "base_run_id": "b", "method": method})
    records.write_record(tmp_path, _record("full-0123456789", "done"))
    for method, state in (("qlora", "failed"), ("dora", "oom"), ("loha", "killed")):
        records.write_record(tmp_path, {**_record(f"{method}-0123456789", state), "status": state,
                                        "error": "boom (in phase eval)", "failed_phase": "eval"})
    with records.run_lock(tmp_path, "lora-0123456789"):  # lora runs now; ia3 started and was killed
        assert status.main(["--results", str(tmp_path)]) == 0
        text = status.render(tmp_path, sweep.read_sweeps(tmp_path)[-1])
    assert "7 jobs: 1 done, 1 running, 1 failed, 1 oom, 1 killed, 2 missing" in text
    lines = {line.split()[3]: line.split()[1] for line in text.splitlines()[1:]}
    assert lines == {
        "method=full": "done",
        "method=lora": "running",
        "method=qlora": "failed",
        "method=dora": "oom",
        "method=ia3": "missing",
        "method=rslora": "missing",
        "method=loha": "killed",
    }
    assert "interrupted" in next(line for line in text.splitlines() if "method=ia3" in line)
    assert "in phase eval: boom" in next(line for line in text.splitlines() if "method=dora" in line)
    assert "not started" in next(line for line in text.splitlines() if "method=rslora" in line)
    assert f"pid {os.getpid()}" in next(line for line in text.splitlines() if "method=lora" in line)


def test_a_sweep_stopped_by_bad_input_leaves_nothing_in_results(tmp_path):
    results = tmp_path / "results"
    proc = harness_run(
        "-m",
        "method=lora,full",
        "data=file",
        "data.path=/nonexistent/train.jsonl",
        f"results_dir={results}",
        "report=false",
    )
    assert proc.returncode == 2 and "data.path='/nonexistent/train.jsonl' does not exist" in proc.stderr
    assert not results.exists()  # not even the sweep's manifest


def test_status_lists_a_run_without_m_as_running_then_finished_or_stopped(tmp_path):
    """A run started without -m is a sweep of one job: running while its process lives, then
    finished with its record, or stopped when it left none."""
    from omegaconf import OmegaConf
    from test_faults import _record

    from harness import status

    def single(run_dir, run_id):
        hc = OmegaConf.create({"run": {"dir": str(tmp_path / run_dir)}, "overrides": {"task": ["method=lora", "seed=3"]}})
        return sweep.register_single_run(tmp_path, hc, {"run_id": run_id, "base_run_id": "b", "method": "lora"})

    lock = single("a", "lora-0123456789")
    text = status.render(tmp_path, sweep.read_sweeps(tmp_path)[-1])
    assert text.startswith("run ") and ": running; 1 job: 0 done" in text and "method=lora seed=3" in text, text
    records.write_record(tmp_path, _record("lora-0123456789", "done"))
    lock.release()
    text = status.render(tmp_path, sweep.read_sweeps(tmp_path)[-1])
    assert ": finished; 1 job: 1 done" in text, text
    single("b", "lora-9876543210").release()  # its process ended without a record
    text = status.render(tmp_path, sweep.read_sweeps(tmp_path)[-1])
    assert ": stopped before every job ran" in text and "1 missing" in text, text
    assert len(sweep.read_sweeps(tmp_path)) == 2


def test_the_latest_of_two_runs_started_in_the_same_second_is_the_one_started_last(tmp_path, monkeypatch):
    """Ordered by when they started, not by their ids: the second run's id is chosen to sort
    before the first's, and both get the same second-resolution start time."""
    from omegaconf import OmegaConf

    monkeypatch.setattr(sweep, "now_iso", lambda: "2026-12-03T09:49:28+00:00")

    def hc(run_dir):
        return OmegaConf.create({"run": {"dir": str(tmp_path / run_dir)}, "overrides": {"task": ["method=lora"]}})

    def sid(run_dir):
        return sweep.sweep_id(f"{hc(run_dir).run.dir}#{os.getpid()}")

    first = "a"
    second = next(d for d in (f"b{i}" for i in range(100)) if sid(d) < sid(first))
    for d in (first, second):
        sweep.register_single_run(tmp_path, hc(d), {"run_id": f"lora-{d}", "base_run_id": "b", "method": "lora"}).release()
    assert sweep.read_sweeps(tmp_path)[-1]["sweep_id"] == sid(second)
