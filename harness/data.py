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


# The demo task: "which option is the word W?", four words as choices, answered with a letter.
# Chosen so that a 135M model learns it within the demo's budget: the base model answers at
# chance (it puts every answer on one letter), and LoRA learns the skill (find the matching
# option, give its letter) in about 60 steps. It shows the harness at work, not a benchmark
# result. Held-out questions use only words that never appear in training.
DEMO_CATEGORIES: dict[str, list[str]] = {  # 256 distinct words (32 in each of 8 categories)
    "fruit": """apple banana cherry grape lemon mango pear melon kiwi apricot fig papaya coconut guava pineapple
        strawberry raspberry blueberry watermelon pomegranate tangerine nectarine cranberry grapefruit lychee
        persimmon quince gooseberry blackberry cantaloupe passionfruit kumquat""".split(),
    "animal": """dog cat horse cow sheep lion tiger bear wolf fox rabbit mouse deer goat zebra monkey camel elephant
        giraffe kangaroo squirrel leopard cheetah hippopotamus rhinoceros donkey otter beaver raccoon hedgehog
        moose badger""".split(),
    "color": """red blue green yellow purple pink brown black white gray violet indigo crimson maroon teal beige
        turquoise magenta scarlet lavender navy cyan amber ivory burgundy chartreuse fuchsia ochre vermilion
        cerulean mauve taupe""".split(),
    "country": """France Spain Italy Germany Japan India Brazil Canada Mexico Egypt Kenya Norway Sweden Peru Greece
        Argentina Australia Vietnam Thailand Nigeria Poland Portugal Ireland Finland Denmark Austria Belgium
        Colombia Morocco Pakistan Indonesia Switzerland""".split(),
    "vehicle": """car bus truck bicycle train airplane boat motorcycle tram scooter helicopter van taxi subway tractor
        canoe rocket sailboat yacht ambulance limousine minivan jeep bulldozer forklift trolley kayak glider
        snowmobile submarine skateboard hovercraft""".split(),
    "instrument": """piano guitar violin drum flute trumpet cello harp saxophone clarinet banjo oboe tuba trombone
        ukulele accordion harmonica mandolin bassoon xylophone tambourine viola piccolo bagpipes sitar
        harpsichord marimba cymbal bugle lute zither glockenspiel""".split(),
    "body part": """hand foot arm leg head knee elbow shoulder finger toe ear nose mouth eye neck wrist ankle chin
        thumb forehead eyebrow cheek lip tongue tooth heel hip thigh stomach lung kidney liver""".split(),
    "tool": """hammer wrench screwdriver drill shovel rake chisel pliers axe ladder crowbar trowel mallet sander
        clamp hacksaw pickaxe wheelbarrow sledgehammer scissors tweezers spanner awl vise hoe pitchfork shears
        plunger stapler multimeter jigsaw sickle""".split(),
}
DEMO_SUBJECT = "word matching"


def format_mc(question: str, choices: list[str], subject: str) -> str:
    """MMLU's zero-shot prompt (lm-eval's default template plus its subject description)."""
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", "", question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def make_demo(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Generate the demo task (seeded): multiple-choice rows for training and held-out eval.

    The 256 words are split in halves; each split's questions and distractors use only its own
    words, so no held-out word, and no held-out question, appears in training. Training rows
    cycle through their words (repeating them when n_train is larger); the held-out split asks
    about each held-out word once, at most n_heldout.
    """
    rng = random.Random(seed)
    words = sorted(w for ws in DEMO_CATEGORIES.values() for w in ws)
    rng.shuffle(words)
    half = len(words) // 2
    pools = {"train": words[:half], "heldout": words[half:]}

    def draw(split: str, n: int) -> list[dict]:
        pool = pools[split]
        if split == "heldout":  # every held-out question once: repeats would fake precision
            n = min(n, len(pool))
        rows = []
        for i in range(n):
            word = pool[i % len(pool)]
            distractors = rng.sample([w for w in pool if w != word], 3)
            target = rng.randrange(4)
            choices = distractors[:target] + [word] + distractors[target:]
            rows.append({"id": f"{split}-{i}", "question": f'Which option is the word "{word}"?',
                         "choices": choices, "answer": target, "subject": DEMO_SUBJECT})
        return rows

    return draw("train", n_train), draw("heldout", n_heldout)


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
