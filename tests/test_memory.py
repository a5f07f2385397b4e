"""Memory figures say which measure they are: absolute peaks and growth (CPU RSS, CUDA allocated),
the optimizer freed before evaluation, and ``model.dtype`` resolved in one place for harness-run
and harness-estimate."""

from __future__ import annotations

import gc
import json
import time
import weakref
from pathlib import Path

import pytest
import torch

from harness import estimate
from harness.data.shapes import to_example
from harness.measure import memory
from harness.models import ModelSourceError, model_dtype, resolve_dtype
from tests.conftest import TINY, harness_run
from tests.test_measure import HoldTensor, MiB, tiny_model, train

pytestmark = pytest.mark.usefixtures("one_thread")


def records(results: Path) -> dict[str, dict]:
    return {r["method"]: r for r in (json.loads(p.read_text()) for p in results.glob("*.json"))}


# -- the CPU peak: absolute, growth, measure named -------------------------------------------------


class HeldBeforeTraining:
    """A tensor allocated (and touched) before training starts, alive through it: the weights of a
    model loaded before training are such memory."""

    def __init__(self, nbytes: int):
        self.t = torch.ones(nbytes // 4)


def test_cpu_peak_is_absolute_and_counts_memory_held_before_training():
    """Memory alive before train begin (loaded weights) is in ``peak_memory_bytes`` but not in the
    growth; the old figure, RSS growth, left it out."""
    train(tiny_model(), steps=3, breakdown_step=None)  # warm-up run: lazy init happens once per process
    without = train(tiny_model(), steps=3, breakdown_step=None)
    held = HeldBeforeTraining(64 * MiB)
    with_held = train(tiny_model(), steps=3, breakdown_step=None)
    del held
    assert without["memory_measure"] == with_held["memory_measure"] == "CPU RSS"
    assert 0.75 * 64 * MiB <= with_held["peak_memory_bytes"] - without["peak_memory_bytes"] <= 1.5 * 64 * MiB
    assert abs(with_held["peak_memory_growth_bytes"] - without["peak_memory_growth_bytes"]) < 16 * MiB
    for m in (without, with_held):
        assert m["peak_memory_bytes"] > m["peak_memory_growth_bytes"] > 0
        assert m["peak_memory_reserved_bytes"] is None


def test_cpu_growth_shows_a_tensor_allocated_during_training():
    train(tiny_model(), steps=3, breakdown_step=None)
    without = train(tiny_model(), steps=3, breakdown_step=None)["peak_memory_growth_bytes"]
    with_extra = train(tiny_model(), steps=3, breakdown_step=None,
                       extra=[HoldTensor(64 * MiB)])["peak_memory_growth_bytes"]
    assert 0.75 * 64 * MiB <= with_extra - without <= 1.5 * 64 * MiB


def test_phase_start_returns_freed_heap_to_the_os():
    """Blocks freed before a phase must not count in its RSS: glibc keeps small freed blocks in
    its heap, and ``release_free_memory`` (malloc_trim) gives them back."""
    if memory._MALLOC_TRIM is None:
        pytest.skip("not glibc")
    # many blocks under glibc's mmap threshold: they come from the heap and stay there when freed
    # (whether free() already returned some depends on the allocator's state in this process, so
    # the phase's baseline is compared with the RSS before they were allocated)
    gc.collect()
    start = memory._rss()
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 64 KiB each, 256 MiB
    del blocks
    gc.collect()
    phase = memory.PhasePeak("cpu").start()
    after = phase.baseline
    phase.stop()
    assert after - start < 64 * MiB, (start / MiB, after / MiB)


def test_eval_peak_is_absolute_with_its_growth():
    with memory.eval_peak_memory("cpu") as out:
        start = memory._rss()
        t = torch.ones(64 * MiB // 4)
        time.sleep(3 * memory.RSS_INTERVAL_S)
        del t
    assert 56 * MiB <= out["eval_peak_memory_growth_bytes"] <= 96 * MiB
    assert out["eval_peak_memory_bytes"] >= start + 56 * MiB


def test_measure_names():
    assert memory.memory_measure("cpu") == "CPU RSS"
    assert memory.memory_measure(torch.device("cuda", 0)) == "CUDA allocated"


# -- the optimizer is gone before evaluation --------------------------------------------------------


def test_release_optimizer_frees_adam_state_and_gradients():
    from harness.models import byte_tokenizer
    from harness.train import build_trainer, release_optimizer, training_arguments, training_features

    model = tiny_model()
    examples = [to_example({"prompt": f"question {i}?", "completion": f" answer {i}"}, "test") for i in range(8)]
    train_cfg = {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "seq_len": 32, "lr_scheduler": "constant",
                 "warmup_steps": 0, "weight_decay": 0.0, "optim": "adamw_torch", "precision": "fp32",
                 "gradient_checkpointing": False, "logging_steps": 1}
    features, _ = training_features(examples, byte_tokenizer(), train_cfg)
    trainer = build_trainer(model, byte_tokenizer(), features, train_cfg, 1e-3, 0,
                            args=training_arguments(train_cfg, 1e-3, 0))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = [weakref.ref(v) for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert len(state) >= 2 * sum(1 for p in model.parameters())  # AdamW's two moments per weight
    optimizer = weakref.ref(inner)
    del inner
    release_optimizer(trainer)
    gc.collect()
    assert optimizer() is None
    assert all(ref() is None for ref in state)
    assert all(p.grad is None for p in model.parameters())


def test_run_evaluates_with_no_optimizer_alive(monkeypatch, tmp_path):
    """In harness-run's own job (job.execute), evaluation starts with no optimizer state alive."""
    from conftest import planned

    from harness import job as run

    seen = []
    evaluate_all = run.evaluate_all

    def spy(model, tokenizer, cfg, heldout):
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]
        seen.append(sum(len(o.state) for o in alive))
        return evaluate_all(model, tokenizer, cfg, heldout)

    monkeypatch.setattr(run, "evaluate_all", spy)
    job = planned(*TINY, "method=full", "eval.on_random_weights=true", "eval.latency.enabled=false",
                  f"results_dir={tmp_path}")
    record = run.execute(job)
    assert record["status"] == "ok", record["error"]
    assert seen == [0, 0]  # base model, then the trained arm: no optimizer holds state


# -- model.dtype ----------------------------------------------------------------------------------

LORA = {"name": "lora"}
QLORA = {"name": "qlora", "quantize": "nf4", "compute_dtype": "bfloat16"}


@pytest.mark.parametrize("wanted,method,device,bf16,expected", [
    ("auto", LORA, "cuda", True, "bfloat16"),        # frozen base in bf16 on a GPU that has it
    ("auto", QLORA, "cuda", True, "bfloat16"),
    ("auto", {"name": "base"}, "cuda", True, "bfloat16"),  # the base-model evaluation: a frozen base too
    ("auto", {"name": "full"}, "cuda", True, "float32"),  # fp32 master weights
    ("auto", LORA, "cuda", False, "float32"),        # a GPU without bf16 (V100)
    ("auto", LORA, "cpu", False, "float32"),
    ("auto", LORA, "cpu", True, "float32"),
    ("bf16", LORA, "cpu", False, "bfloat16"),        # explicit values win
    ("fp16", {"name": "full"}, "cuda", True, "float16"),
    ("float32", LORA, "cuda", True, "float32"),
    (None, LORA, "cuda", True, "bfloat16"),          # a model config without the key: auto
])
def test_resolve_dtype(wanted, method, device, bf16, expected):
    assert resolve_dtype(wanted, method, device, bf16) == expected


def test_resolve_dtype_sharded_qlora_loads_in_its_compute_dtype():
    assert resolve_dtype("auto", {**QLORA, "compute_dtype": "float16"}, "cuda", True, sharded=True) == "float16"
    assert resolve_dtype("auto", {**QLORA, "compute_dtype": "float16"}, "cuda", True) == "bfloat16"


def fake_gpu(monkeypatch, major: int) -> None:
    """A CUDA device of compute capability ``major`` on which bf16 tensors can be made (emulated
    below 8.0, as on a V100 or T4); torch's own is_bf16_supported reads it."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(
        major=major, minor=0, name="Tesla V100-SXM2-16GB" if major < 8 else "NVIDIA A100-SXM4-80GB",
        total_memory=16 * 2**30 if major < 8 else 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda *a: True)


def test_model_dtype_reads_the_device_capability(monkeypatch):
    fake_gpu(monkeypatch, 8)
    assert model_dtype({"dtype": "auto"}, LORA, "cuda") == "bfloat16"
    assert model_dtype({"dtype": "auto"}, LORA, "cpu") == "float32"
    fake_gpu(monkeypatch, 7)
    assert model_dtype({"dtype": "auto"}, LORA, torch.device("cuda", 0)) == "float32"


def test_precision_fp32_keeps_a_frozen_base_in_fp32_in_the_run_and_the_estimate(monkeypatch):
    """train.precision=fp32 on a GPU with bf16: model.dtype=auto loads every arm and the base in
    fp32, as the records say (it loaded a bf16 base before, and MFU divided bf16 work by the fp32 peak)."""
    fake_gpu(monkeypatch, 8)
    assert model_dtype({"dtype": "auto"}, LORA, "cuda", precision="fp32") == "float32"
    assert model_dtype({"dtype": "auto"}, {"name": "base"}, "cuda", precision="fp32") == "float32"
    assert model_dtype({"dtype": "auto"}, LORA, "cuda", precision="auto") == "bfloat16"
    assert model_dtype({"dtype": "bf16"}, LORA, "cuda", precision="fp32") == "bfloat16"  # asked for: as given
    s = estimate.setup_of(estimate.resolved(estimate.compose(["method=lora", "hardware=auto", "train.precision=fp32"])))
    assert s.model_dtype == "float32" and s.regime == "fp32"


def test_every_arm_and_the_base_evaluate_and_serve_in_one_stated_precision(tmp_path):
    """Under bf16 training the evaluations, the latency probe and the variants run under bf16
    autocast, the base model's too, and the records say so; fp32 training leaves the weights' dtype."""
    from conftest import planned

    from harness import job, records
    from harness.measure import serving

    seen = []
    real = serving._measure

    def spy(model, inputs, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(model, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving, "_measure", spy)
        rec = job.execute(planned(*TINY, "method=lora", "train.precision=bf16", "eval.on_random_weights=true",
                                  f"results_dir={tmp_path}"))
    assert rec["status"] == "ok", rec["error"]
    base = records.find_ok(tmp_path, rec["base_run_id"])
    assert rec["metrics"]["eval_precision"] == base["metrics"]["eval_precision"] == "bf16 autocast"
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)  # latency and variants alike
    fp32 = job.execute(planned(*TINY, "method=lora", "train.precision=fp32", "eval.on_random_weights=true",
                               "eval.latency.enabled=false", "eval.variants.enabled=false", f"results_dir={tmp_path}"))
    assert fp32["metrics"]["eval_precision"] == "weights dtype"


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_emulated_bf16_counts_as_no_bf16(monkeypatch, major, native):
    """A V100/T4 (7.x) can make bf16 tensors, emulated: every auto choice is fp32 there."""
    from harness.measure.environment import gpu_has_native_bf16
    from harness.methods import compute_dtype
    from harness.train import use_bf16

    fake_gpu(monkeypatch, major)
    assert torch.cuda.is_bf16_supported() is True  # torch's default counts emulation
    assert gpu_has_native_bf16() is native
    assert use_bf16("auto") is native
    assert compute_dtype({"compute_dtype": "auto"}) == ("bfloat16" if native else "float32")
    assert model_dtype({"dtype": "auto"}, LORA, "cuda") == ("bfloat16" if native else "float32")
    s = estimate.setup_of(estimate.resolved(estimate.compose(["method=lora", "hardware=auto"])))
    assert s.gpu is True and s.model_dtype == ("bfloat16" if native else "float32")
    assert s.regime == ("bf16" if native else "fp32")


def test_resolve_dtype_rejects_unknown_values():
    with pytest.raises(ModelSourceError, match="model.dtype='fp8'"):
        resolve_dtype("fp8", LORA, "cpu", False)


def test_bad_model_dtype_is_a_usage_error(tmp_path):
    proc = harness_run(*TINY, "model.dtype=fp8", f"results_dir={tmp_path}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "model.dtype='fp8'" in errors[0], proc.stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_run_loads_and_records_the_model_dtype(tmp_path):
    """model.dtype=bf16 loads the frozen base in bf16 (peft keeps the adapter in fp32), and the
    record says so; the default on a CPU is fp32. The memory fields name their measure."""
    proc = harness_run("-m", *TINY, "method=lora", "model.dtype=auto,bf16", "eval.latency.enabled=false",
                       f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    by_dtype = {r["config"]["model"]["dtype"]: r["metrics"] for r in recs}
    assert by_dtype["auto"]["model_dtype"] == "float32"
    assert by_dtype["bf16"]["model_dtype"] == "bfloat16"
    parts = {d: m["memory_breakdown_bytes"]["parameters"] for d, m in by_dtype.items()}
    frozen = by_dtype["auto"]["total_params"] - by_dtype["auto"]["trainable_params"]
    assert parts["auto"] - parts["bf16"] == 2 * frozen  # 2 bytes a frozen weight instead of 4; adapter fp32
    # the checkpoint one would serve is in the weights' dtype, and the adapter is compared in it
    assert by_dtype["auto"]["serving_dtype"] == "float32" and by_dtype["bf16"]["serving_dtype"] == "bfloat16"
    assert by_dtype["auto"]["full_checkpoint_bytes"] == 2 * by_dtype["bf16"]["full_checkpoint_bytes"]
    for m in by_dtype.values():
        assert m["memory_measure"] == "CPU RSS" and m["memory_device"] == "cpu"
        assert m["peak_memory_bytes"] > m["peak_memory_growth_bytes"] >= 0
        assert m["peak_memory_bytes"] > m["memory_breakdown_peak_bytes"]  # the process, not only tensors


def test_estimate_resolves_the_frozen_base_dtype_as_the_run_does():
    """On a GPU preset a LoRA arm's frozen base is estimated in bf16 (2 bytes a weight), full FT
    in fp32; model.dtype=fp32 puts the LoRA base back in fp32. The adapter stays fp32."""
    def est(*overrides):
        return estimate.estimate_job(estimate.resolved(estimate.compose(
            ["model=llama-3.2-1b-arch", "hardware=a100-80gb", *overrides])))

    lora, lora32, full = est("method=lora"), est("method=lora", "model.dtype=fp32"), est("method=full")
    assert (lora["model_dtype"], lora32["model_dtype"], full["model_dtype"]) == ("bfloat16", "float32", "float32")
    frozen = lora["total_params"] - lora["trainable_params"]
    assert lora32["breakdown"]["parameters"] - lora["breakdown"]["parameters"] == pytest.approx(2 * frozen, rel=1e-6)
    cpu = est("method=lora", "hardware=cpu")
    assert cpu["model_dtype"] == "float32"
    qlora = est("method=qlora")
    assert qlora["model_dtype"] == "bfloat16" and qlora["precision"] == "autocast"  # unquantized weights: fp32


def test_the_job_process_freezes_the_stacks_objects_and_still_collects_its_own_cycles():
    """harness.job.import_the_stack freezes what the imports made (each gc.collect() walked half a
    million objects before); a cycle made afterwards, holding a tensor, is still freed by the
    collect before a memory measurement."""
    import subprocess
    import sys

    script = """
import gc, weakref, torch
from harness.job import import_the_stack
from harness.measure import memory
import_the_stack()
frozen = gc.get_freeze_count()
class Node: pass
a, b = Node(), Node()
a.other, b.other, a.weights = b, a, torch.ones(1 << 20)
gone = weakref.ref(a.weights)
del a, b
memory.release_free_memory("cpu")
print(frozen, gone() is None)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frozen, freed = proc.stdout.split()[-2:]
    assert int(frozen) > 100_000 and freed == "True", proc.stdout
