"""Training and held-out data: the bundled demo task, the user's files and folders, hub datasets.

- ``sources``: reading rows (JSONL, JSON, CSV, Parquet, save_to_disk folders, hub ids), each
  with where it is, for one-line errors;
- ``shapes``: a row of any shape (chat messages, ShareGPT, prompt/completion, instruction,
  multiple choice) as one example, a conversation;
- ``render``: the chat template, which tokens carry the loss, fitting ``train.seq_len``;
- ``demo``: the bundled demo task.

Held-out rows (``data.heldout_path``, or ``data.heldout_fraction`` of the training file, split
with ``data.seed`` before training) feed two figures: multiple-choice rows the in-domain accuracy
(through lm-eval, in MMLU's format: see evaluate.py), the other rows the held-out loss
(``harness.measure.heldout``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from harness.data.demo import DEMO_CATEGORIES, DEMO_SUBJECT, LETTERS, format_mc, make_demo
from harness.data.render import (
    LOSS_ON,
    OVERLONG,
    chat_template,
    check_fit,
    check_template_file,
    fit_warning,
    prompt_texts,
    tokenize_examples,
)
from harness.data.shapes import is_mc, map_columns, mc_example, parse_mc, to_example
from harness.data.sources import DataError, local_path, read_hub, read_path

__all__ = ["DEMO_CATEGORIES", "DEMO_SUBJECT", "LETTERS", "LOSS_ON", "OVERLONG", "Data", "DataError", "chat_template",
           "check_fit", "fit_warning", "format_mc", "load_data", "make_demo", "mc_example", "parse_mc",
           "prompt_texts", "tokenize_examples"]


@dataclass
class Data:
    """What a job trains and evaluates on."""

    train: list[dict]  # examples ({"style", "messages"})
    heldout_mc: list[dict] = field(default_factory=list)  # multiple-choice rows: in-domain accuracy
    heldout_text: list[dict] = field(default_factory=list)  # other examples, each with an "id": held-out loss
    # the validation split (tune=lr chooses a rate on it): never trained on, never a reported figure
    validation_mc: list[dict] = field(default_factory=list)
    validation_text: list[dict] = field(default_factory=list)


def _rows(data_cfg: dict, key: str) -> list[tuple[str, dict]]:
    if data_cfg["kind"] == "hub" and key == "path":
        rows = read_hub(data_cfg)
    else:
        rows = read_path(local_path(data_cfg, key), data_cfg.get("split"))
    columns = data_cfg.get("columns") or {}
    return [(here, map_columns(row, columns, here)) for here, row in rows]


def _heldout(rows: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
    """(multiple-choice rows, other examples with ids) of held-out rows."""
    mc, text = [], []
    for i, (here, row) in enumerate(rows, 1):
        if is_mc(row):
            mc.append(parse_mc(row, here))
        else:
            ex = to_example(row, here)
            text.append({**ex, "where": here, "id": str(row["id"]) if row.get("id") is not None else f"row-{i}"})
    return mc, text


def split_heldout(rows: list, fraction: float, seed: int, what: str = "data.heldout_fraction") -> tuple[list, list]:
    """(training rows, held-out rows): a seeded share of the rows, the same for every arm and run seed."""
    if not fraction:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(rows)))
    if n_held >= len(rows):
        raise DataError(f"{what}={fraction} leaves no training row of {len(rows)}")
    held = set(order[:n_held])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_data(data_cfg: dict) -> Data:
    """The training examples and held-out rows of a data config (DataError, one line, on bad input)."""
    kind = data_cfg["kind"]
    if kind == "demo":
        train_rows, heldout, validation = make_demo(int(data_cfg["n_train"]), int(data_cfg["n_heldout"]),
                                                    int(data_cfg["seed"]), int(data_cfg.get("n_validation") or 0))
        return Data([mc_example(r) for r in train_rows], heldout, validation_mc=validation)
    if kind not in ("file", "hub"):
        raise DataError(f"data.kind={kind!r} is unknown; valid: demo, file, hub")
    check_template_file(data_cfg)
    rows = _rows(data_cfg, "path")
    fraction = data_cfg.get("heldout_fraction") or 0
    if fraction and data_cfg.get("heldout_path"):
        raise DataError("data.heldout_path and data.heldout_fraction are both set; give one")
    rows, held = split_heldout(rows, fraction, int(data_cfg.get("seed", 1234)))
    if data_cfg.get("heldout_path"):
        held = _rows(data_cfg, "heldout_path")
    validation_fraction = data_cfg.get("validation_fraction") or 0
    if validation_fraction and data_cfg.get("validation_path"):
        raise DataError("data.validation_path and data.validation_fraction are both set; give one")
    # a split of its own (seed + 1) from the rows left for training, after the held-out split
    rows, validation = split_heldout(rows, validation_fraction, int(data_cfg.get("seed", 1234)) + 1,
                                     what="data.validation_fraction")
    if data_cfg.get("validation_path"):
        validation = _rows(data_cfg, "validation_path")
    train = [{**to_example(row, here), "where": here} for here, row in rows]
    validation_mc, validation_text = _heldout(validation)
    return Data(train, *_heldout(held), validation_mc=validation_mc, validation_text=validation_text)
