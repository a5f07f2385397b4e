"""What does an adapter cost at serving time? Base vs merged vs dynamic LoRA, prefill and decode.

Loads the default model (SmolLM2-135M), applies LoRA (r16, all linear layers) with
``init_lora_weights=False`` so that B is nonzero and merging changes the weights, and runs the
harness's own latency probe (``harness.measure.serving.compare_latency``) on prompts of the demo
data: base, merged and dynamic interleaved round-robin, ``--reps`` repetitions. Prints each
overhead (merged, dynamic; prefill, decode per new token) with its paired 95% interval. A merged
adapter has the base's exact architecture, so its overhead should read ~0 (within 3%); the
dynamic adapter's extra low-rank matmuls show mostly in decoding, where each step is small.
Timings are only valid on a quiet machine: run it under the CPU lock.

    flock /tmp/harness-cpu.lock .venv/bin/python -m benchmarks.bench_latency [--reps 20] [--threads 1]

Measured here: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.config import CONF_DIR
from harness.data import load_data
from harness.measure.serving import latency_metrics, time_variants
from harness.methods import apply_method
from harness.models import load_model


def config(model: str, rank: int) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", "method=lora", f"method.r={rank}",
                                                        f"method.alpha={2 * rank}",
                                                        "+method.peft_kwargs.init_lora_weights=false"])
    return OmegaConf.to_container(cfg, resolve=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=None, help="default: the eval config's latency.reps (20)")
    parser.add_argument("--prompts", type=int, default=None, help="default: the eval config's latency.prompts (2)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="default: the eval config's latency.gen_tokens (8)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config(args.model, args.rank)
    lat = cfg["eval"]["latency"]
    reps = args.reps or int(lat["reps"])
    n_prompts = args.prompts or int(lat["prompts"])
    new_tokens = args.new_tokens if args.new_tokens is not None else int(lat["gen_tokens"])
    torch.manual_seed(0)
    loaded = load_model(cfg["model"])
    model = apply_method(loaded.model, cfg["method"])
    examples = load_data(cfg["data"]).train
    prompts = [ex["messages"][0]["content"] for ex in examples[:n_prompts]]
    t0 = time.perf_counter()
    timed = time_variants(model, loaded.tokenizer, prompts, reps=reps, new_tokens=new_tokens)
    wall = time.perf_counter() - t0
    m = latency_metrics(timed)
    print(f"{args.model} ({next(model.parameters()).dtype}), LoRA r{args.rank} all-linear (B nonzero), "
          f"{torch.get_num_threads()} thread(s), "
          f"{reps} round-robin reps x {len(prompts)} prompts (mean {m['latency_prompt_tokens']:.0f} tokens), "
          f"{new_tokens} decoded tokens each: {wall:.1f} s")
    for phase, unit in (("prefill", "ms"), ("decode", "ms_per_token")):
        base = m[f"latency_{phase}_base_{unit}"]
        print(f"  {phase:8s} base {base:7.2f} {unit.replace('_', ' ')}")
        for variant in ("merged", "dynamic"):
            key = f"latency_{phase}_{variant}_overhead"
            print(f"  {phase:8s} {variant:7s} {m[f'latency_{phase}_{variant}_{unit}']:7.2f} {unit.replace('_', ' ')}"
                  f"  overhead {100 * m[key]:+6.2f}%  95% CI [{100 * m[key + '_ci_low']:+.2f}, "
                  f"{100 * m[key + '_ci_high']:+.2f}]%")
            t = timed["times"]
            ratios = [v / b for v, b in zip(t[variant][phase], t["base"][phase], strict=True)]
            print(f"  {'':8s} {'':7s} per-rep ratios: {' '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
