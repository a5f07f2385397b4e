"""Serving N customer variants: one base with N adapters against N merged models.

For each N in ``eval.variants.counts`` the trained adapter is joined by N - 1 adapters of the same
config with independent weights (what N customers would have), all resident in one model, and
the phase measures:

- memory: the model's resident bytes with N adapters (CUDA allocated on a GPU; on a CPU the bytes
  of the parameter and buffer storages, 4-bit quantization state included, and the process RSS
  beside it) and the growth per added adapter, against N merged models (N x the exact tensor
  bytes of the merged checkpoint, ``serving.tensor_bytes``); on disk N x the adapter file
  against N x the checkpoint;
- switching: making another resident adapter active (``set_adapter``), loading one from disk
  (``load_adapter``) and swapping one in place (``peft.utils.hotswap.hotswap_adapter``), medians
  with a distribution-free 95% interval;
- mixed batches: one batch of ``batch`` requests, request i for variant i mod N (peft's
  ``adapter_names=``; at N = 1 the batch runs on the active adapter, as loaded), against the same
  batch on one merged model and on the base: prefill and
  per-token decode, timed round-robin with the latency probe's ABBA order, ratios with the paired
  interval of ``stats.ratio_interval``.

peft has mixed-adapter batches and hotswapping for LoRA only (LoRA, rsLoRA, DoRA, QLoRA here);
other adapters get memory and set/load times and say why the rest is missing.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from harness import stats
from harness.measure.memory import release_free_memory, sync
from harness.measure.serving import _measure, _settle, _Variants, rep_order

# variant adapters are named v1, v2, ...; the trained one keeps peft's name
TRAINED = "default"
# the timed states of a mixed-batch repetition, before the mixed batches (one per N)
BASE, MERGED = "base", "merged"
WHAT = ("N - 1 adapters of the trained adapter's config beside it, weights drawn at random with each "
        "tensor's standard deviation in the trained adapter")


def check_settings(settings: dict) -> str | None:
    """One line naming what is wrong with ``eval.variants``, else None (ranges are the schema's)."""
    if settings["enabled"] and not settings["counts"]:
        return "eval.variants.counts=[] is invalid; give at least one count, e.g. [1,8], or eval.variants.enabled=false"
    return None


def counts_of(settings: dict) -> list[int]:
    return sorted(set(settings["counts"]))


def supports_mixed(model: Any) -> str | None:
    """Why mixed-adapter batches and hotswap cannot run on ``model``, else None."""
    kinds = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in model.peft_config.values()}
    if kinds != {"LORA"}:
        return f"peft has mixed-adapter batches and hotswap for LoRA only (this adapter: {', '.join(sorted(kinds))})"
    return None


# -- memory ---------------------------------------------------------------------------------------


def _quant_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (absmax, code, a nested state's)."""
    if state is None:
        return []
    out = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    return out + _quant_tensors(getattr(state, "state2", None))


def storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers (shared and tied
    storages once), with 4-bit weights' quantization state: what its tensors hold in memory."""
    seen: dict[tuple, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        for x in [t, *_quant_tensors(getattr(t, "quant_state", None))]:
            st = x.untyped_storage()
            seen[(x.device.type, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def resident_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """The memory the model takes as loaded: CUDA allocated bytes on a GPU, storage bytes on a CPU."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        return int(torch.cuda.memory_allocated(device))
    return storage_bytes(model)


def _rss_bytes(device: torch.device) -> int:
    import psutil

    release_free_memory(device)
    return int(psutil.Process().memory_info().rss)


def adapter_tensor_bytes(model: Any, name: str) -> int:
    """Bytes of one adapter's tensors, as peft saves them (``get_peft_model_state_dict``)."""
    from peft import get_peft_model_state_dict

    return sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(model, adapter_name=name).values())


def add_variant(model: Any, name: str, seed: int) -> None:
    """A new resident adapter of the trained one's config, its weights independent: every tensor
    drawn from a normal at the trained tensor's standard deviation (DoRA's magnitudes copied: they
    are weight norms, not noise)."""
    model.add_adapter(name, model.peft_config[TRAINED])
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for pname, p in named.items():
            parts = pname.split(".")
            if name not in parts:
                continue
            ref = named[".".join(TRAINED if x == name else x for x in parts)].float()
            if "magnitude" in pname:
                p.copy_(ref)
            else:
                std = float(ref.std()) if ref.numel() > 1 else 0.0
                p.copy_((torch.randn(p.shape, generator=gen) * (std or 1e-3)).to(p.dtype))
    model.set_adapter(TRAINED)


# -- switching ------------------------------------------------------------------------------------


def _timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _median(values: list[float]) -> dict:
    lo, hi = stats.median_interval(values) if len(values) > 1 else (None, None)
    return {"median_s": statistics.median(values), "ci_s": [lo, hi], "n": len(values)}


def time_switching(model: Any, names: Sequence[str], saved: Path, reps: int, device: torch.device,
                   hotswap: bool) -> dict:
    """``set_adapter`` to each other resident adapter in turn, ``load_adapter`` of the saved
    trained adapter under a new name (then deleted, untimed), and ``hotswap_adapter`` of that file
    into the trained adapter (the same weights: the copy is timed, nothing changes)."""
    out: dict = {}
    order = [n for n in names if n != TRAINED] or [TRAINED]
    targets = [order[i % len(order)] for i in range(reps)]
    out["set_adapter"] = _median([_timed(lambda n=n: model.set_adapter(n), device) for n in targets])
    model.set_adapter(TRAINED)
    loads = []
    for _ in range(reps):
        loads.append(_timed(lambda: model.load_adapter(str(saved), adapter_name="probe"), device))
        model.delete_adapter("probe")
    out["load_adapter"] = _median(loads)
    if hotswap:
        from peft.utils.hotswap import hotswap_adapter

        out["hotswap_adapter"] = _median([
            _timed(lambda: hotswap_adapter(model, str(saved), adapter_name=TRAINED, torch_device=str(device)), device)
            for _ in range(reps)])
    model.set_adapter(TRAINED)
    return out


# -- mixed batches --------------------------------------------------------------------------------


def batch_inputs(tokenizer: Any, prompts: Sequence, batch: int, device: torch.device) -> torch.Tensor:
    """``batch`` requests of one length (no padding to time): the prompts' token ids cut to the
    shortest, cycled when there are fewer prompts than requests."""
    ids = [tokenizer(p)["input_ids"] if tokenizer is not None else list(p) for p in prompts]
    length = min(len(i) for i in ids)
    rows = [ids[i % len(ids)][:length] for i in range(batch)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def mixed_names(n: int, batch: int) -> list[str]:
    """Request i of a batch asks for variant i mod n (the trained adapter first)."""
    names = [TRAINED] + [f"v{k}" for k in range(1, n)]
    return [names[i % n] for i in range(batch)]


def time_mixed(model: Any, inputs: torch.Tensor, counts: Sequence[int], reps: int, new_tokens: int,
               pad: int, warmup: int = 1) -> dict:
    """Seconds per repetition of the batch on the base, on the merged trained adapter and as a
    mixed batch at every N of ``counts``, timed round-robin (ABBA: merged at one end, so one
    merge-state change per repetition); ``{state: {"prefill": [..], "decode": [..]}}``."""
    states = [BASE, *(f"mixed:{n}" for n in counts), MERGED]
    variants = _Variants(model)
    batch = inputs.shape[0]
    times: dict[str, dict[str, list]] = {s: {"prefill": [], "decode": []} for s in states}

    def run(state: str) -> tuple[float, float | None]:
        names = mixed_names(int(state.split(":")[1]), batch) if state.startswith("mixed:") else []
        # a batch for one variant is served as loaded, as a server would; peft's per-request
        # routing (adapter_names) only where the requests ask for several (it costs +18% prefill
        # on SmolLM2-135M even with one adapter: benchmarks/bench_variants.py)
        kw = {"adapter_names": names} if len(set(names)) > 1 else {}
        return _measure(model, [inputs], new_tokens, pad, **kw)

    was_training = model.training
    model.eval()
    try:
        # untimed first calls, unmerged: the merged state's warm-up is the forward _settle runs
        # after every merge (the first merge re-quantizes QLoRA's 4-bit weights; later ones swap, _Variants)
        for state in reversed(states[:-1]):
            variants.set(BASE if state == BASE else "dynamic")
            for _ in range(warmup):
                run(state)
        for rep in range(reps):
            for state in rep_order(rep, states):
                if variants.set(MERGED if state == MERGED else BASE if state == BASE else "dynamic"):
                    _settle(model, [inputs])
                prefill, decode = run(state)
                times[state]["prefill"].append(prefill)
                times[state]["decode"].append(decode)
    finally:
        variants.close()
        model.train(was_training)
    return times


def _ratio(numer: list, denom: list) -> dict:
    if not numer or numer[0] is None:
        return {"ratio": None, "ci": [None, None]}
    ratio, lo, hi = stats.ratio_interval(numer, denom)
    return {"ratio": ratio, "ci": [lo, hi]}


def mixed_metrics(times: dict, n: int, batch: int) -> dict:
    """Medians (ms), decode throughput (tokens/s over the batch) and the mixed batch's ratios to
    the merged model and to the base, with their paired 95% intervals."""
    mixed = times[f"mixed:{n}"]
    out: dict = {}
    for state, t in (("mixed", mixed), (MERGED, times[MERGED]), (BASE, times[BASE])):
        out[f"{state}_prefill_ms"] = statistics.median(t["prefill"]) * 1000.0
        decode = None if t["decode"][0] is None else statistics.median(t["decode"])
        out[f"{state}_decode_ms_per_token"] = None if decode is None else decode * 1000.0
        out[f"{state}_decode_tokens_per_s"] = None if decode is None else batch / decode
    for phase in ("prefill", "decode"):
        out[f"mixed_vs_merged_{phase}"] = _ratio(mixed[phase], times[MERGED][phase])
        out[f"mixed_vs_base_{phase}"] = _ratio(mixed[phase], times[BASE][phase])
    return out


# -- the phase ------------------------------------------------------------------------------------


def full_model_variants(counts: Sequence[int], footprint: dict) -> list[dict]:
    """Full fine-tuning serves N variants as N checkpoints: their disk and memory, N x the measured
    checkpoint bytes (no adapter, no switching other than loading a whole model)."""
    full = footprint.get("full_checkpoint_bytes")
    return [{"n": n, "merged_bytes": None if full is None else n * full,
             "merged_disk_bytes": None if full is None else n * full} for n in counts]


def measure_variants(model: Any, tokenizer: Any, prompts: Sequence, settings: dict, footprint: dict,
                     seed: int = 0) -> tuple[list[dict], dict]:
    """The record's ``variants`` list (one entry per N) and ``variants_settings``; the model is
    left as it came (only the trained adapter, active, unmerged)."""
    device = next(model.parameters()).device
    counts = counts_of(settings)
    mixed_reason = supports_mixed(model)
    pad = next((p for p in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if p is not None), 0)
    one_adapter = adapter_tensor_bytes(model, TRAINED)
    full, adapter_file = footprint.get("full_checkpoint_bytes"), footprint.get("adapter_bytes")
    entries: list[dict] = []
    added: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="harness-variant-") as tmp:
            model.save_pretrained(tmp, selected_adapters=[TRAINED], safe_serialization=True)
            # once untimed: first calls import and allocate what the RSS must not count as adapters
            time_switching(model, [TRAINED], Path(tmp), 1, device, hotswap=mixed_reason is None)
            add_variant(model, "warmup", seed)
            model.delete_adapter("warmup")
            first_resident = resident_bytes(model, device)
            rss_growth = 0  # the RSS added by the adapters' additions alone (switching's churn is not theirs)
            for n in counts:
                adding = device.type == "cpu" and len(added) < n - 1  # no addition: no RSS reading's noise
                before = _rss_bytes(device) if adding else 0
                while len(added) < n - 1:
                    name = f"v{len(added) + 1}"
                    add_variant(model, name, seed * 100003 + len(added) + 1)
                    added.append(name)
                rss_growth += (_rss_bytes(device) - before) if adding else 0
                resident = resident_bytes(model, device)
                entry = {
                    "n": n,
                    "resident_bytes": resident,
                    "adapter_growth_bytes": (resident - first_resident) / (n - 1) if n > 1 else None,
                    "rss_growth_bytes": rss_growth if device.type == "cpu" else None,
                    "adapters_disk_bytes": None if adapter_file is None else n * adapter_file,
                    "merged_bytes": None if full is None else n * full,
                    "merged_disk_bytes": None if full is None else n * full,
                    "switching": time_switching(model, [TRAINED, *added], Path(tmp), settings["switch_reps"],
                                                device, hotswap=mixed_reason is None),
                }
                entries.append(entry)
        if mixed_reason is None:
            inputs = batch_inputs(tokenizer, prompts, settings["batch"], device)
            times = time_mixed(model, inputs, counts, settings["reps"], settings["gen_tokens"], pad)
            for entry in entries:
                entry.update(mixed_metrics(times, entry["n"], settings["batch"]))
            prompt_tokens = int(inputs.shape[1])
        else:
            prompt_tokens = None
    finally:
        for name in added:
            model.delete_adapter(name)
        model.set_adapter(TRAINED)
    summary = {
        "memory_measure": "CUDA allocated" if device.type == "cuda" else "tensor storage bytes",
        "adapter_tensor_bytes": one_adapter,
        "base_and_one_adapter_bytes": first_resident,
        "variants": WHAT,
        "batch": settings["batch"], "prompt_tokens": prompt_tokens, "new_tokens": settings["gen_tokens"],
        "reps": settings["reps"], "switch_reps": settings["switch_reps"],
        "mixed_batches": mixed_reason or "measured",
    }
    return entries, summary
