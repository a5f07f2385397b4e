"""Does the harness distort what it measures? Harness training vs a bare loop, side by side.

Both train the same model, method, batch and sequence length on the same batches: once through
the harness (transformers Trainer + the harness's measurement callback: RSS sampler, per-step
timing, memory-breakdown probe) and once through a bare loop of the same library calls
(forward, backward, torch AdamW, linear schedule). They alternate for ``--rounds`` rounds so a
slow spell of the machine hits both, and the steady-state tokens/s of each (median step time
after warm-up; the harness's tracked breakdown step excluded, as the harness itself does) are
compared. Target: harness / bare >= 0.95.

    .venv/bin/python -m benchmarks.bench_overhead [--model smollm2-135m] [--method lora] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.config import CONF_DIR
from harness.data import load_data
from harness.measure import callback
from harness.methods import apply_method, quantization_config
from harness.models import load_model
from harness.train import build_trainer, training_features


def config(model: str, method: str, steps: int, batch: int, seq_len: int) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", f"method={method}",
                                                        f"train.max_steps={steps}", f"train.batch_size={batch}",
                                                        f"train.seq_len={seq_len}", "train.precision=fp32"])
    return OmegaConf.to_container(cfg, resolve=True)


def fresh_model(cfg: dict):
    torch.manual_seed(0)
    loaded = load_model(cfg["model"], quantization_config=quantization_config(cfg["method"]))
    return apply_method(loaded.model, cfg["method"]), loaded.tokenizer


def harness_step_times(cfg: dict, examples: list[dict]) -> list[float]:
    model, tok = fresh_model(cfg)
    probe = callback.MeasureCallback(warmup_steps=int(cfg["train"]["warmup_steps_excluded"]))
    features, _ = training_features(examples, tok, cfg["train"], cfg["data"])
    trainer = build_trainer(model, tok, features, cfg["train"], float(cfg["method"]["learning_rate"]), seed=0,
                            callbacks=[probe], label="harness")
    trainer.train()
    return [dt for step, dt in probe.step_times if step >= probe.warmup_steps]


def bare_step_times(cfg: dict, examples: list[dict]) -> list[float]:
    """The same batches (taken from the Trainer's own dataloader) through a plain loop."""
    model, tok = fresh_model(cfg)
    features, _ = training_features(examples, tok, cfg["train"], cfg["data"])
    trainer = build_trainer(model, tok, features, cfg["train"], float(cfg["method"]["learning_rate"]), seed=0)
    batches = [b for _, b in zip(range(int(cfg["train"]["max_steps"])), trainer.get_train_dataloader(), strict=False)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg["method"]["learning_rate"]), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=len(batches))
    model.train()
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the Trainer clips at 1.0 too
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[int(cfg["train"]["warmup_steps_excluded"]) + 1:]  # same warm-up as the harness (+ its probe step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cfg = config(args.model, args.method, args.steps, args.batch, args.seq_len)
    examples = load_data(cfg["data"]).train
    tokens_per_step = args.batch * args.seq_len
    harness, bare = [], []
    for r in range(args.rounds):
        bare += bare_step_times(cfg, examples)
        harness += harness_step_times(cfg, examples)
        print(f"round {r + 1}/{args.rounds}: bare median {statistics.median(bare):.3f} s/step, "
              f"harness median {statistics.median(harness):.3f} s/step", flush=True)
    bare_tps = tokens_per_step / statistics.median(bare)
    harness_tps = tokens_per_step / statistics.median(harness)
    print(f"model={args.model} method={args.method} batch={args.batch} seq_len={args.seq_len} "
          f"steps={args.steps} rounds={args.rounds}")
    print(f"bare loop: {bare_tps:.1f} tokens/s   harness: {harness_tps:.1f} tokens/s")
    print(f"throughput ratio harness/bare = {harness_tps / bare_tps:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
