"""How long harness-report takes on a sweep of 200 run records (target: under 10 s).

    .venv/bin/python benchmarks/bench_report.py [--keep DIR]

Generates 200 synthetic records into a temp folder: 4 model sizes x 2 hardware kinds x 3 seeds x
8 arms (full, LoRA r=8/16/64, QLoRA r=8/16/64, IA3) plus one base-model record per model and
hardware, each with per-question answers (570 MMLU + 200 in-domain), loss curves and memory
breakdowns; a few runs are OOM or failed. Then it times build_report (records are read and
paired from disk, all tables and plots written) and prints the seconds and the ratio to 10 s.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from harness.records import run_id_for, stable_hash, write_items, write_record
from harness.report import build_report

TARGET_S = 10.0
MODELS = (
    ("bench-125m", 125_000_000),
    ("bench-360m", 360_000_000),
    ("bench-1.7b", 1_700_000_000),
    ("bench-7b", 7_000_000_000),
)
HARDWARE = (("h200", "NVIDIA H200", 3.5), ("a100-40gb", "NVIDIA A100-SXM4-40GB", 1.8))
ARMS = (
    ("full", None),
    ("lora", 8),
    ("lora", 16),
    ("lora", 64),
    ("qlora", 8),
    ("qlora", 16),
    ("qlora", 64),
    ("ia3", None),
)
SEEDS = (0, 1, 2)
N_MMLU, N_INDOMAIN = 570, 200


def _items(rng: random.Random, skill: float) -> list[dict]:
    items = []
    for task, n in (("mmlu", N_MMLU), ("indomain", N_INDOMAIN)):
        for i in range(n):
            correct = rng.random() < skill
            items.append(
                {
                    "task": task,
                    "id": f"{task}-{i}",
                    "subject": f"s{i % 57}",
                    "category": "stem",
                    "pred": 0 if correct else 1,
                    "target": 0,
                    "correct": correct,
                }
            )
    return items


def make_record(
    results: Path, rng: random.Random, model: str, size: int, hw: tuple, method: str, rank, seed: int
) -> dict:
    hw_name, device_name, price = hw
    config = {
        "model": {"name": model},
        "data": {"name": "demo"},
        "seed": seed,
        "eval": {"mmlu_limit": 10},
        "hardware": {"name": hw_name},
        "method": {"name": method, "r": rank},
    }
    config_hash = stable_hash(config)
    run_id = run_id_for(method, rank, config_hash)
    trained = method != "base"
    trainable = size if method == "full" else (size * (rank or 1) // 4096 if trained else 0)
    memory = (16 * size if method == "full" else (1 if method == "qlora" else 2) * size + 40 * trainable) + 2**28
    status = "ok"
    if method == "full" and size >= 7e9 and hw_name.startswith("a100"):
        status = "oom"  # does not fit: the report must say so
    elif method == "ia3" and seed == 2 and size < 2e8:
        status = "failed"
    skill = {"base": 0.3, "full": 0.5}.get(method, 0.47) + size / 1e11
    items = _items(rng, skill) if status == "ok" else []
    mmlu = [it["correct"] for it in items if it["task"] == "mmlu"]
    indomain = [it["correct"] for it in items if it["task"] == "indomain"]
    wall = 60 + size / 1e7 * (0.6 if method != "full" else 1.0) + rng.random() * 5
    metrics = {
        "trainable_params": trainable if trained else None,
        "total_params": size,
        "trainable_share": trainable / size if trained else None,
        "peak_memory_bytes": memory * (1 + rng.random() * 0.02) if trained else None,
        "memory_breakdown_bytes": {
            "parameters": 2 * size,
            "gradients": 2 * trainable,
            "optimizer_state": 8 * trainable,
            "activations": memory // 3,
            "other": 2**28,
        }
        if trained
        else None,
        "run_wall_s": wall,
        "train_wall_s": wall - 20 if trained else None,
        "tokens_per_s": 1e5 / wall if trained else None,
        "train_tokens": 1_000_000 if trained else None,
        "cost_usd": wall / 3600 * price if trained else None,
        "projected_tokens": 1_000_000_000 if trained else None,
        "projected_cost_usd": wall / 3600 * price * 1000 if trained else None,
        "loss_curve": [[s, 3.0 * (1 + s) ** -0.3 + rng.random() * 0.05] for s in range(0, 200, 4)] if trained else None,
        "step_times_s": [0.1 + rng.random() * 0.01 for _ in range(50)] if trained else None,
        "adapter_bytes": 2 * trainable if trained and method != "full" else None,
        "full_checkpoint_bytes": 2 * size,
        "full_checkpoint_bytes_estimated": method != "full",
        "latency_merged_overhead": 0.0 if method not in ("base", "full") else None,
        "latency_dynamic_overhead": 0.1 + rng.random() * 0.1 if method not in ("base", "full") else None,
        "mmlu_acc": sum(mmlu) / len(mmlu) if mmlu else None,
        "mmlu_stderr": 0.02 if mmlu else None,
        "mmlu_n": len(mmlu) or None,
        "mmlu_subset": True,
        "indomain_acc": sum(indomain) / len(indomain) if indomain else None,
        "indomain_stderr": 0.03 if indomain else None,
        "indomain_n": len(indomain) or None,
    }
    record = {
        "schema": 1,
        "run_id": run_id,
        "config_hash": config_hash,
        "pair_key": stable_hash([model, hw_name, seed]),
        "eval_key": stable_hash([model, config["eval"]]),
        "status": status,
        "error": "RuntimeError: synthetic failure" if status == "failed" else None,
        "method": method,
        "rank": rank,
        "model": {"name": model, "source": "config", "total_params": size, "random_weights": False},
        "config": config,
        "env": {
            "versions": {"torch": "2.13"},
            "git_commit": "0" * 40,
            "device": "cuda",
            "device_name": device_name,
            "device_count": 1,
            "host": "bench",
            "started_at": f"2025-04-0{seed + 1}T08:00:00+00:00",
            "ended_at": f"2025-04-0{seed + 1}T09:00:00+00:00",
        },
        "items_file": write_items(results, run_id, items) if items else None,
        "base_run_id": None,
        "metrics": metrics,
    }
    write_record(results, record)
    return record


def generate(results: Path) -> int:
    rng = random.Random(0)
    count = 0
    for model, size in MODELS:
        for hw in HARDWARE:
            base = make_record(results, rng, model, size, hw, "base", None, 0)
            count += 1
            for seed in SEEDS:
                for method, rank in ARMS:
                    rec = make_record(results, rng, model, size, hw, method, rank, seed)
                    # link the arm to its base-model record, as the run stage does
                    rec["base_run_id"] = base["run_id"]
                    write_record(results, rec)
                    count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="write the records and the report under this folder and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        n = generate(root / "results")
        start = time.perf_counter()
        written = build_report(root / "results", root / "reports")
        seconds = time.perf_counter() - start
    print(
        f"build_report on {n} run records: {seconds:.2f} s "
        f"(target {TARGET_S:.0f} s, ratio {seconds / TARGET_S:.2f}); wrote {len(written)} files"
    )


if __name__ == "__main__":
    main()
