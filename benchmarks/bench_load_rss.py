"""Why a CPU run loads its weights without mmap and trims the heap before training: the RSS of a
loaded model, LoRA vs QLoRA, with and without each of the two.

Each case runs in a fresh process (RSS is per process): ``load_model`` -> ``apply_method``, then
prints the RSS (anonymous and file-backed pages apart) before and after
``measure.memory.release_free_memory`` (glibc ``malloc_trim``), and the bytes of the parameter
tensors themselves (4-bit weights with their quantization constants), which no RSS effect changes.

    flock /tmp/harness-cpu.lock .venv/bin/python -m benchmarks.bench_load_rss [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
CONF = Path(__file__).resolve().parents[1] / "conf"


def _rss_parts() -> dict:
    status = Path("/proc/self/status").read_text()
    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines()) if k.startswith("Rss")}
    return {"anon": kb.get("RssAnon", 0) * 1024, "file": kb.get("RssFile", 0) * 1024}


def one(model: str, method: str, mmap: bool) -> dict:
    import torch
    import yaml

    from harness.measure.memory import _rss, release_free_memory
    from harness.methods import apply_method, normalize, quantization_config
    from harness.models import load_model

    model_cfg = yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text())
    method_cfg = normalize({**yaml.safe_load((CONF / "method" / "lora.yaml").read_text()), "name": method,
                            **({"quantize": "nf4", "compute_dtype": "auto"} if method == "qlora" else {})})
    loaded = load_model(model_cfg, quantization_config=quantization_config(method_cfg), mmap=mmap)
    peft_model = apply_method(loaded.model, method_cfg)
    seen, tensors = set(), 0
    for p in peft_model.parameters():
        qs = getattr(p, "quant_state", None)
        extra = [v for h in (qs, getattr(qs, "state2", None)) if h is not None for v in vars(h).values()]
        for t in [p, *extra]:
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in seen:
                seen.add(id(t.untyped_storage()))
                tensors += t.untyped_storage().nbytes()
    before = {"rss": _rss(), **_rss_parts()}
    release_free_memory("cpu")
    after = {"rss": _rss(), **_rss_parts()}
    return {"method": method, "mmap": mmap, "param_tensor_bytes": tensors, "loaded": before, "trimmed": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "MMAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one[0], args.one[1] == "mmap")))
        return
    print(f"{args.model}: RSS after load_model + apply_method, MiB (anon + file-backed)")
    print(f"{'method':7} {'load':8} {'param tensors':>13} {'RSS':>16} {'RSS after malloc_trim':>24}")
    for method in ("lora", "qlora"):
        for mmap in ("mmap", "no-mmap"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_load_rss", "--model", args.model,
                                   "--one", method, mmap], capture_output=True, text=True, env=os.environ)
            if proc.returncode:
                sys.exit(proc.stderr[-2000:])
            r = json.loads(proc.stdout.splitlines()[-1])

            def fmt(d):
                return f"{d['rss'] / MiB:6.0f} ({d['anon'] / MiB:.0f}+{d['file'] / MiB:.0f})"

            print(f"{method:7} {mmap:8} {r['param_tensor_bytes'] / MiB:13.0f} {fmt(r['loaded']):>16} "
                  f"{fmt(r['trimmed']):>24}")


if __name__ == "__main__":
    main()
