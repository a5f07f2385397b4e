"""Training data: the bundled demo task, user files (JSONL/CSV) and hub datasets.

Every example becomes a (prompt, completion) pair; the loss is on the completion only.
Multiple-choice data (the demo task, or user rows with ``question``/``choices``/``answer``)
uses MMLU's prompt format, so the same model answers both with a letter, and its held-out
split is evaluated in-domain through lm-eval (see evaluate.py).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

LETTERS = ("A", "B", "C", "D")


class DataError(ValueError):
    """A data setting that names something that does not exist (a usage error)."""


# The demo task: "which of these is a <category>?". Categories the base model knows of, so a
# short fine-tune can teach the format and sharpen the skill; the held-out split asks about
# words that are never the answer in training, so it measures learning, not memorizing.
DEMO_CATEGORIES: dict[str, list[str]] = {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum melon kiwi lime apricot fig papaya coconut guava".split(),
    "animal": "dog cat horse cow sheep lion tiger bear wolf fox rabbit mouse deer goat zebra monkey camel elephant".split(),
    "color": "red blue green yellow purple orange pink brown black white gray violet indigo crimson maroon teal beige turquoise".split(),
    "country": "France Spain Italy Germany Japan China India Brazil Canada Mexico Egypt Kenya Norway Sweden Chile Peru Greece Turkey".split(),
    "vehicle": "car bus truck bicycle train airplane boat ship motorcycle tram scooter helicopter van taxi subway tractor canoe rocket".split(),
    "instrument": "piano guitar violin drum flute trumpet cello harp saxophone clarinet banjo oboe tuba trombone ukulele accordion harmonica mandolin".split(),
    "body part": "hand foot arm leg head knee elbow shoulder finger toe ear nose mouth eye neck wrist ankle chin".split(),
    "tool": "hammer saw wrench screwdriver drill shovel rake chisel pliers axe ladder crowbar trowel mallet sander clamp level file".split(),
}
DEMO_SUBJECT = "word categories"


def format_mc(question: str, choices: list[str], subject: str) -> str:
    """MMLU's zero-shot prompt (lm-eval's default template plus its subject description)."""
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", "", question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def make_demo(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Generate the demo task (seeded): multiple-choice rows for training and held-out eval.

    Each category's words are split in two: answers of held-out questions come only from the
    held-out part, so no held-out question (nor its answer) appears in training.
    """
    rng = random.Random(seed)
    train_words, heldout_words = {}, {}
    for cat, words in DEMO_CATEGORIES.items():
        words = sorted(words)
        rng.shuffle(words)
        cut = len(words) * 2 // 3
        train_words[cat], heldout_words[cat] = words[:cut], words[cut:]
    all_words = {cat: set(words) for cat, words in DEMO_CATEGORIES.items()}

    def draw(pool: dict[str, list[str]], n: int, split: str) -> list[dict]:
        rows, seen = [], set()
        cats = sorted(pool)
        while len(rows) < n:
            cat = rng.choice(cats)
            answer_word = rng.choice(pool[cat])
            # distractors: words of other categories that are not also in this one ("orange")
            others = sorted({w for c in cats if c != cat for w in all_words[c]} - all_words[cat])
            distractors = rng.sample(others, 3)
            target = rng.randrange(4)
            choices = distractors[:target] + [answer_word] + distractors[target:]
            key = (cat, tuple(choices))
            if key in seen:
                continue
            seen.add(key)
            question = f"Which of the following is a {cat}?"
            rows.append(
                {"id": f"{split}-{len(rows)}", "question": question, "choices": choices, "answer": target,
                 "subject": DEMO_SUBJECT}
            )
        return rows

    return draw(train_words, n_train, "train"), draw(heldout_words, n_heldout, "heldout")


def mc_to_example(row: dict) -> dict:
    return {"prompt": format_mc(row["question"], row["choices"], row.get("subject", "general knowledge")),
            "completion": " " + LETTERS[int(row["answer"])]}


def _row_to_example(row: dict, path: str) -> dict:
    """Alpaca-style (instruction/input/output), prompt/completion, or multiple-choice rows."""
    if "prompt" in row and "completion" in row:
        return {"prompt": str(row["prompt"]), "completion": str(row["completion"])}
    if "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        return {"prompt": prompt + "\n\n", "completion": str(row["output"])}
    if "question" in row and "choices" in row and "answer" in row:
        return mc_to_example(row)
    raise DataError(
        f"{path}: a row has columns {sorted(row)}; expected instruction/input/output, "
        "prompt/completion, or question/choices/answer"
    )


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    raise DataError(f"data.path={str(path)!r} has an unknown extension; use .jsonl or .csv")


def load_examples(data_cfg: dict) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out multiple-choice rows) for a data config.

    Training examples are {"prompt", "completion"}; held-out rows are multiple-choice rows for
    the in-domain eval ([] when the data has none).
    """
    kind = data_cfg["kind"]
    if kind == "demo":
        train_rows, heldout = make_demo(int(data_cfg["n_train"]), int(data_cfg["n_heldout"]), int(data_cfg["seed"]))
        return [mc_to_example(r) for r in train_rows], heldout
    if kind == "file":
        path = Path(str(data_cfg.get("path") or ""))
        if not data_cfg.get("path") or not path.is_file():
            raise DataError(f"data.path={data_cfg.get('path')!r} does not exist; give a .jsonl or .csv file")
        rows = _read_rows(path)
        heldout: list[dict] = []
        if data_cfg.get("heldout_path"):
            hpath = Path(str(data_cfg["heldout_path"]))
            if not hpath.is_file():
                raise DataError(f"data.heldout_path={str(hpath)!r} does not exist")
            heldout = [_parse_mc(r) for r in _read_rows(hpath)]
        return [_row_to_example(r, str(path)) for r in rows], heldout
    if kind == "hub":
        import datasets

        ds = datasets.load_dataset(str(data_cfg["dataset"]), split=str(data_cfg.get("split", "train")))
        return [_row_to_example(dict(r), str(data_cfg["dataset"])) for r in ds], []
    raise DataError(f"data.kind={kind!r} is unknown; valid: demo, file, hub")


def _parse_mc(row: dict) -> dict:
    choices = row["choices"]
    if isinstance(choices, str):  # CSV cells hold a JSON list
        choices = json.loads(choices)
    answer = row["answer"]
    answer = LETTERS.index(answer) if answer in LETTERS else int(answer)
    return {**row, "choices": list(choices), "answer": answer}


def tokenize_examples(examples: list[dict], tokenizer, seq_len: int) -> list[dict]:
    """Token ids of prompt+completion+eos, labels -100 on the prompt (loss on completion only).

    Sequences are cut to ``seq_len`` and not padded here; the collator pads to ``seq_len``.
    """
    out = []
    for ex in examples:
        prompt_ids = tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        completion_ids = completion_ids[:seq_len]
        # too long: drop the start of the prompt, never the completion the loss is on
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(completion_ids) - seq_len):]
        ids = prompt_ids + completion_ids
        labels = [-100] * len(prompt_ids) + completion_ids
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out
