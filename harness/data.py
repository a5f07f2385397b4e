"""Training data: the bundled demo task, user files (JSONL/CSV) and hub datasets.

Every example becomes a (prompt, completion) pair; the loss is on the completion only.
Multiple-choice data (the demo task, or user rows with ``question``/``choices``/``answer``)
uses MMLU's prompt format, so the same model answers both with a letter, and its held-out
split is evaluated in-domain through lm-eval (see evaluate.py).
"""

from __future__ import annotations

import csv
import io
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


# ---------------------------------------------------------------- user files (JSONL, CSV)
# Every row is checked; a bad one is a DataError naming the file, the line and the field.
MC_FIELDS = ("question", "choices", "answer")
FORMATS = "instruction/input/output, prompt/completion, or question/choices/answer (choices: a list, or columns A-D)"


def _where(path: Path, line: int, field: str | None = None) -> str:
    return f"{path}, line {line}" + (f", field {field!r}" if field else "")


def _text(row: dict, field: str, path: Path, line: int, required: bool = True) -> str | None:
    value = row.get(field)
    if value is None:
        if required:
            raise DataError(f"{_where(path, line, field)}: missing; rows need {FORMATS}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{_where(path, line, field)}: {type(value).__name__} {value!r:.40}; give text (a string)")
    if required and not value.strip():
        raise DataError(f"{_where(path, line, field)}: empty")
    return value


def _choices(row: dict, path: Path, line: int) -> list[str]:
    if "choices" not in row and all(k in row for k in LETTERS):  # CSV columns A, B, C, D (MMLU's layout)
        choices = [row[k] for k in LETTERS]
        for letter, c in zip(LETTERS, choices):
            if c is None or not str(c).strip():
                raise DataError(f"{_where(path, line, letter)}: empty")
        return [str(c) for c in choices]
    choices = row.get("choices")
    if choices is None:
        raise DataError(f"{_where(path, line, 'choices')}: missing; give a list of 4 choices (or columns A, B, C, D)")
    if isinstance(choices, str):  # a CSV cell holds a JSON list
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise DataError(f"{_where(path, line, 'choices')}: {choices!r:.40} is not a JSON list "
                            '(write it as ["a", "b", "c", "d"], or use columns A, B, C, D)') from None
    if not isinstance(choices, list) or len(choices) != len(LETTERS):
        raise DataError(f"{_where(path, line, 'choices')}: {choices!r:.60}; give a list of exactly 4 choices")
    for c in choices:
        if isinstance(c, bool) or not isinstance(c, str | int | float) or not str(c).strip():
            raise DataError(f"{_where(path, line, 'choices')}: choice {c!r:.40} is not text (or is empty)")
    return [str(c) for c in choices]


def _answer(row: dict, path: Path, line: int) -> int:
    answer = row.get("answer")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        return LETTERS.index(answer.strip().upper())
    if isinstance(answer, str) and answer.strip() in {"0", "1", "2", "3"}:
        return int(answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(LETTERS):
        return answer
    shown = "missing" if answer is None else f"{answer!r:.40}"
    raise DataError(f"{_where(path, line, 'answer')}: {shown}; give a letter A-D or an index 0-3")


def parse_mc(row: dict, path: Path, line: int) -> dict:
    """A checked multiple-choice row: {question, choices (4), answer (index), subject?, id?}."""
    out = {"question": _text(row, "question", path, line), "choices": _choices(row, path, line),
           "answer": _answer(row, path, line)}
    if _text(row, "subject", path, line, required=False):
        out["subject"] = row["subject"]
    if row.get("id") is not None:
        out["id"] = str(row["id"])
    return out


def _row_to_example(row: dict, path: Path, line: int) -> dict:
    """Alpaca-style (instruction/input/output), prompt/completion, or multiple-choice rows."""
    if any(k in row for k in MC_FIELDS):
        return mc_to_example(parse_mc(row, path, line))
    if "prompt" in row or "completion" in row:
        return {"prompt": _text(row, "prompt", path, line), "completion": _text(row, "completion", path, line)}
    if "instruction" in row or "output" in row:
        prompt = _text(row, "instruction", path, line)
        if extra := _text(row, "input", path, line, required=False):
            prompt += "\n\n" + extra
        return {"prompt": prompt + "\n\n", "completion": _text(row, "output", path, line)}
    raise DataError(f"{_where(path, line)}: a row has columns {sorted(map(str, row))}; expected {FORMATS}")


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a .jsonl or .csv file."""
    if path.suffix not in (".jsonl", ".csv"):
        raise DataError(f"{path}: unknown extension {path.suffix!r}; use .jsonl or .csv")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{_where(path, line)}: byte {exc.object[exc.start]:#04x} is not UTF-8; save the file as UTF-8") from None
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{_where(path, n)}: not a JSON object ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{_where(path, n)}: a row must be a JSON object, not {type(row).__name__}")
            rows.append((n, row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{_where(path, reader.line_num)}: more fields than the header names")
                missing = [k for k, v in row.items() if v is None]
                if missing:
                    raise DataError(f"{_where(path, reader.line_num, missing[0])}: missing (the row has fewer "
                                    "fields than the header)")
                rows.append((reader.line_num, row))
        except csv.Error as exc:
            raise DataError(f"{_where(path, reader.line_num)}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows; expected {FORMATS}")
    return rows


def _file(data_cfg: dict, key: str) -> Path:
    value = data_cfg.get(key)
    path = Path(str(value or "")).expanduser()
    if not value or not path.is_file():
        raise DataError(f"data.{key}={value!r} does not exist; give a .jsonl or .csv file")
    return path


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
        path = _file(data_cfg, "path")
        examples = [_row_to_example(row, path, n) for n, row in _read_rows(path)]
        heldout: list[dict] = []
        if data_cfg.get("heldout_path"):
            hpath = _file(data_cfg, "heldout_path")
            heldout = [parse_mc(row, hpath, n) for n, row in _read_rows(hpath)]
        return examples, heldout
    if kind == "hub":
        import datasets

        ds = datasets.load_dataset(str(data_cfg["dataset"]), split=str(data_cfg.get("split", "train")))
        name = Path(str(data_cfg["dataset"]))
        return [_row_to_example(dict(r), name, i + 1) for i, r in enumerate(ds)], []
    raise DataError(f"data.kind={kind!r} is unknown; valid: demo, file, hub")


OVERLONG = ("truncate", "drop")  # data.overlong: what becomes of an example longer than train.seq_len


def check_fit(data_cfg: dict, seq_len: int) -> None:
    """data.min_prompt_tokens and data.overlong, against train.seq_len (DataError, one line)."""
    overlong = data_cfg.get("overlong", "truncate")
    if overlong not in OVERLONG:
        raise DataError(f"data.overlong={overlong!r} is unknown; valid: {', '.join(OVERLONG)}")
    keep = data_cfg.get("min_prompt_tokens", 16)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < int(seq_len):
        raise DataError(f"data.min_prompt_tokens={keep!r} is invalid; give an integer from 0 to train.seq_len - 1 "
                        f"({int(seq_len) - 1}), so that a completion token still fits")


def tokenize_examples(examples: list[dict], tokenizer, seq_len: int, data_cfg: dict | None = None
                      ) -> tuple[list[dict], dict]:
    """Token ids of prompt+completion+eos, labels -100 on the prompt (loss on completion only),
    and how many examples had to be cut or left out to fit ``seq_len``.

    An example longer than ``seq_len`` (``data_cfg``: ``overlong``, ``min_prompt_tokens``):
    ``truncate`` keeps at least ``min_prompt_tokens`` of its prompt (the end, next to the
    completion; the whole prompt when shorter) and cuts the prompt's start, then the completion's
    end, as far as needed; ``drop`` leaves it out. Not padded here: the collator pads to ``seq_len``.
    Returns (features, {"examples_kept", "examples_truncated", "examples_dropped"}), counted over
    the examples given (before they are repeated to fill the token budget).
    """
    data_cfg = data_cfg or {}
    check_fit(data_cfg, seq_len)
    min_prompt, drop = int(data_cfg.get("min_prompt_tokens", 16)), data_cfg.get("overlong", "truncate") == "drop"
    out, truncated, dropped = [], 0, 0
    for ex in examples:
        prompt_ids = tokenizer(ex["prompt"], add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(completion_ids) > seq_len:
            if drop:
                dropped += 1
                continue
            truncated += 1
            keep = min(len(prompt_ids), max(min_prompt, seq_len - len(completion_ids)))
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]
            completion_ids = completion_ids[: seq_len - keep]
        ids = prompt_ids + completion_ids
        labels = [-100] * len(prompt_ids) + completion_ids
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if examples and not out:
        raise DataError(f"data.overlong=drop left no training example: all {len(examples)} are longer than "
                        f"train.seq_len={seq_len}; raise train.seq_len or use data.overlong=truncate")
    return out, {"examples_kept": len(out), "examples_truncated": truncated, "examples_dropped": dropped}


def fit_warning(counts: dict, seq_len: int, data_cfg: dict) -> str | None:
    """The console warning when examples were cut or left out (None when all fit whole)."""
    cut, left = counts["examples_truncated"], counts["examples_dropped"]
    if not cut and not left:
        return None
    n = counts["examples_kept"] + left
    what = (f"{cut} truncated (at least {int(data_cfg.get('min_prompt_tokens', 16))} prompt tokens kept, "
            "the completion cut at its end)" if cut else f"{left} dropped (data.overlong=drop)")
    return f"warning: {cut + left} of {n} training examples are longer than train.seq_len={seq_len}: {what}"
