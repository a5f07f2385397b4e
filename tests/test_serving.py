"""Serving footprint (exact tensor bytes against a real save_pretrained) and latency (base, merged,
dynamic interleaved; prefill apart from decode) on tiny random Llamas."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from harness.measure import serving
from harness.measure.serving import compare_latency, footprint_metrics, tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def lora(model, init_random: bool = False, **kw):
    # init_lora_weights=False makes B random, so the adapter changes the output (merge is not a no-op)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=not init_random, **kw)
    return get_peft_model(model, cfg)


def safetensors_data_bytes(folder: Path, pattern: str) -> int:
    """Tensor bytes of the safetensors files in folder: file size - 8 - the JSON header's length."""
    total = 0
    for f in Path(folder).rglob(pattern):
        with open(f, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            json.loads(fh.read(header_len))  # a well-formed header: the rest is tensor data
        total += f.stat().st_size - 8 - header_len
    assert total > 0, f"no {pattern} in {folder}"
    return total


# -- footprint ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_checkpoint_bytes_equal_what_save_pretrained_writes(tmp_path, tied, dtype):
    model = tiny_model(tied=tied)
    computed = tensor_bytes(model, dtype)
    model.to(dtype).save_pretrained(tmp_path, safe_serialization=True)
    # exact, to the byte: only the safetensors JSON header is not tensor data
    assert computed["checkpoint"] == safetensors_data_bytes(tmp_path, "model*.safetensors")
    assert computed["adapter"] is None
    if tied:  # the shared embedding is written, and counted, once
        assert computed["checkpoint"] < tensor_bytes(tiny_model(tied=False), dtype)["checkpoint"]


@pytest.mark.parametrize("kw", [{}, {"modules_to_save": ["lm_head"]}])
def test_peft_checkpoint_is_the_merged_model_and_adapter_its_own_file(tmp_path, kw):
    model = lora(tiny_model(), init_random=True, **kw)
    fp32, bf16 = tensor_bytes(model, torch.float32), tensor_bytes(model, torch.bfloat16)
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    # the adapter as trained (fp32), including a modules_to_save copy
    assert fp32["adapter"] == safetensors_data_bytes(tmp_path / "adapter", "adapter_model*.safetensors")
    assert bf16["adapter"] * 2 == fp32["adapter"]
    model.merge_and_unload().to(torch.bfloat16).save_pretrained(tmp_path / "merged", safe_serialization=True)
    assert bf16["checkpoint"] == safetensors_data_bytes(tmp_path / "merged", "model*.safetensors")
    assert bf16["checkpoint"] == tensor_bytes(tiny_model(), torch.bfloat16)["checkpoint"]


def test_footprint_compares_adapter_and_checkpoint_in_the_serving_dtype():
    model = lora(tiny_model())
    m = footprint_metrics(model, torch.bfloat16)
    assert m["serving_dtype"] == "bfloat16"
    assert m["full_checkpoint_bytes_estimated"] is False  # exact, not parameters x an assumed dtype
    assert m["full_checkpoint_bytes"] == tensor_bytes(tiny_model(), torch.bfloat16)["checkpoint"]
    # the file on disk holds the fp32 adapter; its share is taken at the serving dtype
    assert m["adapter_serving_bytes"] * 2 < m["adapter_bytes"]
    assert m["adapter_serving_bytes"] == tensor_bytes(model, torch.float32)["adapter"] // 2
    full = footprint_metrics(tiny_model(), torch.float32)
    assert full["adapter_bytes"] is None and full["adapter_serving_bytes"] is None
    assert full["serving_dtype"] == "float32"


def test_sharded_parameters_count_at_their_whole_size():
    zero3 = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 partition: empty here, ds_numel in all
    zero3.ds_numel = 1000
    assert serving._serving_bytes(zero3, torch.bfloat16) == 2000
    model = tiny_model()
    model.lm_head.weight._is_flat_param = True  # FSDP1: shapes unknown on a rank, so no figure
    assert tensor_bytes(model, torch.float32) == {"checkpoint": None, "adapter": None}


# -- latency --------------------------------------------------------------------------------------


def variant_of(model) -> str:
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    return "merged" if layer.merged else "base" if layer.disable_adapters else "dynamic"


def test_variants_are_interleaved_so_a_slow_spell_cancels(monkeypatch):
    """A machine that slows down 2x halfway through: interleaved, paired repetitions still read the
    merged adapter at the base's speed and the dynamic one at its true +10%. Measured one block
    after another (the old probe), merged would read ~2x the base."""
    model = lora(tiny_model(), init_random=True)
    clock = {"calls": 0}
    seen = []

    def fake_measure(m, inputs, new_tokens, pad):
        clock["calls"] += 1
        slow = 2.0 if clock["calls"] > 3 + 3 * 5 else 1.0  # 3 warm-up calls, then reps 0-4 fast
        variant = variant_of(m)
        seen.append(variant)
        dynamic = variant == "dynamic"
        return 0.010 * slow * (1.1 if dynamic else 1.0), 0.002 * slow * (1.2 if dynamic else 1.0)

    monkeypatch.setattr(serving, "_measure", fake_measure)
    m = compare_latency(model, None, [[1, 2, 3]], reps=10, new_tokens=4)
    assert len(seen) == 3 + 3 * 10
    assert sorted(seen[3:6]) == ["base", "dynamic", "merged"]  # every rep measures every variant
    assert seen[3:6] != seen[6:9]  # in a rotating order
    assert m["latency_prefill_merged_overhead"] == pytest.approx(0.0, abs=1e-9)
    assert m["latency_decode_merged_overhead"] == pytest.approx(0.0, abs=1e-9)
    assert m["latency_prefill_dynamic_overhead"] == pytest.approx(0.10)
    assert m["latency_decode_dynamic_overhead"] == pytest.approx(0.20)
    assert m["latency_prefill_base_ms"] == pytest.approx(15.0)  # median of 5 fast and 5 slow reps
    assert m["latency_reps"] == 10 and m["latency_new_tokens"] == 4


def test_the_first_call_after_a_merge_is_not_timed(monkeypatch):
    """A backend whose first forward after the weights change is 2x slow (bitsandbytes re-packs
    merged 4-bit weights on a CPU): merged reads at the base's speed, not ~+100% (the old probe
    timed that first call), and the merge state changes once per repetition, not twice."""
    model = lora(tiny_model(), init_random=True)
    state = {"fresh": False, "changes": 0}
    for name in ("merge_adapter", "unmerge_adapter"):
        real = getattr(model.base_model, name)

        def changed(real=real):
            state.update(fresh=True, changes=state["changes"] + 1)
            real()

        monkeypatch.setattr(model.base_model, name, changed)
    # any forward of the model itself (the fake _measure below runs none) pays the one-off cost
    model.register_forward_pre_hook(lambda *_: state.update(fresh=False))

    def fake_measure(m, inputs, new_tokens, pad):
        slow = 2.0 if state["fresh"] else 1.0
        state["fresh"] = False
        return 0.010 * slow, 0.002

    monkeypatch.setattr(serving, "_measure", fake_measure)
    m = compare_latency(model, None, [[1, 2, 3]], reps=10, new_tokens=4)
    assert m["latency_prefill_merged_overhead"] == pytest.approx(0.0, abs=1e-9)
    assert m["latency_prefill_dynamic_overhead"] == pytest.approx(0.0, abs=1e-9)
    assert state["changes"] == 2 + 10  # warm-up merge and unmerge, then one per repetition
    assert [serving.rep_order(r, "bdm") for r in range(3)] == [tuple("bdm"), tuple("mdb"), tuple("bdm")]


def test_real_probe_restores_the_model_and_reports_intervals(monkeypatch):
    model = lora(tiny_model(), init_random=True)
    ids = torch.tensor([list(range(1, 9))])
    model.train()
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    calls = []
    merge, unmerge = model.base_model.merge_adapter, model.base_model.unmerge_adapter
    monkeypatch.setattr(model.base_model, "merge_adapter", lambda: (calls.append("merge"), merge()))
    monkeypatch.setattr(model.base_model, "unmerge_adapter", lambda: (calls.append("unmerge"), unmerge()))
    stamps = []

    class Stamps(serving._Stamps):
        def __init__(self, device):
            super().__init__(device)
            stamps.append(self)

    monkeypatch.setattr(serving, "_Stamps", Stamps)
    m = compare_latency(model, None, [list(range(1, 9)), list(range(50, 62))], reps=4, new_tokens=3)
    # warm-up, then one change of the merge state per rep (merge in reps 0 and 2), always undone
    assert calls.count("merge") == calls.count("unmerge") == 1 + 2
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before)  # unmerged and adapter enabled again
    assert model.training  # train mode restored after the eval-mode probe
    # decode: the first token's logits come from the prompt's forward, 3 decode steps follow
    assert stamps and all(len(s.times) == 3 + 1 for s in stamps)
    for phase, unit in (("prefill", "ms"), ("decode", "ms_per_token")):
        for variant in ("base", "merged", "dynamic"):
            assert m[f"latency_{phase}_{variant}_{unit}"] > 0
        for variant in ("merged", "dynamic"):
            key = f"latency_{phase}_{variant}_overhead"
            assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]


def test_full_model_is_its_own_base_and_decode_can_be_skipped():
    m = compare_latency(tiny_model(), None, [list(range(1, 9))], reps=2, new_tokens=0)
    assert m["latency_prefill_base_ms"] == m["latency_prefill_merged_ms"] == m["latency_prefill_dynamic_ms"] > 0
    for variant in ("merged", "dynamic"):
        key = f"latency_prefill_{variant}_overhead"
        assert m[key] == m[f"{key}_ci_low"] == m[f"{key}_ci_high"] == 0.0
        assert m[f"latency_decode_{variant}_overhead"] is None  # new_tokens=0: no decoding timed
    assert m["latency_decode_base_ms_per_token"] is None


def test_a_qlora_merge_cycle_restores_the_4bit_base_exactly():
    """peft's unmerge of a 4-bit layer re-quantizes W + dW - dW, which drifts from the original
    packed weights; the probe's unmerge puts the packed weights back, bit for bit."""
    from conftest import composed

    from harness.methods import apply_method, normalize, quantization_config
    from harness.models import load_model

    method = normalize(composed("method=qlora")["method"])
    model = apply_method(load_model(composed("model=tiny-random")["model"],
                                    quantization_config=quantization_config(method)).model, method)
    for layer in model.modules():  # a nonzero adapter: the merge changes the weights
        if isinstance(getattr(layer, "lora_B", None), torch.nn.ModuleDict):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    ids = torch.tensor([list(range(1, 9))])
    model.eval()
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    # after a forward: bitsandbytes' CPU kernel re-packs the 4-bit weights on their first call
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert packed
    variants = serving._Variants(model)
    merged = []
    for _ in range(2):
        variants.set("merged")
        with torch.inference_mode():
            merged.append(model(input_ids=ids).logits)
        variants.set("dynamic")
    assert not torch.equal(merged[0], before)  # merged for real
    torch.testing.assert_close(merged[1], merged[0], rtol=0, atol=0)  # the second merge is the first's weights
    for name, p in model.named_parameters():
        if name in packed:
            assert torch.equal(p, packed[name]), name
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
