"""How stable is the MFU denominator? The matmul peak timed as the per-run probe did (3 trials on
CPU, 5 on CUDA) against the cached measurement (``flops.PEAK_REPS`` trials), each repeated
``--repeats`` times back to back on this device; prints each setting's spread (max/min − 1 and
the coefficient of variation). A spread of a few percent in the per-run probe is a few percent of
MFU difference between arms that measures nothing but the probe.

    .venv/bin/python -m benchmarks.bench_peak [--repeats 8] [--dtype float32]   (under the CPU lock)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from harness.measure import flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    size = flops.PEAK_SIZE[device.type]
    settings = {"per-run probe (before)": 5 if device.type == "cuda" else 3, "cached (now)": flops.PEAK_REPS[device.type]}
    hw = flops.peak_hardware(device, dtype)
    print(f"{hw['device_name']}, {hw['dtype']}, torch {hw['torch']}, threads {hw['threads']}, {size}x{size}")
    for label, reps in settings.items():
        peaks = [flops.measure_peak_flops(device, dtype, size=size, reps=reps) for _ in range(args.repeats)]
        spread = max(peaks) / min(peaks) - 1
        cv = statistics.stdev(peaks) / statistics.fmean(peaks)
        print(f"{label:24s} reps {reps:3d}: median {statistics.median(peaks) / 1e9:8.2f} GFLOP/s  "
              f"spread {100 * spread:5.1f}%  cv {100 * cv:5.1f}%  (n={args.repeats})")


if __name__ == "__main__":
    main()
