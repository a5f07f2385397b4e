"""Serving footprint (adapter vs full checkpoint) and inference latency (base, merged, dynamic)."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from harness.measure.flops import param_counts
from harness.measure.memory import sync


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_nb_trainable_parameters")


def adapter_bytes(model: torch.nn.Module, state_dict: dict | None = None) -> int | None:
    """Bytes on disk of the saved adapter (``save_pretrained`` with safetensors); None if not PEFT.

    ``state_dict``: the full (gathered) state dict of a sharded model, from which peft saves.
    """
    if not _is_peft(model):
        return None
    with tempfile.TemporaryDirectory(prefix="harness-adapter-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        # several adapters are saved in sub-folders, one adapter_model.safetensors each
        return sum(p.stat().st_size for p in Path(tmp).rglob("adapter_model*.safetensors"))


def full_checkpoint_bytes(n_params: int, dtype: torch.dtype, saved_bytes: int | None = None) -> tuple[int, bool]:
    """(bytes, estimated): the saved size when given, else n_params × bytes per element of dtype."""
    if saved_bytes is not None:
        return int(saved_bytes), False
    return int(n_params) * dtype.itemsize, True


def footprint_metrics(model: torch.nn.Module, dtype: torch.dtype, saved_full_bytes: int | None = None,
                      state_dict: dict | None = None) -> dict:
    """adapter_bytes, full_checkpoint_bytes and full_checkpoint_bytes_estimated for the record.

    The full checkpoint is what serving a fully fine-tuned (or merged) model stores: the base
    model's parameters (adapter parameters excluded) in ``dtype``, the compute/save dtype
    (for QLoRA the merged model is saved in its compute dtype, not 4-bit).
    """
    counts = param_counts(model)
    n = counts["total_params"] - (counts["trainable_params"] if _is_peft(model) else 0)
    full, estimated = full_checkpoint_bytes(n, dtype, saved_full_bytes)
    return {
        "adapter_bytes": adapter_bytes(model, state_dict),
        "full_checkpoint_bytes": full,
        "full_checkpoint_bytes_estimated": estimated,
    }


def _encode(tokenizer: Any, prompts: Sequence, device: torch.device) -> list[torch.Tensor]:
    # without a tokenizer, prompts are token-id lists
    if tokenizer is None:
        return [torch.tensor([list(p)], dtype=torch.long, device=device) for p in prompts]
    return [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in prompts]


def _time_model(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence, n_warmup: int, n_reps: int, gen_tokens: int
) -> tuple[list[float], int, float]:
    """Raw timings: (forward seconds per prompt pass, generated tokens, generation seconds)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            inputs = _encode(tokenizer, prompts, device)
            for _ in range(n_warmup):
                for ids in inputs:
                    model(input_ids=ids)
            times = []
            for _ in range(n_reps):
                for ids in inputs:
                    sync(device)
                    t0 = time.perf_counter()
                    model(input_ids=ids)
                    sync(device)
                    times.append(time.perf_counter() - t0)
            if gen_tokens <= 0:
                return times, 0, 0.0
            pad = getattr(tokenizer, "pad_token_id", None)
            if pad is None:
                pad = getattr(tokenizer, "eos_token_id", None)
            # min_new_tokens: an early EOS must not shorten the count
            kw = {
                "max_new_tokens": gen_tokens,
                "min_new_tokens": gen_tokens,
                "do_sample": False,
                "pad_token_id": pad if pad is not None else 0,
            }
            for ids in inputs[: 1 if n_warmup else 0]:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n_reps):
                for ids in inputs:
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            sync(device)
            return times, n_reps * len(inputs) * gen_tokens, time.perf_counter() - t0
    finally:
        model.train(was_training)


def latency_probe(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence, n_warmup: int = 2, n_reps: int = 10, gen_tokens: int = 16
) -> dict:
    """Median forward latency (ms) of one prompt, and greedy-generation tokens/s.

    Each prompt runs alone (batch 1, a serving request). ``forward_ms`` is the median over
    ``n_reps`` × prompts forward passes after ``n_warmup`` rounds; ``gen_tokens_per_s`` is
    ``n_reps`` × prompts × ``gen_tokens`` new tokens (``min_new_tokens`` forces the count) over
    their total time (None when ``gen_tokens`` is 0). Eval mode, ``torch.inference_mode``,
    synchronized on CUDA. ``prompts`` are strings for ``tokenizer``, or token-id lists when
    ``tokenizer`` is None.
    """
    times, n_gen, gen_s = _time_model(model, tokenizer, prompts, n_warmup, n_reps, gen_tokens)
    return {"forward_ms": statistics.median(times) * 1000.0, "gen_tokens_per_s": n_gen / gen_s if n_gen else None}


def compare_latency(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence,
    n_warmup: int = 2,
    n_reps: int = 10,
    gen_tokens: int = 16,
    rounds: int = 2,
) -> dict:
    """Latency of the base model, the unmerged adapter and the merged adapter, same prompts.

    PEFT (LoRA-style) models: base with ``model.disable_adapter()``, dynamic as is, merged after
    ``merge_adapter()`` (then ``unmerge_adapter()`` restores the model). The three variants are
    interleaved in ``rounds`` rounds of ``n_reps / rounds`` repetitions each, so a slow spell of
    the machine hits all of them; medians and rates pool the rounds. Call it after evaluation:
    with 4-bit base weights merging re-quantizes, so unmerge is not bit-exact.
    Other models (full fine-tuning): the model is its own base, merged and dynamic; measured
    once, overheads 0. Overheads are fractions: variant_ms / base_ms - 1.
    """
    if not (_is_peft(model) and hasattr(model, "merge_adapter")):
        m = latency_probe(model, tokenizer, prompts, n_warmup, n_reps, gen_tokens)
        base = dynamic = merged = m
    else:
        per_round = max(1, math.ceil(n_reps / rounds))
        raw: dict[str, list] = {v: [[], 0, 0.0] for v in ("base", "dynamic", "merged")}

        def add(variant: str) -> None:
            times, n_gen, gen_s = _time_model(model, tokenizer, prompts, n_warmup, per_round, gen_tokens)
            acc = raw[variant]
            acc[0] += times
            acc[1] += n_gen
            acc[2] += gen_s

        for _ in range(rounds):
            with model.disable_adapter():
                add("base")
            add("dynamic")
            model.merge_adapter()
            try:
                add("merged")
            finally:
                model.unmerge_adapter()
        base, dynamic, merged = (
            {"forward_ms": statistics.median(t) * 1000.0, "gen_tokens_per_s": n / s if n else None}
            for t, n, s in (raw["base"], raw["dynamic"], raw["merged"])
        )
    return {
        "latency_base_ms": base["forward_ms"],
        "latency_dynamic_ms": dynamic["forward_ms"],
        "latency_merged_ms": merged["forward_ms"],
        "gen_tokens_per_s_base": base["gen_tokens_per_s"],
        "gen_tokens_per_s_dynamic": dynamic["gen_tokens_per_s"],
        "gen_tokens_per_s_merged": merged["gen_tokens_per_s"],
        "latency_dynamic_overhead": dynamic["forward_ms"] / base["forward_ms"] - 1.0,
        "latency_merged_overhead": merged["forward_ms"] / base["forward_ms"] - 1.0,
    }
