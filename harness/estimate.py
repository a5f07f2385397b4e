"""harness-estimate: memory, time and cost of a harness-run job, before renting the hardware.

    harness-estimate -m model=llama-2-13b-arch method=full,lora,qlora hardware=a100-80gb train.seq_len=2048
    harness-estimate -m model=llama-3.1-8b-arch,llama-2-70b-arch method=lora method.r=8,16,64 format=json

A Hydra app over the same conf/ as harness-run (conf/estimate.yaml pulls in conf/config.yaml and
adds its own keys), so one command line serves both. It loads only the architecture (config.json)
and builds the model, with the method applied, on the meta device: no weights, no GPU.

Estimated per job (``estimate_job``), every figure labelled as an estimate:

- trainable / total parameters: exact, peft's own count on the meta-device model;
- peak training memory per device, in the memory tracker's categories (``measure.memory.CATEGORIES``),
  from the model's shapes and an activation model of the Llama family as transformers runs it
  (pre-norm RMSNorm, SwiGLU MLP, grouped-query attention through SDPA, rotary embeddings), taken
  at the largest of the step's phases (see ``memory_breakdown``); plus, on a GPU, the CUDA
  context and the caching allocator's reserve (``CUDA_CONTEXT_BYTES``, ``ALLOCATOR_RESERVE``);
- whether that fits the hardware, and the fewest devices (sharded with FSDP) that it needs;
- training time and cost for ``projected_tokens``: ``measure.flops.flops_per_token`` (the formula the
  runs use for MFU) over the device's achieved FLOP/s, from ok run records on that hardware in
  ``results_dir`` when there are any, else the datasheet peak times ``DEFAULT_MFU``;
- serving footprint: the adapter's safetensors file size and the full checkpoint, from shapes.

benchmarks/bench_estimate.py checks the memory model against tracked training steps.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, UsageError
from harness.measure.memory import CATEGORIES

GIB = 1024**3

# CUDA context of one process: what the driver, runtime and loaded kernels take on a device
# outside torch's allocator (max_memory_allocated never sees it). pytorch/pytorch PR #86509
# (lazy module loading, torch's default since 1.13) measured 287,047,680 bytes for a bare context
# with lazy loading (666,632,192 eager); training then loads its kernels and the cuBLAS/cuDNN
# handles, hence 512 MiB. Stated, not measured here (no GPU was lent for this work).
CUDA_CONTEXT_BYTES = 512 * 1024**2
# The caching allocator reserves more than it hands out (block rounding, fragmentation): peak
# reserved over peak allocated. 10% is an assumed allowance, to be replaced by the ratio of
# peak_memory_reserved_bytes / peak_memory_bytes in GPU run records once there are some.
ALLOCATOR_RESERVE = 0.10
# Model FLOPs utilization assumed when no run record on the hardware says better: 0.35 of the
# datasheet dense bf16 peak, a typical figure for bf16 fine-tuning through HF Trainer.
DEFAULT_MFU = 0.35
# Parameters per attention+MLP block that ZeRO-3/FSDP gather at once: the current block and one
# prefetched (FSDP's default forward/backward prefetch of one unit).
SHARDED_LIVE_BLOCKS = 2

# Per device: memory (nvidia-smi total) and dense bf16 tensor peak (no sparsity), datasheets.
DEVICES: dict[str, dict] = {
    "a100-80gb": {"memory_bytes": 81920 * 1024**2, "peak_flops": 312e12,
                  "source": "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense, 80 GB HBM2e"},
    "h100-80gb": {"memory_bytes": 81559 * 1024**2, "peak_flops": 989.4e12,
                  "source": "NVIDIA H100 SXM datasheet: 989 TFLOPS BF16 dense, 80 GB HBM3"},
    "h200": {"memory_bytes": 143771 * 1024**2, "peak_flops": 989.4e12,
             "source": "NVIDIA H200 SXM datasheet: 989 TFLOPS BF16 dense, 141 GB HBM3e"},
    "l40s": {"memory_bytes": 46068 * 1024**2, "peak_flops": 362.05e12,
             "source": "NVIDIA L40S datasheet: 362 TFLOPS BF16 dense, 48 GB GDDR6"},
    "rtx-4090": {"memory_bytes": 24564 * 1024**2, "peak_flops": 165.2e12,
                 "source": "NVIDIA Ada whitepaper, RTX 4090: 165 TFLOPS BF16 dense (FP32 accumulate), 24 GB"},
}

# Optimizer state per trainable element (the step's temporary: FOREACH_TEMP).
OPTIMIZERS = {
    "adamw_torch": "adam32", "adamw_torch_fused": "adam32", "adamw_torch_4bit": None,
    "adamw_8bit": "adam8", "adamw_bnb_8bit": "adam8", "paged_adamw_8bit": "adam8",
    "paged_adamw_32bit": "adam32bnb", "adamw_bnb_32bit": "adam32bnb", "sgd": "sgd",
}
# The optimizers whose step allocates a temporary: torch's AdamW (adamw_torch) takes the foreach
# path on a GPU (torch/optim/optimizer.py _default_to_fused_or_foreach: foreach when every
# parameter is on a foreach device, fused only when asked), whose _multi_tensor_adam allocates
# exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs), one tensor the size of every trainable
# parameter of the group; on a CPU it steps one tensor at a time (_single_tensor_adam: sqrt and
# denominator per tensor). adamw_torch_fused (fused=True) calls torch._fused_adamw_, one in-place
# kernel per device and dtype: no temporary, on a GPU or a CPU (torch 2.13, torch/optim/adam.py).
FOREACH_TEMP = {"adamw_torch"}
# bitsandbytes keeps tensors under this many elements in 32-bit state (min_8bit_size)
BNB_MIN_8BIT = 4096
BNB_BLOCK = 256


@dataclass
class Linear:
    name: str          # qualified name of the base linear
    kind: str          # q_proj, k_proj, ..., lm_head
    d_in: int
    d_out: int
    r: int | None      # adapter rank when PEFT adapts it
    trainable: bool    # the base weight trains (full fine-tuning)


# ---------------------------------------------------------------- the architecture, on the meta device


def arch_config(model_cfg: dict):
    """The transformers config of a model setting (``models.arch_config``), a usage error when unreadable."""
    from harness.models import ModelSourceError
    from harness.models import arch_config as model_arch_config

    path = str(model_cfg.get("path") or "")
    if model_cfg.get("source") == "hub" and path and not Path(path).exists():
        from harness.plan import hub_offline

        if why := hub_offline():  # fail now, not after the hub client's retries
            raise UsageError(f"model {path} is on the hub, which cannot be reached ({why}); "
                             + arch_preset_hint(path))
    try:
        return model_arch_config(model_cfg)
    except (ModelSourceError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from exc


def arch_preset_hint(hub_id: str) -> str:
    """Which architecture-only preset (conf/model/*-arch.yaml) stands for ``hub_id``, in words."""
    import re

    import yaml

    for preset in sorted((CONF_DIR / "model").glob("*-arch.yaml")):
        text = preset.read_text()
        hub_twin = CONF_DIR / "model" / f"{preset.stem.removesuffix('-arch')}.yaml"
        twin_path = (yaml.safe_load(hub_twin.read_text()) or {}).get("path") if hub_twin.is_file() else None
        if twin_path == hub_id or re.search(rf"\({re.escape(hub_id)}\)", text):
            return f"estimate from its architecture instead: model={preset.stem}"
    return ("no architecture preset names it: add its config.json values as harness/architectures/<name>.json "
            "and a conf/model/<name>-arch.yaml (docs/estimating.md)")


def meta_model(config, method_cfg: dict):
    """The model with the method applied, on the meta device (no memory, no weights).

    QLoRA is built unquantized: peft counts a 4-bit weight at its unpacked size, so the counts
    are the same, and the quantized storage is computed from the shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.methods import apply_method

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        return apply_method(model, {**method_cfg, "quantize": None}, False)


def linears(model) -> list[Linear]:
    """Every matmul weight of the model, with the adapter rank when PEFT wraps it."""
    import torch

    out = []
    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            r = getattr(mod, "r", {}).get("default")
            out.append(Linear(name, name.rsplit(".", 1)[-1], base.in_features, base.out_features, r,
                              base.weight.requires_grad))
        elif isinstance(mod, torch.nn.Linear) and ".lora_" not in name and not hasattr(mod, "base_layer") \
                and not name.endswith(("lora_A.default", "lora_B.default")):
            out.append(Linear(name, name.rsplit(".", 1)[-1], mod.in_features, mod.out_features, None,
                              mod.weight.requires_grad))
    return out


def _dims(config) -> dict:
    h = config.hidden_size
    nh = config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // nh
    return {"h": h, "i": config.intermediate_size, "L": config.num_hidden_layers, "nh": nh,
            "nkv": getattr(config, "num_key_value_heads", None) or nh, "d": d, "V": config.vocab_size,
            "tied": bool(getattr(config, "tie_word_embeddings", False))}


# ---------------------------------------------------------------- settings of one job


@dataclass
class Setup:
    gpu: bool
    regime: str          # fp32 | autocast (fp32 weights, bf16 matmuls) | bf16 (bf16 weights)
    weight_bytes: int    # storage of the unquantized parameters
    quantized: bool      # QLoRA: matmul weights in 4-bit NF4, double quantization
    optim: str
    gc: bool
    batch: int
    seq: int
    strategy: str
    world: int
    dropout: float
    dora: bool
    padded: bool         # batches carry padding, so SDPA gets a mask (and repeats k, v to every head)
    accumulate: bool = False  # grad_accum > 1: later micro-batches run with the gradients held
    model_dtype: str = "float32"  # model.dtype resolved as harness-run does (models.resolve_dtype)


def setup_of(cfg: dict) -> Setup:
    from harness.models import ModelSourceError, resolve_dtype

    hw = str(cfg["hardware"].get("name"))
    gpu = hw in DEVICES or (hw not in ("cpu", "auto") and not hw.startswith("unpriced (cpu"))
    has_bf16 = gpu  # every GPU of the price table has bf16
    if hw == "auto" or cfg["hardware"].get("detected"):
        import torch

        from harness.measure.environment import gpu_has_native_bf16

        gpu = torch.cuda.is_available()
        has_bf16 = gpu and gpu_has_native_bf16()
    train, method, est = cfg["train"], cfg["method"], cfg.get("estimate") or {}
    precision = str(train["precision"])
    bf16 = precision == "bf16" or (precision == "auto" and has_bf16)
    # the weights in the dtype harness-run loads them in (model.dtype, resolved by the same
    # function: auto is bf16 for a frozen base on a GPU), except QLoRA's unquantized weights,
    # which peft's prepare_model_for_kbit_training casts to fp32
    dist = cfg.get("distributed") or {}
    try:
        weights = resolve_dtype(cfg["model"].get("dtype"), method, "cuda" if gpu else "cpu", has_bf16,
                                sharded=str(dist.get("strategy") or "none") in ("fsdp", "zero3"), precision=precision)
    except ModelSourceError as exc:
        raise UsageError(str(exc)) from exc
    weight_bytes = 2 if weights != "float32" and not method.get("quantize") else 4
    regime = "bf16" if weight_bytes == 2 else ("autocast" if bf16 else "fp32")
    optim = str(train["optim"])
    if OPTIMIZERS.get(optim) is None:
        valid = ", ".join(k for k, v in OPTIMIZERS.items() if v)
        raise UsageError(f"train.optim={optim!r} has no memory model; valid: {valid}")
    strategy = str(dist.get("strategy") or "none")
    if strategy not in ("none", "ddp", "fsdp", "zero3"):
        raise UsageError(f"distributed.strategy={strategy!r} is unknown; valid: none, ddp, fsdp, zero3")
    world = int(dist.get("num_processes") or 1) if strategy != "none" else 1
    full = method["name"] == "full"
    return Setup(gpu=gpu, regime=regime, weight_bytes=weight_bytes, quantized=bool(method.get("quantize")),
                 optim=optim, gc=bool(train["gradient_checkpointing"]), batch=int(train["batch_size"]),
                 seq=int(train["seq_len"]), strategy=strategy, world=max(world, 1),
                 dropout=0.0 if full else float(method.get("dropout") or 0.0),
                 dora=not full and bool(method.get("use_dora")), padded=bool(est.get("padded", True)),
                 accumulate=int(train.get("grad_accum") or 1) > 1, model_dtype=weights)


# ---------------------------------------------------------------- memory model


def _quantized_bytes(n: int) -> int:
    """A 4-bit NF4 weight with double quantization (bitsandbytes): packed values, 8-bit absmax per
    block of 64, their fp32 absmax per 256 blocks, and the small code tables the tracker sees."""
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4


def _optimizer_state(shapes: list[int], optim: str, weight_bytes: int) -> int:
    kind = OPTIMIZERS[optim]
    if kind == "sgd":
        return 0
    if kind == "adam32":
        # exp_avg and exp_avg_sq like the parameter, plus a step counter tensor per parameter
        return sum(2 * n * weight_bytes + 4 for n in shapes)
    if kind == "adam32bnb":
        return sum(8 * n for n in shapes)
    total = 2 * 256 * 4  # the two quantization maps, shared by all parameters
    for n in shapes:
        if n < BNB_MIN_8BIT:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    return total


KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_activations(dims: dict, s: Setup, adapted: dict[str, int], norms_train: bool, base_trains: bool) -> float:
    """Bytes one decoder layer keeps for backward, per token (no gradient checkpointing).

    Read from the autograd graph of transformers' Llama-family layer under SDPA (a matmul keeps
    its input only when its weight trains, and its weight only for the input's gradient):

    - each RMSNorm keeps its fp32 input (4h; with bf16 weights an fp32 copy) and 1/rms (4), and
      its normalized input when the norm weight trains;
    - attention keeps q after rotary, k and v (repeated to every head when padding gives SDPA a
      mask, which it keeps per layer), the output (o_proj's reshaped input is a view of it, as
      SDPA writes it token-major) and the fp32 log-sum-exp per head;
    - the SwiGLU MLP keeps gate, silu(gate) and up;
    - a matmul whose weight trains keeps its input (the norm output, shared by q/k/v and by
      gate/up; the MLP product); under bf16 autocast its own bf16 copy of an fp32 input instead;
    - a LoRA adapter with dropout keeps the dropout mask (float on a CPU, bool on a GPU) and the
      dropout output (its bf16 copy under autocast), without dropout its input; then A's output;
      DoRA also the base and LoRA outputs (its norm scaling).
    """
    h, i, q = dims["h"], dims["i"], dims["nh"] * dims["d"]
    a = 4 if s.regime == "fp32" else 2          # matmul outputs
    out_b = 4 if s.regime != "bf16" else 2      # norm outputs (fp32 weights keep them fp32)
    cast = s.regime == "autocast"               # every matmul casts an fp32 input to bf16
    kv = q if s.padded else dims["nkv"] * dims["d"]
    total = 2 * (4 * h + 4 + (out_b * h if norms_train else 0))
    total += 2 * a * q + 2 * a * kv + 3 * a * i + 4 * dims["nh"] + (a * s.seq if s.padded else 0)
    # what feeds each matmul: (width, the shared tensor, its bytes per element); o_proj's input
    # is SDPA's output, kept anyway
    feeds = {"q_proj": (h, "y1", out_b), "k_proj": (h, "y1", out_b), "v_proj": (h, "y1", out_b),
             "o_proj": (q, None, a), "gate_proj": (h, "y2", out_b), "up_proj": (h, "y2", out_b),
             "down_proj": (i, "prod", a)}
    outputs = {"q_proj": q, "k_proj": dims["nkv"] * dims["d"], "v_proj": dims["nkv"] * dims["d"],
               "o_proj": h, "gate_proj": i, "up_proj": i, "down_proj": h}
    kept: dict[str, float] = {}
    mask_b = 1 if s.gpu else 4
    for kind in KINDS:
        d_in, shared, in_b = feeds[kind]
        keeps_input = [base_trains] + ([s.dropout == 0] if kind in adapted else [])
        for keeps in keeps_input:
            if not keeps:
                continue
            if cast and in_b == 4:
                total += 2 * d_in  # the matmul's own bf16 copy
            elif shared:
                kept[shared] = in_b * d_in
        if kind in adapted:
            if s.dropout > 0:
                total += mask_b * d_in + (2 if s.regime != "fp32" else in_b) * d_in
            total += a * adapted[kind]  # A's output, kept by B
            if s.dora:
                total += 2 * a * outputs[kind]
    return total + sum(kept.values())


def memory_breakdown(model, config, s: Setup) -> dict:
    """Per-device peak of one training step, by category, and the phase it happens in.

    The step goes: forward (activations build up; gradients are None after the last step's
    zero_grad) -> loss backward (the fp32 log-softmax, its gradient and the logits' gradient,
    3 x tokens x vocab x 4 bytes, on top of every saved activation) -> backward through the
    layers (activations freed, gradients allocated; both change linearly, so the extremes are
    at its ends) -> optimizer step (a temporary the size of the trainable parameters for torch's
    foreach AdamW on a GPU; the largest parameter twice on a CPU, which steps one tensor at a time;
    none for adamw_torch_fused, FOREACH_TEMP).
    The peak is the largest phase; its categories add up to it, as the tracker's do.
    """
    dims = _dims(config)
    lins = linears(model)
    n_tok = s.batch * s.seq
    w = s.weight_bytes
    params = list(model.named_parameters())
    quant_names = {f"{lin.name}.base_layer.weight" if lin.r is not None else f"{lin.name}.weight"
                   for lin in lins if lin.kind != "lm_head"} if s.quantized else set()
    # peft keeps adapter weights in float32 whatever the base dtype (autocast_adapter_dtype)
    tw = 4 if hasattr(model, "peft_config") else w
    param_bytes = 0
    for name, p in params:
        if name in quant_names:
            param_bytes += _quantized_bytes(p.numel())
        else:
            param_bytes += p.numel() * (tw if p.requires_grad else w)
    trainable = [p.numel() for _, p in params if p.requires_grad]
    # DeepSpeed's bf16 mode casts every weight to bf16 and keeps an fp32 master copy of the
    # trainable ones beside their fp32 gradients and moments: 2 + 4 + 4 + 8 = 18 bytes per
    # trainable parameter, not autocast's 16 (ZeRO-3's bf16 optimizer)
    zero3_bf16 = s.strategy == "zero3" and s.regime != "fp32"
    if zero3_bf16:
        param_bytes = sum(_quantized_bytes(p.numel()) if name in quant_names else 2 * p.numel()
                          for name, p in params) + 4 * sum(trainable)
    state_bytes = 4 if zero3_bf16 else tw  # of each gradient and optimizer-state element
    grads = sum(trainable) * state_bytes
    opt = _optimizer_state(trainable, s.optim, state_bytes)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())

    adapted = {}
    for lin in lins:
        if lin.r is not None:
            adapted[lin.kind] = lin.r
    norms_train = any(p.requires_grad for n, p in params if "norm" in n)
    base_trains = any(lin.trainable for lin in lins if lin.kind in KINDS)
    per_layer = layer_activations(dims, s, adapted, norms_train, base_trains)
    res_b = 2 if s.regime == "bf16" else 4
    h, V, L = dims["h"], dims["V"], dims["L"]
    out_b = 4 if s.regime != "bf16" else 2
    rotary = 2 * 4 * dims["d"] / s.batch  # cos and sin (1 x seq x head_dim, fp32), kept by the rotary products
    head_trains = any(lin.trainable for lin in lins if lin.kind == "lm_head")
    # the final norm, and lm_head's input when its weight trains (a bf16 copy under autocast)
    top = 4 * h + 4 + (out_b * h if norms_train else 0) + (
        (2 if s.regime == "autocast" else out_b) * h if head_trains else 0)
    mask = 0  # SDPA keeps its mask per layer (layer_activations)
    saved = (L * res_b * h if s.gc else L * per_layer) + top + rotary + mask
    if not s.gc and not any(p.requires_grad for n, p in params if "embed_tokens" in n):
        # a frozen embedding's output needs no gradient: the first norm keeps nothing, and the
        # dropout masks of the first layer's q/k/v adapters are not kept either
        saved -= 4 * h + 4 + (1 if s.gpu else 4) * h * sum(
            1 for k in ("q_proj", "k_proj", "v_proj") if k in adapted and s.dropout > 0)
    # bf16 autocast keeps, for backward, the bf16 copy of every fp32 weight a matmul used
    # (4-bit weights are dequantized by bitsandbytes instead); with checkpoints only one layer's.
    # FSDP / ZeRO-3 gather each block's weights in bf16 and free them after use (SHARDED_LIVE_BLOCKS).
    shard = s.world if s.strategy in ("fsdp", "zero3") else 1
    copies = 0
    if s.regime == "autocast" and shard == 1:
        layer_w = sum(lin.d_in * lin.d_out for lin in lins if lin.kind != "lm_head")
        head_w = sum(lin.d_in * lin.d_out for lin in lins if lin.kind == "lm_head")
        adapters = sum(n for n in trainable) if adapted else 0
        copies = 2 * (head_w + adapters + (0 if s.quantized else (layer_w / L if s.gc else layer_w)))
    act_fwd = n_tok * saved + copies
    recompute = n_tok * per_layer if s.gc else 0  # one layer recomputed at a time
    logits_bwd = 3 * 4 * n_tok * V

    lm_head_grad = next((lin.d_in * lin.d_out * tw for lin in lins if lin.kind == "lm_head" and lin.trainable), 0)
    param_dev, grads_dev, opt_dev = param_bytes / shard, grads / shard, opt / shard
    # FSDP2's root unit (what is outside the transformer layers: embedding, final norm, lm_head)
    # is not resharded after forward: whole on every rank from forward to the end of backward,
    # and its gradients (lm_head's) whole until the root's reduce-scatter after the embedding's
    root_whole = head_grad_whole = 0.0
    if s.strategy == "fsdp" and shard > 1:
        root_whole = sum(p.numel() * (tw if p.requires_grad else w) for name, p in params
                         if ".layers." not in name) * (1 - 1 / shard)
        head_grad_whole = lm_head_grad * (1 - 1 / shard)
    other = buffers
    if shard > 1:
        block = sum(lin.d_in * lin.d_out for lin in lins if ".layers.0." in lin.name)
        other += SHARDED_LIVE_BLOCKS * block * (0.5 if s.quantized else 2 if s.regime != "fp32" else 4)
    if s.strategy == "ddp" and s.world > 1:
        other += grads  # DDP's gradient buckets, a second copy of the gradients (gradient_as_bucket_view=False)
    if s.optim in FOREACH_TEMP and trainable:
        opt_temp = sum(trainable) * tw / shard if s.gpu else 2 * max(trainable) * tw
    else:
        opt_temp = 0
    # QLoRA's backward on a GPU dequantizes one bf16 weight at a time (not seen at the CPU's peaks)
    dequant = 2 * max((lin.d_in * lin.d_out for lin in lins if lin.kind != "lm_head"), default=0) if (
        s.quantized and s.gpu) else 0

    held = grads_dev if s.accumulate else 0  # gradients of earlier micro-batches
    phases = {
        "loss backward": {"parameters": param_dev + root_whole, "gradients": held, "optimizer_state": opt_dev,
                          "activations": act_fwd + logits_bwd, "other": other},
        "lm_head backward": {"parameters": param_dev + root_whole, "gradients": max(held, lm_head_grad / shard) + head_grad_whole, "optimizer_state": opt_dev,
                             "activations": act_fwd + 4 * n_tok * V + n_tok * h * 4, "other": other},
        "layer backward": {"parameters": param_dev + root_whole, "gradients": grads_dev + head_grad_whole, "optimizer_state": opt_dev,
                           "activations": n_tok * (res_b * h * 2) + dequant, "other": other},
        "optimizer step": {"parameters": param_dev, "gradients": grads_dev, "optimizer_state": opt_dev,
                           "activations": 0, "other": other + opt_temp},
    }
    # backward inside one layer: the incoming gradient, and the SwiGLU's gradients of silu(gate)
    # and up, on top of what the layer keeps
    workspace = n_tok * (res_b * h + 2 * (4 if s.regime == "fp32" else 2) * dims["i"])
    emb_grad = dims["V"] * h * tw if (not dims["tied"] and any(
        p.requires_grad for n, p in params if "embed_tokens" in n)) else 0
    layer_grad = max(grads - lm_head_grad - emb_grad, 0) / L
    if not s.gc:
        phases["top layer backward"] = {
            "parameters": param_dev + root_whole, "gradients": max(held, lm_head_grad / shard) + head_grad_whole, "optimizer_state": opt_dev,
            "activations": act_fwd - n_tok * top + workspace + dequant, "other": other}
    else:
        # with checkpoints, backward recomputes one layer at a time: at the top layer every
        # checkpoint is still held; at the bottom one, nearly every gradient exists
        phases["recompute, top layer"] = {
            "parameters": param_dev + root_whole, "gradients": max(held, lm_head_grad / shard) + head_grad_whole, "optimizer_state": opt_dev,
            "activations": act_fwd - n_tok * top + recompute + workspace + dequant, "other": other}
        phases["recompute, bottom layer"] = {
            "parameters": param_dev + root_whole, "gradients": (grads - layer_grad - emb_grad) / shard + head_grad_whole,
            "optimizer_state": opt_dev,
            "activations": n_tok * (res_b * h + rotary + mask) + recompute + workspace + dequant,
            "other": other}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    breakdown = {c: int(phases[phase][c]) for c in CATEGORIES}
    return {"breakdown": breakdown, "peak_phase": phase, "peak_bytes": sum(breakdown.values())}


# ---------------------------------------------------------------- the job


def _adapter_file_bytes(model) -> int | None:
    """Size of adapter_model.safetensors as peft saves it: 8-byte header length, the JSON header
    (compact, padded with spaces to 8 bytes), then the tensors, fp32 as trained here."""
    if not hasattr(model, "peft_config"):
        return None
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(state):
        t = state[name]
        n = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text) / 8) * 8 + offset


def _measured_rate(results_dir: str | None, hardware: str, method: str) -> tuple[float, str] | None:
    """Achieved training FLOP/s per device from ok run records on ``hardware`` (this method's
    records when there are any, else all): the median of achieved_flops_per_s / device_count."""
    from harness.records import iter_records

    if not results_dir or not Path(results_dir).is_dir():
        return None
    rows = []
    for _, rec in iter_records(Path(results_dir)):
        m = rec.get("metrics") or {}
        hw = ((rec.get("config") or {}).get("hardware") or {}).get("name")
        if rec.get("status") == "ok" and hw == hardware and m.get("achieved_flops_per_s"):
            rows.append((rec.get("method"), m["achieved_flops_per_s"] / max(int(m.get("device_count") or 1), 1)))
    same = [r for meth, r in rows if meth == method] or [r for _, r in rows]
    if not same:
        return None
    return statistics.median(same), f"measured: median of {len(same)} run record(s) on {hardware} in {results_dir}"


def _devices_needed(model, config, s: Setup, capacity: float | None) -> tuple[int | None, str]:
    """Fewest devices the job fits on: as configured, else sharded with FSDP (up to 1024)."""
    if capacity is None:
        return None, s.strategy
    if _device_total(memory_breakdown(model, config, s)["peak_bytes"], s) <= capacity:
        return s.world, s.strategy
    strategy = s.strategy if s.strategy in ("fsdp", "zero3") else "fsdp"
    widest = Setup(**{**s.__dict__, "strategy": strategy, "world": 1024})
    if _device_total(memory_breakdown(model, config, widest)["peak_bytes"], widest) > capacity:
        # sharding does not split a device's activations: no device count helps
        return None, "none: activations alone exceed a device (try train.gradient_checkpointing=true or a smaller batch)"
    n = 2
    while n <= 1024:
        t = Setup(**{**s.__dict__, "strategy": strategy, "world": n})
        if _device_total(memory_breakdown(model, config, t)["peak_bytes"], t) <= capacity:
            return n, strategy
        n *= 2
    return None, strategy


def _adapted(model) -> dict[str, int]:
    """Adapted base linears by kind (q_proj: 40, ...): what ``target_modules`` resolved to."""
    kinds: dict[str, int] = {}
    for lin in linears(model):
        if lin.r is not None:
            kinds[lin.kind] = kinds.get(lin.kind, 0) + 1
    return dict(sorted(kinds.items()))


def _device_total(peak: float, s: Setup) -> float:
    return peak * (1 + ALLOCATOR_RESERVE) + CUDA_CONTEXT_BYTES if s.gpu else peak


def estimate_job(cfg: dict) -> dict:
    """The estimated at-a-glance fields of one resolved harness config (see the module doc)."""
    from harness.measure import flops, pricing
    from harness.methods import MethodError, normalize, rank_of, validate
    from harness.train import token_budget

    method = normalize(cfg["method"])
    try:
        validate(method)
    except MethodError as exc:
        raise UsageError(str(exc)) from exc
    cfg = {**cfg, "method": method}
    config = arch_config(cfg["model"])
    s = setup_of(cfg)
    model = meta_model(config, method)
    counts = flops.param_counts(model)
    mem = memory_breakdown(model, config, s)
    hw = str(cfg["hardware"].get("name"))
    spec = DEVICES.get(hw)
    capacity = spec["memory_bytes"] if spec else None
    device_total = _device_total(mem["peak_bytes"], s)
    devices, dev_strategy = _devices_needed(model, config, s, capacity)

    dims = _dims(config)
    emb = 0 if dims["tied"] else dims["V"] * dims["h"]
    fpt = flops.flops_per_token(method["name"], counts["total_params"], counts["trainable_params"],
                                  embedding_params=emb, n_layers=dims["L"], seq_len=s.seq, hidden_size=dims["h"])
    tokens = cfg.get("projected_tokens") or token_budget(cfg["train"])
    measured = _measured_rate(cfg.get("results_dir"), hw, method["name"])
    if measured:
        rate, rate_source = measured
    elif spec:
        rate, rate_source = spec["peak_flops"] * DEFAULT_MFU, f"default MFU {DEFAULT_MFU} x datasheet peak ({spec['source']})"
    else:
        rate, rate_source = None, f"no datasheet peak for hardware {hw!r} and no run records on it"
    price = cfg["hardware"].get("price_per_device_hour_usd")
    tokens_source = ("projected_tokens" if cfg.get("projected_tokens") else
                     f"the token budget: max_steps {cfg['train']['max_steps']} x batch {s.batch} x grad_accum "
                     f"{cfg['train'].get('grad_accum', 1)} x seq_len {s.seq}; set projected_tokens=N for your data")

    def time_cost(world: int) -> tuple[float | None, float | None]:
        train_s = tokens * fpt / (rate * world) if rate else None
        return train_s, pricing.cost_usd(train_s, float(price), world) if train_s is not None and price else None

    train_s, cost = time_cost(s.world)
    train_hours = train_s / 3600 if train_s is not None else None
    # a job that does not fit as configured is priced where it fits: the fewest devices
    fit_s, fit_cost = time_cost(devices) if devices and devices != s.world else (None, None)

    import torch

    serve_dtype = torch.bfloat16 if (s.gpu or s.regime != "fp32") else torch.float32
    adapter = _adapter_file_bytes(model)
    n_full = counts["total_params"] - (counts["trainable_params"] if adapter is not None else 0)
    return {
        "estimated": True,
        "model": cfg["model"]["name"], "method": method["name"], "rank": rank_of(method),
        "hardware": hw, "strategy": s.strategy, "world_size": s.world,
        "precision": s.regime, "model_dtype": s.model_dtype, "optim": s.optim, "gradient_checkpointing": s.gc,
        "batch_size": s.batch, "seq_len": s.seq,
        "trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
        "trainable_share": counts["trainable_share"],
        "peak_memory_bytes": mem["peak_bytes"], "breakdown": mem["breakdown"], "peak_phase": mem["peak_phase"],
        "cuda_context_bytes": CUDA_CONTEXT_BYTES if s.gpu else 0,
        "allocator_reserve_bytes": int(mem["peak_bytes"] * ALLOCATOR_RESERVE) if s.gpu else 0,
        "device_total_bytes": int(device_total), "device_memory_bytes": capacity,
        "fits": device_total <= capacity if capacity else None,
        "devices_needed": devices, "devices_needed_strategy": dev_strategy,
        "flops_per_token": fpt, "projected_tokens": tokens, "tokens_source": tokens_source,
        "target_modules": method.get("target_modules"), "adapted_modules": _adapted(model),
        "fit_train_hours": fit_s / 3600 if fit_s is not None else None, "fit_cost_usd": fit_cost,
        "flops_per_s_per_device": rate, "rate_source": rate_source,
        "train_hours": train_hours, "cost_usd": cost,
        "adapter_bytes": adapter, "checkpoint_bytes": n_full * serve_dtype.itemsize,
        "checkpoint_dtype": str(serve_dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------- output


def check_target(model: str | None, hardware: str | None, flags: tuple[str, str]) -> str | None:
    """The verdict's target model and hardware: one line naming the one conf/ lacks, else None."""
    known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    if model and model not in known:
        return f"{flags[0]} {model!r} is unknown; valid: {', '.join(known)}"
    if hardware and hardware not in DEVICES:
        return f"{flags[1]} {hardware!r} has no datasheet entry; valid: {', '.join(sorted(DEVICES))}"
    return None


def _gib(b: float | None) -> str:
    if b is None:
        return "n/a"
    for scale, unit in ((GIB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _money(usd: float | None) -> str:
    return "" if usd is None else f", ${usd:,.2f}" if usd >= 0.01 else f", ${usd:.2g}"


def _time_cost(row: dict) -> str:
    """Time and cost where the job fits: as configured, or on the fewest devices it needs."""
    if row["fit_train_hours"] is not None:
        return (f"{row['fit_train_hours']:.3g} h{_money(row['fit_cost_usd'])} on {row['devices_needed']} devices "
                f"({row['devices_needed_strategy']}), the fewest it fits on")
    if row["train_hours"] is None:
        return "n/a"
    where = "" if row["fits"] is not False else " (where it does not fit: no device count does)"
    return f"{row['train_hours']:.3g} h{_money(row['cost_usd'])} on {row['world_size']} device" \
           f"{'s' if row['world_size'] > 1 else ''}{where}"


SIDE_BY_SIDE = (("trainable", lambda r: f"{_count(r['trainable_params'])} ({100 * r['trainable_share']:.3g}%)"),
                ("peak / device", lambda r: _gib(r["peak_memory_bytes"])),
                ("fits", lambda r: {True: "yes", False: "no", None: "?"}[r["fits"]]
                 + ("" if r["fits"] is not False or not r["devices_needed"]
                    else f" (needs {r['devices_needed']}, {r['devices_needed_strategy']})")),
                ("time, cost", _time_cost),
                ("serving", lambda r: ("" if r["adapter_bytes"] is None else f"adapter {_gib(r['adapter_bytes'])}; ")
                 + f"full {_gib(r['checkpoint_bytes'])}"))


def side_by_side(rows: list[dict]) -> str:
    """One column per job of a ``-m`` sweep (harness-estimate prints it after the per-job blocks)."""
    def name(r: dict) -> str:
        return f"{r['model']} {r['method']}" + ("" if r["rank"] is None else f" r={r['rank']}")

    head = ["", *(name(r) for r in rows)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, *(fn(r) for r in rows)]) + " |" for label, fn in SIDE_BY_SIDE]
    tokens = sorted({f"{r['projected_tokens']:.3g}" for r in rows})
    return "\n".join(["Side by side (estimated; " + ", ".join(tokens) + " training tokens):", *lines])


def format_text(row: dict) -> str:
    rank = "" if row["rank"] is None else f" r={row['rank']}"
    fits = {True: "fits", False: "does not fit", None: "capacity unknown"}[row["fits"]]
    lines = [
        f"{row['model']} · {row['method']}{rank} · {row['hardware']} · {row['strategy']} x{row['world_size']} · "
        f"{row['precision']} · {row['optim']} · batch {row['batch_size']} x {row['seq_len']}"
        f"{' · gradient checkpointing' if row['gradient_checkpointing'] else ''}   (estimated)",
        f"  trainable parameters   {_count(row['trainable_params'])} of {_count(row['total_params'])} "
        f"({100 * row['trainable_share']:.2f}%)",
        f"  peak training memory   {_gib(row['peak_memory_bytes'])} per device (at {row['peak_phase']}): "
        + ", ".join(f"{c} {_gib(v)}" for c, v in row["breakdown"].items()),
    ]
    if row["cuda_context_bytes"]:
        lines.append(f"  on the device          {_gib(row['device_total_bytes'])} with CUDA context "
                     f"{_gib(row['cuda_context_bytes'])} and allocator reserve {_gib(row['allocator_reserve_bytes'])}"
                     f" of {_gib(row['device_memory_bytes'])}: {fits}; devices needed: "
                     + (f"{row['devices_needed']} ({row['devices_needed_strategy']})" if row["devices_needed"]
                        else row["devices_needed_strategy"]))
    if row["adapted_modules"]:
        lines.append(f"  adapted modules        target_modules={row['target_modules']}: "
                     + ", ".join(f"{k} x{n}" for k, n in row["adapted_modules"].items()))
    lines.append(f"  training tokens        {row['projected_tokens']:.3g} ({row['tokens_source']})")
    lines.append(f"  time and cost          {_time_cost(row)} "
                 f"({row['flops_per_token']:.3g} FLOPs/token; rate {row['rate_source']})")
    adapter = "" if row["adapter_bytes"] is None else f"adapter {_gib(row['adapter_bytes'])} vs "
    lines.append(f"  serving footprint      {adapter}full checkpoint {_gib(row['checkpoint_bytes'])} "
                 f"({row['checkpoint_dtype']})")
    return "\n".join(lines)


def compose(overrides: list[str]) -> dict:
    """The resolved estimate config for ``overrides`` (Hydra's compose API; for the report)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="estimate", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def resolved(cfg: dict) -> dict:
    """Hardware resolved as harness-run does (auto detects; a name gets its price entry)."""
    from harness.config import EstimateConfig, validate
    from harness.measure.pricing import PriceTableError, load_price_table, resolve_hardware

    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    validate(cfg, EstimateConfig)
    detected = cfg["hardware"].get("name") == "auto"
    try:
        entry = resolve_hardware(cfg["hardware"], load_price_table(CONF_DIR))
    except PriceTableError as exc:
        raise UsageError(str(exc)) from exc
    cfg["hardware"] = entry or {"name": "unknown", "price_per_device_hour_usd": None}
    if detected:  # this machine's device: setup_of asks it for bf16 instead of assuming it
        cfg["hardware"] = {**cfg["hardware"], "detected": True}
    return cfg


@hydra.main(config_path=str(CONF_DIR), config_name="estimate", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        fmt = str(cfg.get("format", "table"))
        if fmt not in ("table", "json"):
            raise UsageError(f"format={fmt!r} is invalid; valid: table, json")
        row = estimate_job(resolved(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)))
    except UsageError as exc:
        print(f"harness-estimate: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(row, sort_keys=True) if fmt == "json" else format_text(row) + "\n", flush=True)
    if fmt == "table":
        _SWEEP_ROWS.append(row)


_SWEEP_ROWS: list[dict] = []  # the jobs of one -m sweep (Hydra runs them in this process, in turn)


def main() -> None:
    from harness import console
    from harness.config import usage_exit
    from harness.plan import check_names

    console.quiet()
    check_names(sys.argv[1:], CONF_DIR, functools.partial(usage_exit, prog="harness-estimate"))  # before Hydra's text
    hydra_main()
    if len(_SWEEP_ROWS) > 1:
        print(side_by_side(_SWEEP_ROWS), flush=True)


if __name__ == "__main__":
    main()
