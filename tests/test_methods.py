"""Each method on tiny-random: trainable counts, and which weights training changes."""

import pytest
import torch
from conftest import composed

from harness.data import load_data
from harness.measure.flops import param_counts
from harness.methods import apply_method, quantization_config
from harness.models import load_model
from harness.train import build_trainer, training_features


def method_cfg(name: str, *overrides: str) -> dict:
    return composed(f"method={name}", *overrides)["method"]


TINY = {"name": "tiny-random", "source": "config", "arch": "tiny-random"}
TRAIN = {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "seq_len": 64, "lr_scheduler": "constant",
         "warmup_steps": 0, "weight_decay": 0.0, "optim": "adamw_torch", "precision": "fp32",
         "gradient_checkpointing": False, "logging_steps": 1}
DATA = {"kind": "demo", "n_train": 8, "n_heldout": 4, "seed": 1}


def base_weights(model) -> dict[str, torch.Tensor]:
    """Copies of the base model's own weights (adapter weights left out), by their base name."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name or "ia3_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        out[key] = p.detach().float().clone() if p.dtype.is_floating_point else p.detach().clone()
    return out


def train_briefly(method: dict):
    loaded = load_model(TINY, quantization_config=quantization_config(method))
    model = apply_method(loaded.model, method)
    before = base_weights(model)
    examples = load_data(DATA).train
    features, _ = training_features(examples, loaded.tokenizer, TRAIN, DATA)
    build_trainer(model, loaded.tokenizer, features, TRAIN, float(method["learning_rate"]), seed=0).train()
    return model, before, base_weights(model)


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_adapters_train_and_leave_base_weights_unchanged(name):
    method = method_cfg(name, "method.r=4")
    model, before, after = train_briefly(method)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{name} changed base weight {key}"
    # the adapter itself did train
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_full_fine_tuning_changes_base_weights():
    model, before, after = train_briefly(method_cfg("full"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)


@pytest.mark.parametrize("name,r", [("lora", 4), ("lora", 8), ("qlora", 4), ("dora", 4)])
def test_trainable_count_matches_peft(name, r):
    method = method_cfg(name, f"method.r={r}")
    loaded = load_model(TINY, quantization_config=quantization_config(method))
    model = apply_method(loaded.model, method)
    counts = param_counts(model)
    trainable, total = counts["trainable_params"], counts["total_params"]
    # counted independently: the adapter tensors that require grad
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert trainable == adapter
    peft_trainable, peft_total = model.get_nb_trainable_parameters()
    assert (trainable, total) == (peft_trainable, peft_total)
    # LoRA on all linear layers of the tiny Llama: r * (in + out) per adapted linear
    if name in ("lora", "qlora"):
        cfg = loaded.model.config if hasattr(loaded.model, "config") else model.config
        h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
        assert trainable == layers * per_layer


def test_full_counts_every_weight():
    loaded = load_model(TINY)
    model = apply_method(loaded.model, method_cfg("full"))
    counts = param_counts(model)
    trainable, total = counts["trainable_params"], counts["total_params"]
    assert trainable == total == sum(p.numel() for p in model.parameters())


def test_other_peft_type_through_the_same_group():
    method = method_cfg("ia3")
    loaded = load_model(TINY)
    model = apply_method(loaded.model, method)
    trainable = param_counts(model)["trainable_params"]
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "ia3_" in n) > 0
