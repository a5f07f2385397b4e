"""One job over several processes: accelerate launch flags, identity, per-rank records; DDP,
FSDP2 and DeepSpeed ZeRO-3 for real on 2 CPU processes (gloo).

accelerate (1.16) turns ``--use_fsdp`` / ``--use_deepspeed`` into FSDP / DeepSpeed only on GPU-like
processes; the 2-process FSDP and ZeRO-3 tests put tests/cpu_sharded (a sitecustomize that does
the same for MULTI_CPU) on PYTHONPATH. That patch lives in this test launcher only, never in the
product.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, RUN_CWD, TINY, harness_run

from harness import distributed, records
from harness.measure import pricing
from harness.plan import plan
from harness.records import new_record
from harness.run import run_isolated

CPU_SHARDED_PATCH = ROOT / "tests" / "cpu_sharded"
# deepspeed, installed beside the venv by `make setup` (not in it: accelerate would import it in every job)
DEEPSPEED_SITE = Path(sys.prefix) / "deepspeed-site"
LOCK = "/tmp/harness-cpu.lock"
# 4 steps of a global batch of 4 sequences: 2 processes x 2, or 1 process x 4
TINY_DIST = [a for a in TINY if not a.startswith(("train.max_steps", "train.batch_size"))] + [
    "train.max_steps=4",
    "train.warmup_steps_excluded=1",
]


from conftest import composed as compose  # noqa: E402


@pytest.fixture(scope="module")
def cpu_lock():
    """Hold the machine's CPU lock while 2-process jobs run (HARNESS_CPU_LOCK_HELD=1: the caller
    already holds it, e.g. ``flock /tmp/harness-cpu.lock env HARNESS_CPU_LOCK_HELD=1 pytest ...``)."""
    if os.environ.get("HARNESS_CPU_LOCK_HELD"):
        yield
        return
    import fcntl

    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def harness_run_procs(*args: str, sharded_patch: bool = False, timeout: int = 600,
                      cache: Path | None = None) -> subprocess.CompletedProcess:
    """harness-run with one thread per process; FSDP and ZeRO-3 on CPU through the test patch; ``cache``: a
    model cache folder of its own (cold: the ranks build it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PEFT_HARNESS_CACHE": str(cache)} if cache else {})}
    env["PYTHONPATH"] = os.pathsep.join(
        [*([str(CPU_SHARDED_PATCH), str(DEEPSPEED_SITE)] if sharded_patch else []), str(ROOT),
         env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", "harness.run", *args], cwd=RUN_CWD, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- launching (no processes)


def test_none_is_plain_python_on_exactly_one_device(monkeypatch):
    cfg = compose("model=tiny-random")
    assert distributed.launch_command("/tmp/j.json", cfg) == [sys.executable, "-m", "harness.job", "/tmp/j.json"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert distributed.launch_env(cfg)["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert distributed.launch_env(cfg)["CUDA_VISIBLE_DEVICES"] == "0"
    # the base-model evaluation of a distributed sweep is one process on one device too
    fsdp = compose("model=tiny-random", "distributed=fsdp")
    assert distributed.launch_command("/tmp/j.json", fsdp, base=True)[1:] == [
        "-m",
        "harness.job",
        "/tmp/j.json",
        "--base",
    ]


def _accelerate_env(cfg: dict) -> dict:
    """What accelerate's own launcher makes of our flags: the environment its processes get."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    cmd = distributed.launch_command("/tmp/j.json", cfg)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-3:] == ["-m", "harness.job", "/tmp/j.json"]
    args = launch_command_parser().parse_args(cmd[3:])
    args, _, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


def test_fsdp_flags_build_accelerates_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    cfg = compose(
        "model=tiny-random", "distributed=fsdp", "distributed.num_processes=8", "distributed.main_process_port=29777"
    )
    args, env = _accelerate_env(cfg)
    assert args.use_fsdp and args.num_processes == 8 and args.nproc_per_node == "8"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # built from the launcher's environment, as Accelerator does
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert "transformer_auto_wrap_policy" in str(plugin.auto_wrap_policy)
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.cpu_ram_efficient_loading  # weights read once, on rank 0


def test_multi_node_flags_and_zero3_flags():
    cfg = compose(
        "model=tiny-random",
        "distributed=ddp",
        "distributed.num_processes=16",
        "distributed.num_machines=2",
        "distributed.machine_rank=1",
        "distributed.main_process_ip=10.0.0.1",
    )
    args, _ = _accelerate_env(cfg)
    assert args.multi_gpu and args.nnodes == "2" and args.nproc_per_node == "8" and args.node_rank == 1
    flags = distributed.accelerate_flags(
        compose("distributed=zero3", "train.grad_accum=4")["distributed"], {"grad_accum": 4}
    )
    text = " ".join(flags)
    assert "--use_deepspeed" in text and "--zero_stage 3" in text and "--gradient_accumulation_steps 4" in text


@pytest.mark.parametrize("norm", ["0.3", "1.0", "0.0"])
def test_zero3_launch_clips_at_the_trainers_max_grad_norm(norm):
    """The Trainer fills DeepSpeed's gradient_clipping from train.max_grad_norm and raises when the
    launch's differs: the launch passes train.max_grad_norm."""
    cfg = compose("model=tiny-random", "distributed=zero3", f"train.max_grad_norm={norm}")
    flags = distributed.launch_command("/tmp/j.json", cfg)
    i = flags.index("--gradient_clipping")
    assert float(flags[i + 1]) == float(norm) == cfg["train"]["max_grad_norm"]


def test_strategy_and_world_size_are_in_the_identity_rendezvous_is_not():
    base = plan(compose("model=tiny-random", "distributed=fsdp"))
    other_machine = plan(
        compose(
            "model=tiny-random", "distributed=fsdp", "distributed.machine_rank=1", "distributed.main_process_port=30000"
        )
    )
    assert other_machine["run_id"] == base["run_id"] and other_machine["pair_key"] == base["pair_key"]
    for change in (["distributed=ddp"], ["distributed=fsdp", "distributed.num_processes=4"], []):
        job = plan(compose("model=tiny-random", *change))
        assert job["pair_key"] != base["pair_key"], change


@pytest.mark.parametrize(
    "args,needle",
    [
        (["distributed.num_processes=2"], "distributed.num_processes=2 with distributed=none"),
        (
            [
                "distributed=ddp",
                "distributed.num_processes=3",
                "distributed.num_machines=2",
                "distributed.main_process_ip=h",
            ],
            "distributed.num_processes=3 is not a multiple",
        ),
        (
            ["distributed=fsdp", "distributed.num_machines=2", "distributed.num_processes=4"],
            "distributed.main_process_ip is empty",
        ),
    ],
)
def test_bad_distributed_settings_exit_2_and_write_nothing(tmp_path, args, needle):
    results = tmp_path / "results"
    proc = harness_run("model=tiny-random", *args, f"results_dir={results}", "report=false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not results.exists()


def test_zero3_without_deepspeed_is_a_usage_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(Exception, match="pip install 'peft-harness\\[deepspeed\\]'"):
        plan(compose("model=tiny-random", "distributed=zero3"))


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype():
    from harness.methods import normalize, quantization_config

    method = normalize(compose("method=qlora")["method"])
    assert quantization_config(method).bnb_4bit_quant_storage == torch.uint8
    sharded = quantization_config(method, sharded=True)
    assert sharded.bnb_4bit_quant_storage == sharded.bnb_4bit_compute_dtype == getattr(torch, method["compute_dtype"])


_FSDP2_QLORA_BYTES = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
from harness.config import compose
from harness.measure.serving import tensor_bytes
from harness.methods import apply_method, normalize, quantization_config
from harness.models import load_model
method = normalize(compose(["model=tiny-random", "method=qlora"])["method"])
loaded = load_model(compose(["model=tiny-random"])["model"], quantization_config=quantization_config(method, sharded=True))
model = apply_method(loaded.model, method)
before = tensor_bytes(model, torch.bfloat16)
for layer in model.get_base_model().model.layers:
    fully_shard(layer)
fully_shard(model)
weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
assert type(weight).__name__ == "DTensor" and getattr(weight, "quant_state", None) is None, type(weight)
print(before["checkpoint"], tensor_bytes(model, torch.bfloat16)["checkpoint"])
"""


@pytest.mark.slow
def test_fsdp2_sharded_4bit_weights_are_sized_from_their_shapes():
    # after fully_shard a 4-bit weight is a DTensor of packed storage without quant_state: the
    # merged checkpoint must still count each 4-bit layer at its full shape (issue 22, item 5)
    proc = subprocess.run([sys.executable, "-c", _FSDP2_QLORA_BYTES, "29657"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(int, proc.stdout.split()[-2:])
    assert after == before


def test_combine_takes_the_largest_rank_and_counts_devices_used():
    ranks = [
        {"device": "h/cuda:0", "peak_memory_bytes": 5, "peak_memory_reserved_bytes": 7, "peak_flops_per_s": 1.0},
        {"device": "h/cuda:1", "peak_memory_bytes": 9, "peak_memory_reserved_bytes": 8, "peak_flops_per_s": 1.0},
    ]
    out = distributed.combine(ranks, "fsdp")
    assert out["world_size"] == 2 and out["devices"] == ["h/cuda:0", "h/cuda:1"]
    assert out["peak_memory_bytes_per_rank"] == [5, 9] and out["peak_memory_bytes"] == 9
    assert out["peak_memory_reserved_bytes"] == 8
    assert distributed.gather({"a": 1}) == [{"a": 1}]  # no process group: this process only


# ---------------------------------------------------------------- the parent's record of a dead job


def _fake_launch(monkeypatch, code: str) -> None:
    monkeypatch.setattr(distributed, "launch_command", lambda job_file, cfg, base=False: [sys.executable, "-c", code])


def test_parent_records_a_killed_job(tmp_path, monkeypatch):
    job = plan(compose("model=tiny-random", "distributed=ddp", f"results_dir={tmp_path}"))
    _fake_launch(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    run_isolated(job)
    rec = records.load_record(records.record_path(tmp_path, job["run_id"]))
    assert rec["status"] == "killed" and "exited with code -9: killed by SIGKILL (likely" in rec["error"]
    assert rec["failed_phase"] == "load"  # killed before the job process said where it was


def test_a_rank_that_reported_out_of_memory_and_was_then_killed_is_oom(tmp_path, monkeypatch):
    """The device said so (a CUDA OOM error left by rank 1): oom, whatever the exit code."""
    job = plan(compose("model=tiny-random", "distributed=fsdp", f"results_dir={tmp_path}"))
    code = (
        "import json, os, pathlib, signal; d = pathlib.Path(os.environ['HARNESS_JOB_ERROR_DIR']); "
        "(d / 'rank1.json').write_text(json.dumps({'status': 'oom', 'error': 'OutOfMemoryError: CUDA out of memory "
        "(in phase train)', 'failed_phase': 'train'})); os.kill(os.getpid(), signal.SIGKILL)"
    )
    _fake_launch(monkeypatch, code)
    run_isolated(job)
    rec = records.load_record(records.record_path(tmp_path, job["run_id"]))
    assert rec["status"] == "oom" and rec["error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_parent_records_a_failing_ranks_own_error(tmp_path, monkeypatch):
    job = plan(compose("model=tiny-random", "distributed=fsdp", f"results_dir={tmp_path}"))
    # what execute() leaves when rank 1 of a job runs out of memory, then the launcher's exit code
    code = (
        "import json, os, pathlib; d = pathlib.Path(os.environ['HARNESS_JOB_ERROR_DIR']); "
        "(d / 'rank1.json').write_text(json.dumps({'status': 'oom', 'error': 'OutOfMemoryError: rank 1 (in phase eval)', "
        "'failed_phase': 'eval'})); "
        "raise SystemExit(1)"
    )
    _fake_launch(monkeypatch, code)
    run_isolated(job)
    rec = records.load_record(records.record_path(tmp_path, job["run_id"]))
    assert rec["status"] == "oom" and rec["error"] == "OutOfMemoryError: rank 1 (in phase eval)"
    assert rec["failed_phase"] == "eval"


def test_parent_leaves_an_existing_record_alone(tmp_path, monkeypatch):
    job = plan(compose("model=tiny-random", "distributed=ddp", f"results_dir={tmp_path}"))
    records.write_record(tmp_path, new_record(job, {}))
    _fake_launch(monkeypatch, "raise SystemExit(3)")
    run_isolated(job)
    assert records.load_record(records.record_path(tmp_path, job["run_id"]))["status"] == "ok"


# ---------------------------------------------------------------- 2 CPU processes, for real


def _arms(results: Path) -> dict:
    return {r["method"]: r for r in records.load_records(results) if r["method"] != "base"}


def _arms_of_run(results: Path, *args: str, sharded_patch: bool = False) -> dict:
    """The arms' records of one tiny harness-run (batch 2 per process) into ``results``, which must succeed."""
    proc = harness_run_procs(*args, *TINY_DIST, "train.batch_size=2", f"results_dir={results}",
                             sharded_patch=sharded_patch)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _arms(results)


def _sharded_state_bytes(rec: dict, rank: int) -> int:
    parts = rec["metrics"]["memory_breakdown_bytes_per_rank"][rank]
    return parts["parameters"] + parts["gradients"] + parts["optimizer_state"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, cpu_lock):
    """FSDP2 over 2 CPU processes (full and LoRA), and the same full arm in one process."""
    # evaluation on (random) weights too: every rank evaluates the sharded model in step
    sharded = _arms_of_run(tmp_path_factory.mktemp("fsdp"), "-m", "method=full,lora", "distributed=fsdp",
                           "distributed.num_processes=2", "distributed.main_process_port=29631",
                           "eval.on_random_weights=true", "eval.indomain.batch_size=8", sharded_patch=True)
    return sharded, _arms_of_run(tmp_path_factory.mktemp("single"), "method=full")


@pytest.mark.slow
def test_fsdp_two_processes_write_one_record_per_arm_with_per_rank_figures(fsdp_runs):
    sharded, _ = fsdp_runs
    assert sorted(sharded) == ["full", "lora"]
    for rec in sharded.values():
        m = rec["metrics"]
        assert rec["status"] == "ok", rec["error"]
        assert m["world_size"] == 2 and m["strategy"] == "fsdp" and len(m["devices"]) == 2
        assert len(m["peak_memory_bytes_per_rank"]) == 2
        assert m["peak_memory_bytes"] == max(m["peak_memory_bytes_per_rank"])
        assert m["train_tokens"] == 2 * m["token_budget"]  # padded positions of both ranks
        assert 0 < m["train_tokens_real"] <= m["train_tokens"]  # the Trainer sums them over the ranks
        assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2)
        # a CPU job pays for the cores of both processes (their torch threads, at most the machine's)
        assert m["priced_unit"] == "cpu core" and m["priced_units"] == pricing.cpu_cores_used(rec["env"]["cpu_threads"], 2)
        assert m["cost_usd"] == pytest.approx(m["train_wall_excl_probe_s"] / 3600 * m["price_per_core_hour_usd"]
                                              * m["priced_units"])
        assert "latency" in m["skipped_measurements"]  # merging into sharded weights: skipped, said why
        assert rec["env"]["device_count"] == 2
        assert m["indomain_n"] == 8 and len(m["eval_peak_memory_bytes_per_rank"]) == 2
    assert sharded["lora"]["metrics"]["adapter_bytes"] > 0  # saved from its gathered shards


@pytest.mark.slow
def test_fsdp_shards_parameters_gradients_and_optimizer_state(fsdp_runs):
    sharded, single = fsdp_runs
    one = _sharded_state_bytes(single["full"], 0)
    for rank in (0, 1):
        ratio = _sharded_state_bytes(sharded["full"], rank) / one
        assert 0.4 <= ratio <= 0.65, (rank, ratio)


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory, cpu_lock):
    """DeepSpeed ZeRO-3 over 2 CPU processes (its CPU accelerator, gloo), full and LoRA, and the
    same arms in one process."""
    sharded = _arms_of_run(tmp_path_factory.mktemp("zero3"), "-m", "method=full,lora", "distributed=zero3",
                           "distributed.num_processes=2", "distributed.main_process_port=29633",
                           "eval.on_random_weights=true", sharded_patch=True)
    return sharded, _arms_of_run(tmp_path_factory.mktemp("zero3-single"), "-m", "method=full,lora")


@pytest.mark.slow
def test_zero3_two_processes_train_and_save_the_gathered_adapter(zero3_runs):
    sharded, single = zero3_runs
    assert sorted(sharded) == ["full", "lora"]
    for method, rec in sharded.items():
        m = rec["metrics"]
        assert rec["status"] == "ok", rec["error"]
        assert m["strategy"] == "zero3" and m["world_size"] == 2 and len(m["peak_memory_bytes_per_rank"]) == 2
        assert m["train_tokens"] == 2 * m["token_budget"]
        # every weight counted at its whole size (ds_numel), as in one process
        assert m["full_checkpoint_bytes"] == single[method]["metrics"]["full_checkpoint_bytes"]
        assert m["total_params"] == single[method]["metrics"]["total_params"]
        assert m["eval_split"] == "every rank scores every question"
    # the adapter gathered from its partitions (GatheredParameters), saved whole by rank 0
    assert sharded["lora"]["metrics"]["adapter_bytes"] == single["lora"]["metrics"]["adapter_bytes"] > 0
    assert "latency" in sharded["lora"]["metrics"]["skipped_measurements"]


@pytest.mark.slow
def test_zero3_partitions_the_optimizer_state_over_the_ranks(zero3_runs):
    sharded, single = zero3_runs
    one = single["full"]["metrics"]["memory_breakdown_bytes_per_rank"][0]["optimizer_state"]
    for rank in (0, 1):
        ratio = sharded["full"]["metrics"]["memory_breakdown_bytes_per_rank"][rank]["optimizer_state"] / one
        assert 0.4 <= ratio <= 0.65, (rank, ratio)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cpu_lock):
    """DDP over 2 CPU processes, batch 2 each (a global batch of 4)."""
    ddp = tmp_path_factory.mktemp("ddp")
    # on a cold model cache: whichever rank builds it must write the weights (transformers saves
    # on rank 0 only once a process group exists; harness.models._save_on_any_rank)
    proc = harness_run_procs("method=lora", *TINY_DIST, "train.batch_size=2", "distributed=ddp",
                             "distributed.main_process_port=29632", "eval.on_random_weights=true", f"results_dir={ddp}",
                             cache=tmp_path_factory.mktemp("cold-cache"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _arms(ddp)["lora"]


def test_ddp_two_processes_write_one_record_counting_tokens_on_both_ranks(ddp_run):
    m = ddp_run["metrics"]
    assert ddp_run["status"] == "ok", ddp_run["error"]
    assert m["world_size"] == 2 and m["strategy"] == "ddp" and len(m["devices"]) == 2
    assert len(m["peak_memory_bytes_per_rank"]) == 2 and m["peak_memory_bytes"] == max(m["peak_memory_bytes_per_rank"])
    assert m["train_tokens"] == 2 * m["token_budget"]
    assert m["latency_prefill_base_ms"] is not None  # DDP keeps whole weights: rank 0 measures latency


def test_ddp_ranks_split_the_questions_and_rank_0_records_every_answer_once(ddp_run):
    from harness.stats import read_items

    m = ddp_run["metrics"]
    assert m["eval_split"] == "questions split over 2 ranks"
    # each rank scored its half of lm-eval's requests (4 answer letters per question), not all of
    # them; lm-eval pads the shorter share with one question's copies so both run equal batches
    n0, n1 = m["eval_requests_per_rank"]
    questions = m["indomain_n"] + (m.get("validation_indomain_n") or 0)
    assert 4 * questions <= n0 + n1 <= 4 * questions + 4 and abs(n0 - n1) <= 4, (n0, n1, questions)
    # the gathered answers: every held-out question once, as many as the base model scored alone
    base = records.find_ok(ddp_run["config"]["results_dir"], ddp_run["base_run_id"])
    assert m["indomain_n"] == base["metrics"]["indomain_n"] > 0
    ids = [it["id"] for it in read_items(ddp_run["config"]["results_dir"], ddp_run) if it["task"] == "indomain"]
    assert len(ids) == len(set(ids)) == m["indomain_n"]


@pytest.mark.slow
def test_ddp_trains_like_one_process_on_the_same_global_batch(ddp_run, tmp_path, cpu_lock):
    proc = harness_run_procs("method=lora", *TINY_DIST, "train.batch_size=4", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = _arms(tmp_path)["lora"]["metrics"]
    assert ddp_run["metrics"]["train_tokens"] == single["train_tokens"]
    losses = [loss for _, loss in ddp_run["metrics"]["loss_curve"]]
    expected = [loss for _, loss in single["loss_curve"]]
    # fp32; gloo sums the two halves of the batch in another order: Adam amplifies the last bits
    assert losses == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_report_shows_the_memory_of_a_multi_device_run_per_gpu(tmp_path):
    from test_report import GiB, _table, make_record

    from harness.report import AT_A_GLANCE, build_report
    from harness.report import ROW_LABELS as ROWS

    make_record(tmp_path / "r", "full", trainable_params=1_000_000, peak_memory_bytes=10 * GiB, world_size=8)
    make_record(tmp_path / "r", "lora", rank=8, trainable_params=10_000, peak_memory_bytes=2 * GiB, world_size=1)
    table = _table(build_report(tmp_path / "r", tmp_path / "out")[AT_A_GLANCE].read_text())
    assert table[ROWS[1]]["full FT"] == "10.0 GiB per GPU × 8"
    assert table[ROWS[1]]["LoRA r=8"] == "2.00 GiB"
