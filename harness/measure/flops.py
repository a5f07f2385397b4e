"""Parameter counts, FLOPs per token, token counts, the device's matmul peak (measured once per
hardware, cached), throughput and MFU."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from harness.measure.memory import sync


def param_counts(model: torch.nn.Module) -> dict:
    """Trainable and total parameters as peft prints them.

    PEFT models: ``model.get_nb_trainable_parameters()`` (counts a 4-bit packed weight as its
    unpacked size, and a ZeRO-3 partitioned one as its ``ds_numel``). Other models:
    ``requires_grad`` parameters over all parameters, each counted by ``models.param_numel``.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        from harness.models import param_numel

        trainable = sum(param_numel(p) for p in model.parameters() if p.requires_grad)
        total = sum(param_numel(p) for p in model.parameters())
    return {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": trainable / total if total else None,
    }


def embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the input embedding when it is a lookup table apart from the output layer.

    A lookup costs no FLOPs, so ``flops_per_token`` subtracts it. Tied embeddings (same storage
    as the output projection) do a matmul in the output layer and stay counted: returns 0.
    """
    try:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return 0
    if emb is None or getattr(emb, "weight", None) is None:
        return 0
    w_out = getattr(out, "weight", None) if out is not None else None
    if w_out is not None and w_out.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr():
        return 0
    return int(emb.weight.numel())


def flops_per_token(
    method: str,
    total_params: int,
    trainable_params: int,
    *,
    embedding_params: int = 0,
    n_layers: int = 0,
    seq_len: int = 0,
    hidden_size: int = 0,
) -> float:
    """Training FLOPs per token (multiply-add = 2 FLOPs), the dense-matmul estimate.

    With N = total_params - embedding_params (the weights that take part in a matmul, adapters
    included) and N_t = trainable_params:

    - forward:                          2·N   (every weight does one multiply-add per token)
    - backward, input gradients:        2·N   (dL/dx through every layer, frozen or not)
    - backward, weight gradients:       2·N_t (dL/dW only for trainable weights)

    so FLOPs/token = 4·N + 2·N_t. Full fine-tuning (N_t = N) gives the familiar 6·N; LoRA and
    QLoRA (N_t = adapter params, a small share) give ≈ 4·N + 2·N_adapter, about 2/3 of full FT.
    The adapter's own forward and input-gradient FLOPs are inside N because its parameters are
    counted in total_params. QLoRA counts its 4-bit base weights at their unpacked size
    (dequantization is not counted). Gradient checkpointing recomputes the forward (+2·N) but
    that is hardware work, not model work, so it is not counted (MFU convention).

    Attention score FLOPs (QKᵀ and AV, no weights) are added when ``n_layers``, ``seq_len`` and
    ``hidden_size`` are given: 2·2·n_layers·seq_len·hidden_size per token forward (upper bound:
    causal masking is not discounted), and twice that backward (input gradients only), i.e.
    12·n_layers·seq_len·hidden_size, the same for every method.
    """
    if method == "base":
        raise ValueError("method 'base' does not train; flops_per_token is for full, lora, qlora or other PEFT")
    if trainable_params > total_params or trainable_params < 0:
        raise ValueError(f"trainable_params {trainable_params} must be between 0 and total_params {total_params}")
    n = total_params - embedding_params
    n_t = min(trainable_params, n)
    attention = 12 * n_layers * seq_len * hidden_size
    return float(4 * n + 2 * n_t + attention)


def measure_peak_flops(
    device: torch.device | str, dtype: torch.dtype, size: int | None = None, reps: int | None = None, warmup: int = 2
) -> float:
    """Achievable dense-matmul FLOP/s of one device in ``dtype``: a timed ``size``×``size`` product.

    Defaults: 2048 on CPU, 8192 on CUDA. Each of ``reps`` trials times a batch of products (1 on
    CPU, 10 on CUDA, synchronized) after ``warmup`` untimed ones; the fastest trial counts.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = size or (8192 if cuda else 2048)
    reps = reps or (5 if cuda else 3)
    inner = 10 if cuda else 1
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * inner / best


# The cached peak: a larger product and more trials than a per-run probe could afford, since it is
# timed once per hardware (device name, dtype, torch version; on CPU also the thread count).
PEAK_SIZE = {"cuda": 8192, "cpu": 2048}
PEAK_REPS = {"cuda": 30, "cpu": 10}


def peak_cache_dir() -> Path:
    """Where measured peaks are kept: ``<harness cache>/peak-flops`` (``PEFT_HARNESS_CACHE``)."""
    from harness.models import cache_dir

    return cache_dir() / "peak-flops"


def peak_hardware(device: torch.device | str, dtype: torch.dtype) -> dict:
    """What a matmul peak belongs to: the device's name, dtype, torch version (and on CPU the torch
    thread count, which sets how many cores the product runs on)."""
    device = torch.device(device)
    if device.type == "cuda":
        name, threads = torch.cuda.get_device_name(device), None
    else:
        from harness.measure.environment import cpu_name

        name, threads = cpu_name(), torch.get_num_threads()
    return {"device": device.type, "device_name": name, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "threads": threads}


def device_peak_flops(device: torch.device | str, dtype: torch.dtype, cache: str | Path | None = None) -> dict:
    """The device's dense-matmul peak in ``dtype``, measured once per hardware and cached.

    The first call for a hardware (``peak_hardware``) times ``measure_peak_flops`` with
    ``PEAK_SIZE``/``PEAK_REPS`` under a file lock (so concurrent jobs time it once, not against
    each other) and writes it atomically to ``<cache>/<key>.json``; every later call reads it.
    Delete the file to measure again. Returns ``peak_flops_per_s``, ``peak_flops_source``
    ("measured now" or "cached"), ``peak_flops_measured_at`` (UTC) and ``peak_flops_hardware``.
    """
    from filelock import FileLock

    from harness.records import stable_hash

    hardware = peak_hardware(device, dtype)
    folder = Path(cache) if cache is not None else peak_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stable_hash(hardware)[:16]}.json"
    with FileLock(str(path) + ".lock"):
        try:
            saved = json.loads(path.read_text())
            if saved.get("hardware") == hardware and saved.get("peak_flops_per_s", 0) > 0:
                return {**_peak_fields(saved), "peak_flops_source": "cached"}
        except (OSError, ValueError):
            pass  # not measured yet, or unreadable: measure
        kind = torch.device(device).type
        size, reps = PEAK_SIZE.get(kind, 2048), PEAK_REPS.get(kind, 10)
        saved = {"hardware": hardware, "size": size, "reps": reps,
                 "peak_flops_per_s": measure_peak_flops(device, dtype, size=size, reps=reps),
                 "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(saved, fh)
        os.replace(tmp, path)
    return {**_peak_fields(saved), "peak_flops_source": "measured now"}


def _peak_fields(saved: dict) -> dict:
    return {"peak_flops_per_s": float(saved["peak_flops_per_s"]), "peak_flops_measured_at": saved["measured_at"],
            "peak_flops_hardware": saved["hardware"]}


def padded_tokens(global_step: int, args, seq_len: int) -> int:
    """Token positions trained, padding included: optimizer steps × sequences per step (per-device
    batch × gradient accumulation × processes) × ``seq_len``. Exact here because the collator
    pads every sequence to ``seq_len`` (``train.build_trainer``)."""
    per_step = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size)
    return int(global_step) * per_step * int(seq_len)


def datasheet_metrics(hardware: dict, achieved_flops_per_s: float | None, train_dtype: str, device_count: int) -> dict:
    """The datasheet dense bf16 peak of the hardware preset (GPU presets), beside the measured one,
    and MFU against it (bf16 training only: the datasheet figure is a bf16 one)."""
    tflops = hardware.get("datasheet_bf16_dense_tflops")
    peak = float(tflops) * 1e12 if tflops else None
    return {
        "datasheet_peak_flops_per_s": peak,
        "datasheet_peak_source": hardware.get("datasheet_source") if peak else None,
        "mfu_datasheet": achieved_flops_per_s / (peak * device_count)
        if peak and achieved_flops_per_s and train_dtype == "bfloat16" else None,
    }


def flops_metrics(
    flops_per_token: float, tokens_per_s: float | None, peak_flops_per_s: float | None, device_count: int = 1
) -> dict:
    """achieved = flops_per_token × tokens_per_s (all devices); mfu = achieved / (peak × devices)."""
    achieved = flops_per_token * tokens_per_s if tokens_per_s else None
    mfu = achieved / (peak_flops_per_s * device_count) if achieved and peak_flops_per_s else None
    return {
        "flops_per_token": flops_per_token,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_flops_per_s,
        "mfu": mfu,
    }


def run_flops_metrics(flops_per_token: float, tokens_per_s: float | None, peaks_per_rank: list, hardware: dict,
                      train_dtype: str, world: int) -> dict:
    """A finished run's FLOPs figures over all its devices: achieved FLOP/s and MFU against the
    measured matmul peak (mean over ranks) and against the datasheet, and the per-device rates."""
    peaks = [p for p in peaks_per_rank if p]
    out = flops_metrics(flops_per_token, tokens_per_s, statistics.fmean(peaks) if peaks else None, world)
    out.update(datasheet_metrics(hardware, out["achieved_flops_per_s"], train_dtype, world))
    out["tokens_per_s_per_device"] = tokens_per_s / world if tokens_per_s else None
    out["achieved_flops_per_s_per_device"] = out["achieved_flops_per_s"] / world if out["achieved_flops_per_s"] else None
    return out
