"""The CUDA-only parts of distributed jobs, checked in one call on a machine with GPUs.

    python benchmarks/gpu_distributed_check.py [--out DIR]      (exit 0: every check passed)

What CPU tests cannot reach: NCCL (the per-rank gather), CUDA peaks per rank (allocated and
reserved), ``distributed=none`` on exactly one of several visible GPUs, FSDP2 without the test
patch, QLoRA under FSDP (4-bit weights stored in the compute dtype). Each check is a real
``harness-run`` on ``tiny-random`` (seconds); 2-process checks need 2 GPUs and are skipped with
one. Prints one JSON line per check and a summary; writes the records under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model=tiny-random",
    "train.max_steps=4",
    "train.batch_size=2",
    "train.seq_len=64",
    "data.n_train=16",
    "data.n_heldout=8",
    "eval.mmlu.enabled=false",
    "eval.on_random_weights=true",
    "eval.latency.reps=4",
    "eval.latency.gen_tokens=2",
    "report=false",
]


def run(results: Path, *args: str) -> tuple[int, list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.run", *TINY, f"results_dir={results}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    recs = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    return proc.returncode, [r for r in recs if r["method"] != "base"], proc.stdout[-1500:] + proc.stderr[-1500:]


def check(name: str, ok: bool, **facts) -> dict:
    line = {"check": name, "ok": bool(ok), **facts}
    print(json.dumps(line, default=str), flush=True)
    return line


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="gpu-distributed-check-"))
    out = Path(parser.parse_args().out)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here", file=sys.stderr)
        return 2
    n_gpu = torch.cuda.device_count()
    results: list[dict] = []
    t0 = time.perf_counter()

    # 1. distributed=none: one process on exactly one GPU, even with several visible
    rc, recs, tail = run(out / "none", "method=lora")
    m = recs[0]["metrics"] if recs else {}
    results.append(
        check(
            "none_one_device",
            rc == 0
            and recs
            and recs[0]["status"] == "ok"
            and m.get("world_size") == 1
            and len(m.get("devices") or []) == 1
            and recs[0]["env"].get("visible_device_count") == 1
            and m.get("peak_memory_reserved_bytes") is not None,
            visible=n_gpu,
            devices=m.get("devices"),
            error=recs[0]["error"] if recs else tail,
        )
    )

    if n_gpu >= 2:
        # 2. DDP over 2 GPUs (NCCL): per-rank CUDA peaks gathered, tokens over both ranks
        rc, recs, tail = run(out / "ddp", "method=lora", "distributed=ddp", "distributed.num_processes=2")
        m = recs[0]["metrics"] if recs else {}
        results.append(
            check(
                "ddp_nccl_gather",
                rc == 0
                and recs
                and recs[0]["status"] == "ok"
                and len(m.get("peak_memory_bytes_per_rank") or []) == 2
                and all(p for p in m["peak_memory_bytes_per_rank"])
                and all(p for p in m["peak_memory_reserved_bytes_per_rank"])
                and len(set(m["devices"])) == 2
                and m["train_tokens"] == 2 * m["token_budget"],
                devices=m.get("devices"),
                peaks=m.get("peak_memory_bytes_per_rank"),
                error=recs[0]["error"] if recs else tail,
            )
        )
        # 3. FSDP2 over 2 GPUs, full, LoRA and QLoRA (quant storage = compute dtype), no test patch
        rc, recs, tail = run(
            out / "fsdp",
            "-m",
            "method=full,lora,qlora",
            "distributed=fsdp",
            "distributed.num_processes=2",
            "distributed.main_process_port=29533",
        )
        for rec in recs:
            m = rec["metrics"]
            results.append(
                check(
                    f"fsdp_{rec['method']}",
                    rc == 0
                    and rec["status"] == "ok"
                    and m.get("world_size") == 2
                    and len(m["peak_memory_bytes_per_rank"]) == 2
                    and "latency" in (m.get("skipped_measurements") or {}),
                    peaks=m.get("peak_memory_bytes_per_rank"),
                    breakdown=m.get("memory_breakdown_bytes_per_rank"),
                    error=rec["error"],
                )
            )
        if len(recs) < 3:
            results.append(check("fsdp_records", False, found=[r["method"] for r in recs], error=tail))
    else:
        results.append(check("two_gpu_checks", True, skipped=f"{n_gpu} GPU visible; DDP and FSDP need 2"))

    passed = all(r["ok"] for r in results)
    print(
        json.dumps(
            {
                "summary": "pass" if passed else "FAIL",
                "checks": len(results),
                "gpus": n_gpu,
                "device": torch.cuda.get_device_name(0),
                "seconds": round(time.perf_counter() - t0, 1),
                "records": str(out),
            }
        ),
        flush=True,
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
