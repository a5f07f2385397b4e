"""Serving N variants (harness.measure.variants): memory per adapter, mixed batches computing what
each variant computes alone, the model left as it came, and the job's record."""

import pytest
import torch
from conftest import TINY, harness_run, planned
from peft import LoraConfig, get_peft_model
from test_preflight import one_error_line
from transformers import LlamaConfig, LlamaForCausalLM

from harness import job as run
from harness import stats
from harness.measure import serving, variants

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"enabled": True, "counts": [1, 3], "batch": 4, "reps": 4, "switch_reps": 6, "gen_tokens": 2}


def lora_model(hidden: int = 64, r: int = 8, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    # init_lora_weights=False: B random, as a trained adapter's is
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                            target_modules=["q_proj", "v_proj", "up_proj"], **kw))


PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16, 18]]


def test_each_added_adapter_grows_memory_by_its_tensor_bytes():
    # large enough adapters (1.7 MB each) that the process RSS measures them too
    model = lora_model(hidden=512, r=64)
    entries, summary = variants.measure_variants(model, None, PROMPTS, {**SETTINGS, "counts": [1, 4, 9],
                                                                        "gen_tokens": 0}, serving.footprint_metrics(model, torch.float32))
    one = summary["adapter_tensor_bytes"]
    # fp32 A (r x in) and B (out x r) of q (512 -> 512), v (512 -> 2 kv heads x 128) and up (512 -> 1024), 2 layers
    assert one == 4 * 2 * 64 * ((512 + 512) + (512 + 256) + (512 + 1024))
    for e in entries[1:]:
        assert e["adapter_growth_bytes"] == pytest.approx(one, rel=0.05)
        assert e["rss_growth_bytes"] / (e["n"] - 1) == pytest.approx(one, rel=0.05)  # what the process holds
        assert e["resident_bytes"] == summary["base_and_one_adapter_bytes"] + (e["n"] - 1) * e["adapter_growth_bytes"]
    assert entries[0]["adapter_growth_bytes"] is None and entries[0]["rss_growth_bytes"] == 0
    # N merged models: N x the exact checkpoint bytes; on disk N x the saved adapter file
    checkpoint = serving.tensor_bytes(model, torch.float32)["checkpoint"]
    assert [e["merged_bytes"] for e in entries] == [n * checkpoint for n in (1, 4, 9)]
    assert entries[2]["adapters_disk_bytes"] == 9 * serving.adapter_bytes(model)


def test_a_mixed_batch_computes_what_each_variant_computes_alone():
    model = lora_model()
    for k in (1, 2):
        variants.add_variant(model, f"v{k}", seed=k)
    model.eval()
    inputs = variants.batch_inputs(None, PROMPTS, 5, torch.device("cpu"))
    names = variants.mixed_names(3, 5)
    assert names == ["default", "v1", "v2", "default", "v1"] and inputs.shape == (5, 8)
    with torch.no_grad():
        mixed = model(input_ids=inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            model.set_adapter(name)
            alone = model(input_ids=inputs[i:i + 1]).logits[0]
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
        # the variants differ: a batch that ignored adapter_names would fail the check above
        model.set_adapter("default")
        assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_the_phase_leaves_the_model_as_it_came_and_times_every_state():
    model = lora_model()
    model.eval()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    entries, summary = variants.measure_variants(model, None, PROMPTS, SETTINGS,
                                                 serving.footprint_metrics(model, torch.float32))
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert [e["n"] for e in entries] == [1, 3] and summary["mixed_batches"] == "measured"
    for e in entries:
        for switch in ("set_adapter", "load_adapter", "hotswap_adapter"):
            s = e["switching"][switch]
            assert s["n"] == 6 and s["ci_s"][0] <= s["median_s"] <= s["ci_s"][1]
        for phase in ("prefill", "decode"):
            r = e[f"mixed_vs_merged_{phase}"]
            assert r["ci"][0] <= r["ratio"] <= r["ci"][1]
        assert e["mixed_decode_tokens_per_s"] == pytest.approx(4 / (e["mixed_decode_ms_per_token"] / 1000))


def test_an_adapter_without_mixed_batches_gets_memory_and_says_why_not_the_rest():
    from peft import IA3Config

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    model = get_peft_model(LlamaForCausalLM(cfg), IA3Config(target_modules=["k_proj", "down_proj"],
                                                            feedforward_modules=["down_proj"]))
    entries, summary = variants.measure_variants(model, None, PROMPTS, SETTINGS,
                                                 serving.footprint_metrics(model, torch.float32))
    assert "LoRA only" in summary["mixed_batches"] and "mixed_prefill_ms" not in entries[1]
    assert entries[1]["adapter_growth_bytes"] == summary["adapter_tensor_bytes"]
    assert "hotswap_adapter" not in entries[1]["switching"]


def test_median_interval_is_the_order_statistics_that_cover_95_percent():
    assert stats.median_interval([5, 1, 4, 2, 3]) == (None, None)  # 5 values cannot reach 95%
    assert stats.median_interval([6, 1, 5, 2, 4, 3]) == (1, 6)     # P(all on one side) = 2/64
    assert stats.median_interval(list(range(1, 21))) == (6, 15)    # the textbook n = 20 interval


def test_a_lora_job_records_n_variants_and_full_ft_n_checkpoints(tmp_path):
    args = [*TINY, f"results_dir={tmp_path}", "eval.on_random_weights=true"]
    rec = run.execute(planned(*args, "method=lora"))
    assert rec["status"] == "ok", rec["error"]
    m = rec["metrics"]
    assert [e["n"] for e in m["variants"]] == [1, 2] and "variants" in m["phase_wall_s"]
    assert m["variants"][1]["adapters_disk_bytes"] == 2 * m["adapter_bytes"]
    assert m["variants"][1]["mixed_vs_base_prefill"]["ratio"] > 0
    full = run.execute(planned(*args, "method=full"))["metrics"]
    assert full["variants"] == [{"n": n, "merged_bytes": n * full["full_checkpoint_bytes"],
                                 "merged_disk_bytes": n * full["full_checkpoint_bytes"]} for n in (1, 2)]


def test_a_failing_variants_phase_keeps_the_run_ok_and_says_why(tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(variants, "measure_variants", fails)
    rec = run.execute(planned(*TINY, f"results_dir={tmp_path}", "method=lora"))
    assert rec["status"] == "ok" and rec["metrics"]["skipped_measurements"]["variants"] == "failed: MemoryError: "
    assert "variants" not in rec["metrics"]


@pytest.mark.parametrize("bad,says", [
    ("eval.variants.counts=[0,8]", "eval.variants.counts=[0, 8] is invalid"),
    ("eval.variants.counts=[1,257]", "<= 256"),
    ("eval.variants.counts=[]", "give at least one count"),
    ("eval.variants.switch_reps=3", "eval.variants.switch_reps=3 is invalid"),
])
def test_counts_outside_the_allowed_range_are_one_line_and_exit_2(tmp_path, bad, says):
    proc = harness_run(*TINY, "method=lora", f"results_dir={tmp_path / 'r'}", bad)
    assert says in one_error_line(proc)
    assert not (tmp_path / "r").exists()
