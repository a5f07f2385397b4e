"""Throughput and MFU: real (non-padding) and padded token counts, the matmul peak measured once
per hardware and cached, MFU against it and against the datasheet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, harness_run

from harness import records
from harness.data.shapes import to_example
from harness.measure import flops
from harness.measure.callback import MeasureCallback
from harness.models import byte_tokenizer
from harness.train import build_trainer, training_arguments, training_features
from tests.test_measure import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64
TRAIN = {
    "max_steps": 3,
    "batch_size": 2,
    "grad_accum": 2,
    "seq_len": SEQ,
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "optim": "adamw_torch",
    "precision": "fp32",
    "gradient_checkpointing": False,
    "logging_steps": 1,
}


pytestmark = pytest.mark.usefixtures("one_thread")




def train_tiny(count: str, tmp_path: Path):
    """Train on identical examples (one known length) with the harness's Trainer; the Trainer
    counts input tokens as ``count`` says ("non_padding" is what the harness asks for)."""
    tok = byte_tokenizer()
    examples = [to_example({"prompt": "Q: two plus two?", "completion": " four"}, "test")] * 8
    args = training_arguments(TRAIN, 1e-3, 0, output_dir=str(tmp_path))
    args.include_num_input_tokens_seen = count
    probe = MeasureCallback(warmup_steps=0, breakdown_step=None)
    features, _ = training_features(examples, tok, TRAIN)
    trainer = build_trainer(tiny_model(), tok, features, TRAIN, 1e-3, 0, callbacks=[probe], args=args)
    trainer.train()
    length = len(features[0]["input_ids"])
    return trainer, args, probe, length


def test_harness_counts_real_tokens_and_padded_positions(tmp_path):
    assert training_arguments(TRAIN, 1e-3, 0, output_dir=str(tmp_path)).include_num_input_tokens_seen == "non_padding"
    trainer, args, probe, length = train_tiny("non_padding", tmp_path / "a")
    sequences = TRAIN["max_steps"] * TRAIN["batch_size"] * TRAIN["grad_accum"]
    assert length < SEQ  # the example is padded: real tokens are fewer than positions
    padded = flops.padded_tokens(trainer.state.global_step, args, SEQ)
    m = probe.metrics(train_tokens=padded, real_tokens=trainer.state.num_input_tokens_seen)
    assert m["train_tokens"] == sequences * SEQ
    assert m["train_tokens_real"] == sequences * length  # the attention-mask sum
    assert m["real_tokens_per_s"] == pytest.approx(m["train_tokens_real"] / m["train_wall_excl_probe_s"])
    assert m["tokens_per_s"] == pytest.approx(m["train_tokens"] / m["train_wall_excl_probe_s"])
    assert m["real_tokens_per_s"] < m["tokens_per_s"]
    assert m["padding_share"] == pytest.approx(1 - length / SEQ)
    # the padded count from the steps is the Trainer's own count of every position
    counted_all = train_tiny("all", tmp_path / "b")[0].state.num_input_tokens_seen
    assert padded == counted_all


def test_padded_tokens_counts_every_process():
    class Args:
        per_device_train_batch_size, gradient_accumulation_steps, world_size = 4, 2, 3

    assert flops.padded_tokens(5, Args, 128) == 5 * 4 * 2 * 3 * 128


def test_mfu_and_datasheet_mfu():
    m = flops.flops_metrics(6e6, tokens_per_s=1000.0, peak_flops_per_s=1e10, device_count=2)
    assert m["achieved_flops_per_s"] == 6e9
    assert m["mfu"] == pytest.approx(6e9 / 2e10)
    assert flops.flops_metrics(6e6, None, 1e10)["mfu"] is None
    h200 = {"datasheet_bf16_dense_tflops": 989.4, "datasheet_source": "NVIDIA H200 datasheet"}
    d = flops.datasheet_metrics(h200, 4e14, "bfloat16", 2)
    assert d["datasheet_peak_flops_per_s"] == 989.4e12 and d["datasheet_peak_source"] == "NVIDIA H200 datasheet"
    assert d["mfu_datasheet"] == pytest.approx(4e14 / (2 * 989.4e12))
    assert flops.datasheet_metrics(h200, 4e14, "float32", 1)["mfu_datasheet"] is None  # a bf16 figure
    assert flops.datasheet_metrics({"name": "cpu"}, 4e14, "float32", 1)["datasheet_peak_flops_per_s"] is None


def test_measure_peak_flops_times_a_matmul():
    peak = flops.measure_peak_flops("cpu", torch.float32, size=256, reps=3)
    assert 1e7 < peak < 1e14  # a CPU does somewhere between 10 MFLOP/s and 100 TFLOP/s


def test_peak_is_measured_once_per_hardware_and_then_read(tmp_path, monkeypatch):
    timed = []
    real = flops.measure_peak_flops

    def counting(device, dtype, size=None, reps=None, warmup=2):
        timed.append((str(dtype), size, reps))
        return real(device, dtype, size=256, reps=2)

    monkeypatch.setattr(flops, "measure_peak_flops", counting)
    first = flops.device_peak_flops("cpu", torch.float32, cache=tmp_path)
    second = flops.device_peak_flops("cpu", torch.float32, cache=tmp_path)
    assert len(timed) == 1 and timed[0][1:] == (flops.PEAK_SIZE["cpu"], flops.PEAK_REPS["cpu"])
    assert (first["peak_flops_source"], second["peak_flops_source"]) == ("measured now", "cached")
    assert second["peak_flops_per_s"] == first["peak_flops_per_s"] > 0
    assert second["peak_flops_measured_at"] == first["peak_flops_measured_at"]
    hw = second["peak_flops_hardware"]
    assert hw["dtype"] == "float32" and hw["torch"] == torch.__version__ and hw["threads"] == 1 and hw["device_name"]
    # other hardware (here: another dtype, another thread count) is measured anew
    flops.device_peak_flops("cpu", torch.bfloat16, cache=tmp_path)
    torch.set_num_threads(2)
    flops.device_peak_flops("cpu", torch.float32, cache=tmp_path)
    assert len(timed) == 3
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temp file left


def test_a_corrupt_cache_file_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(flops, "PEAK_SIZE", {"cpu": 128})
    first = flops.device_peak_flops("cpu", torch.float32, cache=tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    again = flops.device_peak_flops("cpu", torch.float32, cache=tmp_path)
    assert first["peak_flops_source"] == again["peak_flops_source"] == "measured now"
    assert json.loads(path.read_text())["peak_flops_per_s"] == again["peak_flops_per_s"]


CONCURRENT = """
import sys, time, torch
from harness.measure import flops
real = flops.measure_peak_flops
def slow(*a, **k):
    time.sleep(1.5)  # long enough that the other process asks while this one measures
    return real("cpu", torch.float32, size=128, reps=2)
flops.measure_peak_flops = slow
print(flops.device_peak_flops("cpu", torch.float32, cache=sys.argv[1])["peak_flops_source"])
"""


def test_two_jobs_at_once_time_the_matmul_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(tmp_path)],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(o[0].strip() for o in outs) == ["cached", "measured now"]


@pytest.mark.slow
def test_two_runs_reuse_one_peak_and_project_with_the_real_rate(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PEFT_HARNESS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    # seq_len 512: the demo's examples (byte tokens on tiny-random) are shorter, so padded
    proc = harness_run(
        "-m",
        "method=lora,full",
        *TINY,
        "train.seq_len=512",
        f"results_dir={results}",
        "projected_tokens=1000000",
        "eval.latency.enabled=false",
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_method = {r["method"]: r["metrics"] for r in records.load_records(results)}
    lora, full = by_method["lora"], by_method["full"]
    assert sorted((lora["peak_flops_source"], full["peak_flops_source"])) == ["cached", "measured now"]
    assert lora["peak_flops_per_s"] == full["peak_flops_per_s"]
    assert lora["peak_flops_measured_at"] == full["peak_flops_measured_at"]
    assert len(list((cache / "peak-flops").glob("*.json"))) == 1
    for m in (lora, full):
        assert m["train_tokens"] == 5 * 2 * 512  # padded positions: the same for every arm
        assert 0 < m["train_tokens_real"] < m["train_tokens"]
        assert m["real_tokens_per_s"] < m["tokens_per_s"]
        # projected at the real rate, for the cores used (one torch thread)
        assert m["projected_wall_h"] == pytest.approx(1e6 / m["real_tokens_per_s"] / 3600)
        assert (m["priced_unit"], m["priced_units"]) == ("cpu core", 1)
        assert m["projected_cost_usd"] == pytest.approx(m["projected_wall_h"] * m["price_per_core_hour_usd"])
        assert m["cost_usd"] == pytest.approx(m["train_wall_excl_probe_s"] / 3600 * m["price_per_core_hour_usd"])
        # MFU stays on the padded positions: every position costs FLOPs
        assert m["mfu"] == pytest.approx(m["flops_per_token"] * m["tokens_per_s"] / m["peak_flops_per_s"])
        assert m["datasheet_peak_flops_per_s"] is None and m["mfu_datasheet"] is None  # no datasheet for a CPU


def test_bf16_autocast_trains_on_a_cpu(tmp_path, monkeypatch, capsys):
    """train.precision=bf16 without a GPU trains under CPU bf16 autocast (transformers refused it
    before the harness told it this is a CPU run), and warns where the CPU would emulate bf16."""
    train = {**TRAIN, "precision": "bf16"}
    monkeypatch.setattr("harness.train.cpu_has_native_bf16", lambda: False)
    args = training_arguments(train, 1e-3, 0, output_dir=str(tmp_path))
    assert args.bf16 and args.device.type == "cpu"
    assert "without native bf16" in capsys.readouterr().out
    tok = byte_tokenizer()
    features, _ = training_features([to_example({"prompt": "Q: two plus two?", "completion": " four"}, "test")] * 8, tok, train)
    seen = []
    model = tiny_model()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    trainer = build_trainer(model, tok, features, train, 1e-3, 0, args=args)
    trainer.train()
    assert trainer.state.global_step == 3 and set(seen) == {torch.bfloat16}


def test_the_trainers_scratch_folder_is_removed(tmp_path):
    """Without an output_dir the Trainer gets a temporary folder, removed with its arguments (it
    was left in /tmp by every run before)."""
    import gc

    args = training_arguments(TRAIN, 1e-3, 0)
    scratch = Path(args.output_dir)
    assert scratch.is_dir() and scratch.name.startswith("harness-train-")
    del args
    gc.collect()
    assert not scratch.exists()
    (tmp_path / "mine").mkdir()
    mine = training_arguments(TRAIN, 1e-3, 0, output_dir=str(tmp_path / "mine"))
    del mine
    gc.collect()
    assert (tmp_path / "mine").is_dir()  # a folder the caller gave is never removed


def test_schedule_kwargs_and_clipping_reach_the_trainer(tmp_path):
    """``train.lr_scheduler_kwargs`` and ``train.max_grad_norm`` are the Trainer's: a
    warmup-stable-decay schedule holds the rate, then decays it over its last ``num_decay_steps``."""
    cfg = {**TRAIN, "max_steps": 6, "grad_accum": 1, "lr_scheduler": "warmup_stable_decay",
           "lr_scheduler_kwargs": {"num_decay_steps": 3}, "max_grad_norm": 0.3}
    args = training_arguments(cfg, 1e-3, 0, output_dir=str(tmp_path))
    assert args.max_grad_norm == 0.3
    tok = byte_tokenizer()
    features, _ = training_features([to_example({"prompt": "Q: two plus two?", "completion": " four"}, "test")] * 12, tok, cfg)
    trainer = build_trainer(tiny_model(), tok, features, cfg, 1e-3, 0, args=args)
    trainer.train()
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    # the rates of steps 0-5: held for 3 + 1 (the decay's first step is at the full rate), then falling
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 2.5e-4]), rates
