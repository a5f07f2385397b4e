"""Fine-tuning methods applied to a base model: full, LoRA, QLoRA, or any PEFT config.

A method config (conf/method/*.yaml) carries its own learning rate, since full fine-tuning and
adapters want different ones. PEFT methods other than LoRA go through ``peft_type`` plus
``peft_kwargs`` (for example IA3, LOHA, LOKR), built with peft's own ``get_peft_config``.
"""

from __future__ import annotations

import torch

# Fields of a method config that only PEFT methods use: full fine-tuning ignores them, so a
# sweep over method.r runs the full arm once (its config hash leaves them out).
PEFT_FIELDS = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "peft_type", "peft_kwargs",
               "quantize", "compute_dtype")


class MethodError(ValueError):
    """A method setting out of range (a usage error)."""


def normalize(method_cfg: dict) -> dict:
    """The method config with the fields that do not apply to it set to None, and QLoRA's
    compute dtype resolved (so the record says which one ran)."""
    cfg = dict(method_cfg)
    if cfg["name"] == "full":
        for key in PEFT_FIELDS:
            if key in cfg:
                cfg[key] = None
    if cfg.get("quantize"):
        cfg["compute_dtype"] = compute_dtype(cfg)
    return cfg


def validate(method_cfg: dict) -> None:
    if method_cfg["name"] == "full":
        return
    r = method_cfg.get("r")
    if r is not None and (not isinstance(r, int) or r <= 0):
        raise MethodError(f"method.r={r!r} is invalid; give a positive integer (for example 8, 16, 64)")
    if float(method_cfg.get("learning_rate", 0)) < 0:
        raise MethodError(f"method.learning_rate={method_cfg['learning_rate']!r} is invalid; give a value >= 0")


def rank_of(method_cfg: dict) -> int | None:
    return None if method_cfg["name"] == "full" else method_cfg.get("r")


def compute_dtype(method_cfg: dict) -> str:
    """QLoRA's compute dtype: ``auto`` is bf16 on a GPU that has it natively and fp32 elsewhere, because
    bf16 matmuls on a CPU without bf16 units run many times slower (about 30 s a step here)."""
    wanted = str(method_cfg.get("compute_dtype") or "auto")
    if wanted != "auto":
        return wanted
    from harness.measure.environment import gpu_has_native_bf16

    return "bfloat16" if gpu_has_native_bf16() else "float32"


def quantization_config(method_cfg: dict, sharded: bool = False):
    """bitsandbytes 4-bit config for QLoRA (NF4, double quantization, bf16 compute), else None.

    ``sharded`` (FSDP): the packed 4-bit weights are stored in the compute dtype
    (``bnb_4bit_quant_storage``), since FSDP cannot shard the default uint8 storage.
    """
    if method_cfg.get("quantize") != "nf4":
        return None
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, compute_dtype(method_cfg))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
    )


def peft_config(method_cfg: dict):
    from peft import LoraConfig, get_peft_config

    peft_type = str(method_cfg.get("peft_type") or "LORA").upper()
    target = method_cfg.get("target_modules")
    target = list(target) if isinstance(target, (list, tuple)) else target  # str: "all-linear" or a regex
    if peft_type == "LORA":
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=int(method_cfg["r"]),
            lora_alpha=int(method_cfg["alpha"]),
            lora_dropout=float(method_cfg["dropout"]),
            target_modules=target,
            use_dora=bool(method_cfg.get("use_dora", False)),
            use_rslora=bool(method_cfg.get("use_rslora", False)),
            **dict(method_cfg.get("peft_kwargs") or {}),
        )
    return get_peft_config(
        {"peft_type": peft_type, "task_type": "CAUSAL_LM", "target_modules": target,
         **dict(method_cfg.get("peft_kwargs") or {})}
    )


def apply_method(model: torch.nn.Module, method_cfg: dict, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Make ``model`` trainable by the method: every weight (full) or an adapter (PEFT)."""
    validate(method_cfg)
    if method_cfg["name"] == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if method_cfg.get("quantize"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_config(method_cfg))


def check_targets(method_cfg: dict, model_cfg: dict) -> None:
    """Target modules named explicitly (a list or a regex, not ``all-linear``) must be in the model:
    peft applies them to the architecture built on the meta device (no weights). A model whose
    config cannot be read here (a hub id offline) is checked when it loads."""
    target = method_cfg.get("target_modules")
    if method_cfg["name"] == "full" or target in (None, "all-linear"):
        return
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.models import ModelSourceError, arch_config

    try:
        config = arch_config(model_cfg)
    except (ModelSourceError, OSError):
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    try:
        get_peft_model(model, peft_config({**method_cfg, "quantize": None}))
    except ValueError as exc:
        raise MethodError(f"method.target_modules={target!r} matches no module of model {model_cfg.get('name')!r} "
                          f"({str(exc).splitlines()[0][:120]}); its linear layers: {', '.join(linear)}") from exc
