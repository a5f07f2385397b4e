"""Serving footprint (adapter vs full checkpoint) and inference latency (base, merged, dynamic)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from harness import stats
from harness.measure.memory import sync

# in the order of even latency repetitions (``rep_order``): merged last, so one merge-state change per repetition
VARIANTS = ("base", "dynamic", "merged")


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_nb_trainable_parameters")


# -- footprint ------------------------------------------------------------------------------------


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


def _is_4bit_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit (subclasses nn.Linear, so its in/out features are the true shape)
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def _tensors(module: torch.nn.Module, adapter: bool = False) -> Iterator[tuple[torch.Tensor, bool, int | None]]:
    """(tensor, is_adapter, unpacked numel) for every parameter and persistent buffer that a state
    dict holds; the unpacked numel is the weight's true element count where its storage is packed
    (a 4-bit weight), else None.

    peft's tuner layers (LoRA, IA3, ..., ``modules_to_save``, trainable tokens) name the children
    that hold adapter weights in ``adapter_layer_names``; everything else is the base model.
    """
    packed = _is_4bit_linear(module)
    for name, t in module._parameters.items():
        if t is not None:
            # from the module's shape, not the tensor's quant_state: under FSDP2 the weight is a
            # DTensor of the packed bytes without quant_state (~4x too small if sized from it)
            yield t, adapter, module.in_features * module.out_features if packed and name == "weight" else None
    for name, t in module._buffers.items():
        if t is not None and name not in module._non_persistent_buffers_set:
            yield t, adapter, None
    adapter_children = {n.split(".")[0] for n in getattr(module, "adapter_layer_names", ())}
    for name, child in module._modules.items():
        if child is not None:
            yield from _tensors(child, adapter or name in adapter_children)


def _serving_bytes(t: torch.Tensor, dtype: torch.dtype, unpacked: int | None = None) -> int:
    # 4-bit weights (bitsandbytes Params4bit) are packed; the merged model stores their full shape
    if unpacked is not None:
        return unpacked * dtype.itemsize
    # a ZeRO-3 partitioned parameter is empty on each rank; ds_numel is its whole size (an FSDP2
    # DTensor's numel already is)
    numel = int(getattr(t, "ds_numel", t.numel()))
    # save_pretrained in a dtype casts the floating tensors; integer buffers keep theirs
    return numel * (dtype.itemsize if t.is_floating_point() else t.element_size())


def tensor_bytes(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """Exact bytes of tensor data of the full (merged) checkpoint and of the adapter, in ``dtype``.

    ``checkpoint``: what ``save_pretrained`` writes for a fully fine-tuned model, or for a PEFT
    model after ``merge_and_unload()``: every parameter and persistent buffer of the base model
    (tied weights once, adapter weights excluded: merging folds them into the base weights),
    floating-point tensors in ``dtype``. ``adapter``: the adapter's tensors in ``dtype`` (None when
    the model is not PEFT). A safetensors file adds only its JSON header (8 bytes + a few KiB).
    Both are None under FSDP1, whose flat parameter shards do not show the parameters' shapes.
    """
    base = model.get_base_model() if _is_peft(model) else model
    seen: set[int] = set()
    total = {False: 0, True: 0}
    tensors = list(_tensors(base))
    if any(getattr(t, "_is_flat_param", False) for t, _, _ in tensors):
        # FSDP1 flattens parameters into per-rank shards with views of varying size: not counted
        return {"checkpoint": None, "adapter": None}
    for t, is_adapter, unpacked in tensors:
        if id(t) in seen:  # tied weights are one tensor, saved once
            continue
        seen.add(id(t))
        total[is_adapter] += _serving_bytes(t, dtype, unpacked)
    return {"checkpoint": total[False], "adapter": total[True] if _is_peft(model) else None}


def serve_dtype(method_cfg: dict, weights_dtype: torch.dtype, train_dtype: torch.dtype) -> torch.dtype:
    """The dtype a variant is served in: QLoRA's compute dtype; else the weights' dtype when it
    is narrower than fp32 (a bf16 frozen base); else the training dtype (bf16 where training ran
    in bf16, fp32 on a CPU)."""
    if method_cfg.get("quantize"):
        return getattr(torch, method_cfg["compute_dtype"])
    return weights_dtype if weights_dtype.itemsize < 4 else train_dtype


def footprint_metrics(model: torch.nn.Module, dtype: torch.dtype, state_dict: dict | None = None) -> dict:
    """The serving footprint for the record, in the serving ``dtype`` (``serve_dtype``).

    ``adapter_bytes``: the adapter file as saved (its trained dtype); ``adapter_serving_bytes`` and
    ``full_checkpoint_bytes``: exact tensor bytes in ``dtype`` (``tensor_bytes``), so their ratio
    compares like with like. For QLoRA the merged model is stored in its compute dtype, not 4-bit.
    """
    sizes = tensor_bytes(model, dtype)
    return {
        "adapter_bytes": adapter_bytes(model, state_dict),
        "adapter_serving_bytes": sizes["adapter"],
        "full_checkpoint_bytes": sizes["checkpoint"],
        "full_checkpoint_bytes_estimated": False,
        "serving_dtype": str(dtype).removeprefix("torch."),
    }


# -- latency --------------------------------------------------------------------------------------


def _encode(tokenizer: Any, prompts: Sequence, device: torch.device) -> list[torch.Tensor]:
    # without a tokenizer, prompts are token-id lists
    if tokenizer is None:
        return [torch.tensor([list(p)], dtype=torch.long, device=device) for p in prompts]
    return [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in prompts]


class _Stamps:
    """A logits processor that only notes the time: generate calls it once per new token, right
    after the forward that produced that token's logits."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def _measure(model: Any, inputs: list[torch.Tensor], new_tokens: int, pad: int, **kwargs) -> tuple[float, float | None]:
    """(prefill seconds per prompt, decode seconds per new token) of the model as it is now;
    ``kwargs`` go to every forward and ``generate`` (a mixed batch's ``adapter_names``).

    Prefill: one timed forward of each prompt (batch 1, building the KV cache). Decode: greedy
    ``generate`` of ``new_tokens`` + 1 tokens with the KV cache; the time from the first token's
    logits to the last one's, over ``new_tokens`` (the prompt's forward is not in it).
    """
    from transformers import LogitsProcessorList

    device = inputs[0].device
    prefill, decode = [], 0.0
    with torch.inference_mode():
        for ids in inputs:
            sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, **kwargs)
            sync(device)
            prefill.append(time.perf_counter() - t0)
            if new_tokens > 0:
                stamps = _Stamps(device)
                # min_new_tokens: an early EOS must not shorten the count
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1,
                               min_new_tokens=new_tokens + 1, do_sample=False, use_cache=True, pad_token_id=pad,
                               logits_processor=LogitsProcessorList([stamps]), **kwargs)
                decode += stamps.times[-1] - stamps.times[0]
    return statistics.fmean(prefill), decode / (new_tokens * len(inputs)) if new_tokens > 0 else None


class _Variants:
    """Puts a PEFT model into the base / merged / dynamic state; a non-PEFT model is all three.

    Merging or unmerging a 4-bit layer (QLoRA) in peft dequantizes, adds or subtracts and
    re-quantizes: ~1.6-1.9 s for SmolLM2-135M on a CPU, and the base's 4-bit weights drift from the originals
    with every cycle. The first merge runs peft's and keeps both sets of packed weights, the
    original and the merged (one set more than the model holds: +0.5 byte per 4-bit parameter,
    for the probe's duration); later merges and every unmerge swap them: exact, and one
    re-quantization per probe instead of two per cycle.
    """

    def __init__(self, model: Any):
        self.model, self.peft = model, _is_peft(model) and hasattr(model, "merge_adapter")
        self.merged, self.disabled = False, None
        # 4-bit tuner layer -> (original weight, merged weight, merged adapters) of its base layer
        self.packed: dict = {}

    def _tuner_layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def _merge(self) -> None:
        if self.packed:
            for layer, (_, merged, adapters) in self.packed.items():
                layer.get_base_layer().weight = merged
                layer.merged_adapters[:] = adapters
            return
        layers = [m for m in self._tuner_layers() if _is_4bit_linear(m.get_base_layer())]
        originals = [m.get_base_layer().weight for m in layers]
        self.model.merge_adapter()
        self.packed = {m: (w, m.get_base_layer().weight, list(m.merged_adapters)) for m, w in zip(layers, originals)}

    def _unmerge(self) -> None:
        for layer, (original, _, _) in self.packed.items():
            layer.get_base_layer().weight = original
            layer.merged_adapters.clear()
        if any(m.merged for m in self._tuner_layers()):
            self.model.unmerge_adapter()

    def set(self, variant: str) -> bool:
        """Put the model in ``variant``; True when that changed its weights (merge or unmerge)."""
        if not self.peft:
            return False
        if self.disabled is not None:
            self.disabled.__exit__(None, None, None)
            self.disabled = None
        changed = (variant == "merged") != self.merged
        with torch.no_grad():  # merging edits weights in place, outside inference mode
            if variant == "merged" and not self.merged:
                self._merge()
            elif variant != "merged" and self.merged:
                self._unmerge()
        self.merged = variant == "merged"
        if variant == "base":
            self.disabled = self.model.disable_adapter()
            self.disabled.__enter__()
        return changed

    def close(self) -> None:
        self.set("dynamic")
        self.packed = {}  # the merged copy goes; the adapters may change after the probe


def _settle(model: Any, inputs: list[torch.Tensor]) -> None:
    """One untimed forward after the weights changed: its one-off costs are not serving latency
    (bitsandbytes re-packs merged 4-bit weights for its CPU kernel on the first call, ~2x a prefill)."""
    with torch.inference_mode():
        model(input_ids=inputs[0], use_cache=True)
    sync(inputs[0].device)


def rep_order(rep: int, names: Sequence[str]) -> tuple[str, ...]:
    """The variants' order in repetition ``rep``: as named, then reversed, alternately (ABBA).
    Each variant is measured before and after every other one equally often, and the merge
    state changes once per repetition (base and dynamic share the unmerged weights): half the
    merges of a rotation (and ``_Variants`` re-quantizes QLoRA's 4-bit weights once per probe, not per change)."""
    return tuple(names) if rep % 2 == 0 else tuple(reversed(names))


def compare_latency(model: torch.nn.Module, tokenizer: Any, prompts: Sequence, reps: int = 12,
                    new_tokens: int = 8, warmup: int = 1) -> dict:
    """The record's latency fields: ``time_variants`` summarized by ``latency_metrics``."""
    return latency_metrics(time_variants(model, tokenizer, prompts, reps, new_tokens, warmup))


def time_variants(model: torch.nn.Module, tokenizer: Any, prompts: Sequence, reps: int = 12,
                  new_tokens: int = 8, warmup: int = 1) -> dict:
    """Prefill and per-token decode latency of the base model, the merged and the dynamic adapter.

    PEFT (LoRA-style) models: base inside ``model.disable_adapter()``, dynamic as is (the adapter's
    extra matmuls run at every call), merged after ``merge_adapter()`` (``unmerge_adapter()``
    restores the model). The variants run round-robin: each of ``reps`` repetitions measures every
    variant once, in the alternating order of ``rep_order``, so a slow spell of a shared machine
    hits all of them and each repetition gives a paired ratio; after a merge or unmerge one
    untimed forward (``_settle``) takes the weights' one-off first-call costs out of the timing.
    An overhead is ``ratio - 1`` with the ratio and its 95% interval from ``stats.ratio_interval``
    over the repetitions' ratios. Call it after
    evaluation: with 4-bit base weights merging re-quantizes, so unmerge is not bit-exact.
    Other models (full fine-tuning): the model is its own base, merged and dynamic; measured once
    per repetition, overheads 0. ``prompts`` are strings for ``tokenizer``, or token-id lists when
    ``tokenizer`` is None. Returns the raw seconds, ``{"times": {variant: {"prefill": [per rep],
    "decode": [per rep, per token]}}}`` with the probe's settings.
    """
    device = next(model.parameters()).device
    inputs = _encode(tokenizer, prompts, device)
    pad = next((p for p in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if p is not None), 0)
    variants = _Variants(model)
    names = VARIANTS if variants.peft else ("base",)
    was_training = model.training
    model.eval()
    times: dict[str, dict[str, list]] = {v: {"prefill": [], "decode": []} for v in names}
    try:
        # untimed: first calls allocate and pick kernels; in reverse, to end unmerged as rep 0 starts
        for variant in reversed(names):
            variants.set(variant)
            for _ in range(warmup):
                _measure(model, inputs, new_tokens, pad)
        for rep in range(reps):
            for variant in rep_order(rep, names):
                if variants.set(variant):
                    _settle(model, inputs)
                prefill, decode = _measure(model, inputs, new_tokens, pad)
                times[variant]["prefill"].append(prefill)
                times[variant]["decode"].append(decode)
    finally:
        variants.close()
        model.train(was_training)
    return {"times": times, "reps": reps, "prompts": len(inputs),
            "prompt_tokens": statistics.fmean(ids.shape[1] for ids in inputs), "new_tokens": new_tokens}


def latency_metrics(timed: dict) -> dict:
    """Medians (ms) and overheads with their 95% intervals from ``time_variants``' raw times."""
    times, new_tokens = timed["times"], timed["new_tokens"]
    out = {"latency_reps": timed["reps"], "latency_prompts": timed["prompts"],
           "latency_prompt_tokens": timed["prompt_tokens"], "latency_new_tokens": new_tokens}
    for phase, unit in (("prefill", "ms"), ("decode", "ms_per_token")):
        base = times["base"][phase]
        measured = new_tokens > 0 or phase == "prefill"
        for variant in VARIANTS:
            values = times.get(variant, times["base"])[phase]
            out[f"latency_{phase}_{variant}_{unit}"] = statistics.median(values) * 1000.0 if measured else None
            if variant == "base":
                continue
            if not measured:
                ratio = lo = hi = None
            elif variant in times:
                ratio, lo, hi = stats.ratio_interval(values, base)
            else:  # full fine-tuning: the same model, nothing to merge
                ratio = lo = hi = 1.0
            key = f"latency_{phase}_{variant}_overhead"
            for k, v in ((key, ratio), (f"{key}_ci_low", lo), (f"{key}_ci_high", hi)):
                out[k] = v - 1.0 if v is not None else None
    return out
