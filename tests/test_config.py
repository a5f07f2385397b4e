"""Config composition through Hydra's compose API, and job planning (hashes, run ids)."""

import pytest
from conftest import composed

from harness.config import CONF_DIR, UsageError
from harness.plan import plan


@pytest.mark.parametrize("group", ["model", "method", "data", "train", "eval", "hardware", "distributed", "experiment"])
def test_every_group_exists(group):
    assert list((CONF_DIR / group).glob("*.yaml")), f"conf/{group}/ has no options"


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora", "rslora", "ia3"])
def test_each_method_composes_with_its_own_learning_rate(method):
    cfg = composed(f"method={method}", "model=tiny-random")
    assert cfg["method"]["name"] == method
    assert cfg["method"]["learning_rate"] > 0


def test_qlora_is_lora_plus_nf4():
    lora, qlora = composed("method=lora")["method"], composed("method=qlora")["method"]
    assert qlora["quantize"] == "nf4" and lora["quantize"] is None
    assert qlora["r"] == lora["r"] and qlora["target_modules"] == "all-linear"


def test_rank_override_and_full_arm_ignores_rank():
    full8, full64 = plan(composed("method=full", "method.r=8")), plan(composed("method=full", "method.r=64"))
    assert full8["run_id"] == full64["run_id"] and full8["rank"] is None
    lora8, lora64 = plan(composed("method=lora", "method.r=8")), plan(composed("method=lora", "method.r=64"))
    assert lora8["run_id"] != lora64["run_id"] and lora8["rank"] == 8


def test_pair_key_joins_arms_and_separates_seeds():
    arms = [plan(composed(f"method={m}")) for m in ("full", "lora", "qlora")]
    assert len({a["pair_key"] for a in arms}) == 1
    assert len({a["config_hash"] for a in arms}) == 3
    assert plan(composed("seed=1"))["pair_key"] != arms[0]["pair_key"]
    # the base model is shared across seeds and methods: same model, data and eval settings
    assert plan(composed("seed=1"))["eval_key"] == arms[0]["eval_key"]


def test_non_result_settings_do_not_change_the_run_id():
    a = plan(composed())
    b = plan(composed("results_dir=elsewhere", "force=true", "isolate=false"))
    assert a["run_id"] == b["run_id"]


def test_bad_rank_is_a_usage_error():
    with pytest.raises(UsageError, match="method.r=0"):
        plan(composed("method=lora", "method.r=0"))


def test_presets_compose():
    demo = composed("experiment=demo")
    assert demo["model"]["name"] == "smollm2-135m" and demo["data"]["name"] == "demo"
    assert composed("model=llama-2-7b-arch")["model"]["source"] == "config"
    assert composed("model=qwen2.5-0.5b")["model"]["path"] == "Qwen/Qwen2.5-0.5B"
