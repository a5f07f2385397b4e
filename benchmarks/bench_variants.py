"""Serving N variants: how well does the mixed-batch probe resolve, and does it agree with the
single-adapter latency probe?

Loads the default model (SmolLM2-135M), applies LoRA (r16, all linear layers, nonzero B) and, in
one process:

1. runs the single-adapter latency probe (``harness.measure.serving.time_variants``: base, merged
   and dynamic at batch 1, round-robin) and derives the dynamic adapter's ratio to the merged
   model, pair by pair, with its paired 95% interval;
2. runs the serving-N-variants phase (``harness.measure.variants.measure_variants``) with a batch
   of 1 at N = 1 (the same computation through peft's mixed-batch path) and a batch of ``--batch``
   at N = ``--counts``: memory, switching and each mixed batch's ratio to the merged model.

Prints both N = 1 ratios side by side (they agree when the intervals overlap) and the half-width
of the mixed-batch ratio's interval at the largest N (target: within ±3%). Timings are only
valid on a quiet machine: run it under the CPU lock.

    flock /tmp/harness-cpu.lock .venv/bin/python -m benchmarks.bench_variants [--reps 64] [--batch 8]

Measured here: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_latency import config
from harness import stats
from harness.data import load_data
from harness.measure import serving, variants
from harness.methods import apply_method
from harness.models import load_model


def _pct(r: dict) -> str:
    lo, hi = r["ci"]
    return f"{100 * (r['ratio'] - 1):+6.2f}% [{100 * (lo - 1):+.2f}, {100 * (hi - 1):+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    # 64 x 16 decoded tokens: the decode ratio's interval at N = 8 within ±3% (±2.8%; 48 reps: ±3.2%)
    parser.add_argument("--reps", type=int, default=64, help="round-robin repetitions of each probe")
    parser.add_argument("--batch", type=int, default=8, help="requests in the mixed batch at the larger counts")
    parser.add_argument("--counts", default="8", help="comma-separated N beside N = 1")
    parser.add_argument("--new-tokens", type=int, default=16, help="decoded tokens per batch (16: decode ±2.8%% at 64 reps)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config(args.model, args.rank)
    torch.manual_seed(0)
    loaded = load_model(cfg["model"])
    model = apply_method(loaded.model, cfg["method"])
    examples = load_data(cfg["data"]).train
    prompts = [ex["messages"][0]["content"] for ex in examples[: max(2, args.batch)]]
    footprint = serving.footprint_metrics(model, torch.float32)
    counts = [int(c) for c in args.counts.split(",")]
    settings = {"enabled": True, "reps": args.reps, "switch_reps": 6, "gen_tokens": args.new_tokens}

    t0 = time.perf_counter()
    # the single-adapter probe on the first prompt cut to the batch's length, so both see one input
    one = variants.batch_inputs(loaded.tokenizer, prompts, 1, torch.device("cpu"))[0].tolist()
    timed = serving.time_variants(model, None, [one], reps=args.reps, new_tokens=args.new_tokens)
    t = timed["times"]
    probe = {phase: dict(zip(("ratio", "lo", "hi"), stats.ratio_interval(t["dynamic"][phase], t["merged"][phase])))
             for phase in ("prefill", "decode")}
    probe_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    at_one, _ = variants.measure_variants(model, loaded.tokenizer, prompts, {**settings, "counts": [1], "batch": 1},
                                          footprint)
    many, summary = variants.measure_variants(model, loaded.tokenizer, prompts,
                                              {**settings, "counts": counts, "batch": args.batch}, footprint)
    phase_s = time.perf_counter() - t0

    print(f"{args.model}, LoRA r{args.rank} all-linear (B nonzero), {torch.get_num_threads()} thread(s), "
          f"{args.reps} reps, {args.new_tokens} decoded tokens; prompt {len(one)} tokens; "
          f"probe {probe_s:.0f} s, variants phase {phase_s:.0f} s")
    print("N = 1, batch 1: the dynamic adapter vs the merged model")
    for phase in ("prefill", "decode"):
        p = probe[phase]
        print(f"  {phase:8s} latency probe    {100 * (p['ratio'] - 1):+6.2f}% [{100 * (p['lo'] - 1):+.2f}, "
              f"{100 * (p['hi'] - 1):+.2f}]")
        r = at_one[0][f"mixed_vs_merged_{phase}"]
        agree = r["ci"][0] <= p["hi"] and p["lo"] <= r["ci"][1]
        print(f"  {phase:8s} variants (N = 1) {_pct(r)}  intervals {'overlap' if agree else 'DISAGREE'}")
    print(f"one adapter {summary['adapter_tensor_bytes'] / 2**20:.2f} MiB of tensors; batch {args.batch}, "
          f"prompt {summary['prompt_tokens']} tokens")
    for e in many:
        growth, rss = e["adapter_growth_bytes"], e["rss_growth_bytes"]
        growth_text = "-" if growth is None else f"{growth / 2**20:.2f} MiB"
        rss_text = "-" if rss is None else f"{rss / 2**20:.1f} MiB"
        print(f"N = {e['n']:3d}: resident {e['resident_bytes'] / 2**20:8.1f} MiB vs {e['n']} merged "
              f"{e['merged_bytes'] / 2**20:8.1f} MiB; growth per adapter {growth_text}, RSS {rss_text}")
        sw = e["switching"]
        print("        " + ", ".join(f"{k} {v['median_s'] * 1000:.2f} ms" for k, v in sw.items()))
        for phase in ("prefill", "decode"):
            r = e[f"mixed_vs_merged_{phase}"]
            half = 100 * max(r["ratio"] - r["ci"][0], r["ci"][1] - r["ratio"]) / r["ratio"]
            print(f"        mixed vs merged {phase:8s} {_pct(r)}  (±{half:.1f}%, target ±3%)")


if __name__ == "__main__":
    main()
