"""Measurement probes on a tiny random Llama (no downloads): memory, breakdown, time, FLOPs (cost:
test_pricing.py; tokens, matmul peak and MFU: test_throughput.py; footprint, latency: test_serving.py)."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from harness.measure.callback import MeasureCallback
from harness.measure.flops import embedding_params, flops_per_token, param_counts
from harness.measure.memory import CATEGORIES, MemoryBreakdown

CONF = Path(__file__).resolve().parents[1] / "conf"
SEQ = 32
MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


def lora(model, init_random: bool = False):
    # init_lora_weights=False makes B random, so the adapter changes the output (merge is not a no-op)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=not init_random)
    return get_peft_model(model, cfg)


def random_tokens(n: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (n, SEQ), generator=g).tolist()
    return Dataset.from_list([{"input_ids": x, "labels": x} for x in ids])


class HoldTensor(TrainerCallback):
    """Allocates (and touches) ``nbytes`` at train begin and keeps it alive until train end."""

    def __init__(self, nbytes: int):
        self.nbytes, self.t = nbytes, None

    def on_train_begin(self, *args, **kwargs):
        self.t = torch.ones(self.nbytes // 4)  # ones, not empty: the pages must be resident

    def on_train_end(self, *args, **kwargs):
        self.t = None


def train(model, steps: int = 5, batch: int = 4, extra: list | None = None, **cb_kwargs) -> dict:
    cb = MeasureCallback(**cb_kwargs)
    with tempfile.TemporaryDirectory(prefix="test-measure-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
        )
        Trainer(model=model, args=args, train_dataset=random_tokens(), callbacks=[cb, *(extra or [])]).train()
    return cb.metrics(train_tokens=steps * batch * SEQ)


def param_bytes(model, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_trainer_run_records_time_memory_and_breakdown_that_adds_up(method):
    model = tiny_model() if method == "full" else lora(tiny_model())
    steps = 5
    m = train(model, steps=steps, warmup_steps=2)

    assert m["memory_device"] == "cpu"
    assert m["peak_memory_bytes"] is not None and m["peak_memory_bytes"] >= 0
    assert m["peak_memory_reserved_bytes"] is None  # CUDA only

    parts, peak = m["memory_breakdown_bytes"], m["memory_breakdown_peak_bytes"]
    assert set(parts) == set(CATEGORIES)
    assert abs(sum(parts.values()) - peak) <= 0.05 * peak
    # independent checks of the categories (step 2: the optimizer state exists since step 0)
    assert parts["parameters"] == param_bytes(model)
    trainable = param_bytes(model, trainable_only=True)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert 2 * trainable <= parts["optimizer_state"] <= 2 * trainable + 8 * n_trainable  # AdamW: 2 moments + step
    assert parts["activations"] > 0
    assert m["memory_breakdown_step"] == 2

    # the probe step is left out of the step times; the median skips the warm-up steps
    assert len(m["step_times_s"]) == steps - 1
    assert all(t > 0 for t in m["step_times_s"])
    # steps 0, 1 are warm-up and step 2 the probe: the median is over steps 3 and 4
    assert m["step_time_median_s"] == pytest.approx(statistics.median(m["step_times_s"][2:]))
    assert 0 < m["train_wall_excl_probe_s"] <= m["train_wall_s"]
    assert sum(m["step_times_s"]) < m["train_wall_s"]
    assert m["tokens_per_s"] == pytest.approx(m["train_tokens"] / m["train_wall_excl_probe_s"])
    assert [s for s, _ in m["loss_curve"]] == list(range(1, steps + 1))
    assert all(4.0 < loss < 8.0 for _, loss in m["loss_curve"])  # ~ln(300) = 5.7 on random tokens


def test_run_shorter_than_warmup_tracks_its_last_step():
    m = train(tiny_model(), steps=2, warmup_steps=2)
    assert m["memory_breakdown_step"] == 1
    assert len(m["step_times_s"]) == 1  # step 0; step 1 was the probe
    assert m["step_time_median_s"] is None  # no step after warm-up
    assert m["tokens_per_s"] > 0 and m["memory_breakdown_peak_bytes"] > 0


def test_breakdown_labels_gradients_and_optimizer_state_in_a_manual_step():
    model = lora(tiny_model())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 300, (2, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()  # warm step: creates grads and optimizer state
    opt.step()
    opt.zero_grad(set_to_none=True)

    tracker = MemoryBreakdown(model, opt).start()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads_after_backward = tracker.totals["gradients"]
    opt.step()
    out = tracker.stop()

    trainable = param_bytes(model, trainable_only=True)
    assert grads_after_backward == trainable  # every trainable param's .grad, counted once
    parts = out["memory_breakdown_bytes"]
    assert parts["parameters"] == param_bytes(model)
    assert 2 * trainable <= parts["optimizer_state"] <= 2 * trainable + 64 * 8
    assert sum(parts.values()) == out["memory_breakdown_peak_bytes"]
    # tracking is over: later ops are not counted
    before = dict(tracker.totals)
    model(input_ids=ids)
    assert tracker.totals == before


def test_breakdown_counts_4bit_quantization_state_as_parameters(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny_model().save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = lora(LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 300, (2, 16))
    for step in range(2):
        tracker = MemoryBreakdown(model, opt).start() if step == 1 else None
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tracker.stop()
    parts = out["memory_breakdown_bytes"]
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert parts["parameters"] > sum(storages.values())  # + absmax / quant map of the 4-bit weights
    trainable = param_bytes(model, trainable_only=True)
    assert 2 * trainable <= parts["optimizer_state"] <= 2 * trainable + 64 * 8
    assert sum(parts.values()) == out["memory_breakdown_peak_bytes"]


class FailAtStep(TrainerCallback):
    """Raises inside the optimizer step ``step`` (like an OOM would)."""

    def __init__(self, step: int):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated out of memory")


def test_close_after_a_failure_in_the_probe_step_stops_tracking(tmp_path):
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    cb = MeasureCallback(warmup_steps=1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=random_tokens(), callbacks=[cb, FailAtStep(1)])
    with pytest.raises(RuntimeError, match="simulated"):
        try:
            trainer.train()
        finally:
            assert isinstance(_get_current_dispatch_mode(), MemoryBreakdown)  # stuck without close()
            cb.close()
    assert _get_current_dispatch_mode() is None
    m = cb.metrics()
    assert m["memory_breakdown_peak_bytes"] > 0 and m["peak_memory_bytes"] is not None
    assert m["train_wall_s"] > 0
    cb.close()  # idempotent


# the CPU peak (absolute, growth) and the eval peak: tests/test_memory.py


# -- params, FLOPs -------------------------------------------------------------------------------


def test_param_counts_full_and_lora():
    full = param_counts(tiny_model())
    assert full["trainable_params"] == full["total_params"] > 0
    assert full["trainable_share"] == 1.0
    peft_model = lora(tiny_model())
    counts = param_counts(peft_model)
    # q_proj and v_proj (64x64) in 2 layers get A (8x64) and B (64x8)
    assert counts["trainable_params"] == 2 * 2 * (8 * 64 + 64 * 8)
    assert counts["total_params"] == full["total_params"] + counts["trainable_params"]
    assert counts["trainable_share"] == pytest.approx(counts["trainable_params"] / counts["total_params"])


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_4bit_weights_count_their_true_size_whatever_the_storage(tmp_path, storage):
    """A real bitsandbytes Params4bit packs two 4-bit values per byte of quant_storage: 4 per
    bf16 element. The count is the unquantized model's, as peft's own."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from harness.models import count_params

    base = tiny_model()
    base.save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_quant_storage=storage)
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu")
    packed = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    assert packed and all(p.dtype == storage for p in packed)
    assert count_params(model) == count_params(base) == sum(p.numel() for p in base.parameters())
    assert param_counts(model)["total_params"] == count_params(base)
    assert param_counts(lora(model))["total_params"] == param_counts(lora(base))["total_params"]


def test_a_zero3_partitioned_parameter_counts_its_whole_size():
    """ZeRO-3 leaves each rank an empty tensor and the whole size in ds_numel (DeepSpeed's
    partition_parameters); the count is the model's, not ~0."""
    from harness.models import count_params

    model = tiny_model()
    whole = count_params(model)
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    assert count_params(model) == whole
    assert param_counts(model)["total_params"] == whole


def test_flops_per_token_formulas():
    n, n_adapter = 1_000_000, 10_000
    assert flops_per_token("full", n, n) == 6 * n
    assert flops_per_token("lora", n, n_adapter) == 4 * n + 2 * n_adapter
    assert flops_per_token("qlora", n, n_adapter) == 4 * n + 2 * n_adapter
    # an embedding lookup costs nothing: its parameters leave N (and N_t for full FT)
    assert flops_per_token("full", n, n, embedding_params=200_000) == 6 * 800_000
    # attention scores add 12 * layers * seq * hidden for every method
    assert flops_per_token("lora", n, n_adapter, n_layers=2, seq_len=32, hidden_size=64) == (
        4 * n + 2 * n_adapter + 12 * 2 * 32 * 64
    )
    with pytest.raises(ValueError, match="base"):
        flops_per_token("base", n, 0)
    with pytest.raises(ValueError, match="trainable_params"):
        flops_per_token("lora", n, n + 1)


def test_embedding_params_untied_and_tied():
    model = tiny_model()
    assert embedding_params(model) == 300 * 64
    tied = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=300,
            tie_word_embeddings=True,
        )
    )
    assert embedding_params(tied) == 0
