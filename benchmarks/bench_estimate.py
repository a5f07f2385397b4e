"""How wrong is harness-estimate? Estimated vs tracked memory of real training steps, per category.

Each grid point is a harness config (the same compose as harness-run). It is estimated
(``harness.estimate.estimate_job``) and then trained for 2 steps through the harness's own path
(``load_model`` -> ``apply_method`` -> ``build_trainer`` with ``MeasureCallback``), whose
``MemoryBreakdown`` tracks step 1 (optimizer state exists by then). Printed per point: estimated
and measured bytes per category and in total, and the error (estimate / measured - 1).
Targets: total within 10% at every point, each category within 15% (categories under 2% of the
measured total are shown but not held to the target: there a few KiB are a large share).

The grid: per architecture (tiny-random: Llama with grouped-query attention; tiny-qwen2: Qwen2
with attention biases and tied embeddings; SmolLM2-135M, the real model) and method (full, LoRA,
QLoRA), a base point (batch 2, seq 64, no gradient checkpointing, r=8) and one change at a time:
batch 4, seq 128, gradient checkpointing, r=16 (PEFT only). fp32 on CPU, as harness-run trains
here.

    flock /tmp/harness-cpu.lock .venv/bin/python -m benchmarks.bench_estimate [--models tiny-random,...]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from harness import estimate
from harness.data import load_data
from harness.measure import callback, flops, memory
from harness.methods import apply_method, normalize, quantization_config
from harness.models import load_model
from harness.train import build_trainer, training_features

CATEGORIES = memory.CATEGORIES
MODELS = ("tiny-random", "tiny-qwen2", "smollm2-135m")
METHODS = ("full", "lora", "qlora")
BASE = {"train.batch_size": 2, "train.seq_len": 64, "train.gradient_checkpointing": False, "method.r": 8}
CHANGES = ({}, {"train.batch_size": 4}, {"train.seq_len": 128}, {"train.gradient_checkpointing": True},
           {"method.r": 16})
SMALL_SHARE = 0.02  # categories under this share of the measured total are not held to the target


def point_config(model: str, method: str, change: dict) -> dict:
    settings = {**BASE, **change}
    overrides = [f"model={model}", f"method={method}", "hardware=cpu", "train.precision=fp32",
                 "train.max_steps=2", "train.warmup_steps=0", "data.n_train=16",
                 *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())]
    return estimate.resolved(estimate.compose(overrides))


def padded(cfg: dict) -> bool:
    """Whether the training rows are padded to seq_len (then SDPA gets a mask): an input of the
    estimate that depends on the data, so it is read from the data, as a user would."""
    from transformers import AutoTokenizer

    from harness.data import tokenize_examples
    from harness.models import model_folder

    examples = load_data(cfg["data"]).train
    tok = AutoTokenizer.from_pretrained(model_folder(cfg["model"])[0])
    seq = int(cfg["train"]["seq_len"])
    return any(len(f["input_ids"]) < seq for f in tokenize_examples(examples, tok, seq, cfg["data"])[0])


def measure_point(cfg: dict) -> dict:
    """Train 2 steps through the harness and return step 1's tracked breakdown."""
    method = normalize(cfg["method"])
    examples = load_data(cfg["data"]).train
    torch.manual_seed(0)
    loaded = load_model(cfg["model"], quantization_config=quantization_config(method))
    model = apply_method(loaded.model, method, bool(cfg["train"]["gradient_checkpointing"]))
    probe = callback.MeasureCallback(warmup_steps=1, breakdown_step=1)
    features, _ = training_features(examples, loaded.tokenizer, cfg["train"], cfg["data"])
    trainer = build_trainer(model, loaded.tokenizer, features, cfg["train"], float(method["learning_rate"]), seed=0,
                            callbacks=[probe], label="bench")
    try:
        trainer.train()
    finally:
        probe.close()
    out = {"breakdown": probe.breakdown["memory_breakdown_bytes"], "peak": probe.breakdown["memory_breakdown_peak_bytes"],
           "params": flops.param_counts(model)}
    del trainer, model, loaded
    gc.collect()
    return out


def errors(est: dict, meas: dict) -> dict:
    """Relative error per category and of the total; None where the measured value is 0."""
    out = {}
    for c in CATEGORIES:
        m, e = meas["breakdown"][c], est["breakdown"][c]
        out[c] = None if m == 0 else e / m - 1
    out["total"] = est["peak_memory_bytes"] / meas["peak"] - 1
    return out


def judged(est: dict, meas: dict, errs: dict) -> tuple[bool, bool]:
    """(total within 10%, every category that holds >= 2% of the total within 15%)."""
    cats = all(errs[c] is None or abs(errs[c]) <= 0.15 for c in CATEGORIES
               if meas["breakdown"][c] >= SMALL_SHARE * meas["peak"])
    return abs(errs["total"]) <= 0.10, cats


def _mib(b: float) -> str:
    return f"{b / 1024**2:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    header = "point".ljust(58) + "".join(f"{c[:11]:>22}" for c in (*CATEGORIES, "total"))
    print("MiB estimated / measured (error); '*' = category under 2% of the total, not held to the target")
    print(header)
    worst_total, worst_cat, n_ok, n = 0.0, 0.0, 0, 0
    t0 = time.perf_counter()
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for change in CHANGES:
                if method == "full" and "method.r" in change:
                    continue  # full fine-tuning has no rank
                cfg = point_config(model, method, change)
                cfg["estimate"]["padded"] = padded(cfg)
                est = estimate.estimate_job(cfg)
                meas = measure_point(cfg)
                errs = errors(est, meas)
                tot_ok, cat_ok = judged(est, meas, errs)
                n += 1
                n_ok += tot_ok and cat_ok
                worst_total = max(worst_total, abs(errs["total"]))
                cells = []
                for c in CATEGORIES:
                    small = meas["breakdown"][c] < SMALL_SHARE * meas["peak"]
                    err = "  n/a" if errs[c] is None else f"{100 * errs[c]:+5.0f}%"
                    if not small and errs[c] is not None:
                        worst_cat = max(worst_cat, abs(errs[c]))
                    cells.append(f"{_mib(est['breakdown'][c])}/{_mib(meas['breakdown'][c]).strip()}{err}{'*' if small else ''}")
                cells.append(f"{_mib(est['peak_memory_bytes'])}/{_mib(meas['peak']).strip()}{100 * errs['total']:+5.1f}%")
                label = f"{model} {method} " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in {**BASE, **change}.items()
                                                        if not (method == 'full' and k == 'method.r'))
                print(f"{label[:57]:<58}" + "".join(f"{c:>22}" for c in cells) + ("" if tot_ok and cat_ok else "  MISS"),
                      flush=True)
    print(f"\n{n_ok}/{n} points within target; worst total error {100 * worst_total:.1f}%, "
          f"worst category error (>= 2% of total) {100 * worst_cat:.1f}%; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
