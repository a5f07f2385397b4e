"""Row shapes: what a row of the user's data says, turned into one example.

An example is ``{"style", "messages"}``: the conversation (``role``: system, user, assistant;
``content``) and the shape it came from, which decides how it is rendered without a chat
template (``harness.data.render``):

- ``mc``: question/choices/answer (choices a list, or columns A-D): MMLU's prompt and a letter;
- ``completion``: prompt/completion;
- ``instruction``: instruction/input/output, with an optional system;
- ``chat``: ``messages`` (role/content) or ShareGPT's ``conversations`` (from/value: system,
  human, gpt), one or many turns.

``data.columns.<field>=<column>`` maps other column names onto these fields.
"""

from __future__ import annotations

import json

from harness.data.demo import LETTERS, format_mc
from harness.data.sources import DataError, where

MC_FIELDS = ("question", "choices", "answer")
FIELDS = ("prompt", "completion", "instruction", "input", "output", "system", "question", "choices", "answer",
          "subject", "id", "messages", "conversations")
SHAPES = ("messages (role/content), conversations (from/value), prompt/completion, instruction/input/output, "
          "or question/choices/answer (choices: a list, or columns A-D)")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def map_columns(row: dict, columns: dict | None, here: str) -> dict:
    """``row`` with ``data.columns`` applied (field -> the user's column name)."""
    columns = {k: v for k, v in (columns or {}).items() if v is not None}  # null: the field's own name
    if not columns:
        return row
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"data.columns.{unknown[0]} is not a field; valid: {', '.join(FIELDS)}")
    row = dict(row)
    for fieldname, column in columns.items():
        if column not in row:
            raise DataError(f"{here}: data.columns.{fieldname}={column!r} names no column of the row "
                            f"(its columns: {sorted(map(str, row))})")
        row[fieldname] = row.pop(column)
    return row


def _text(row: dict, fieldname: str, here: str, required: bool = True) -> str | None:
    value = row.get(fieldname)
    if value is None:
        if required:
            raise DataError(f"{where(here, fieldname)}: missing; rows need {SHAPES}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where(here, fieldname)}: {type(value).__name__} {value!r:.40}; give text (a string)")
    if required and not value.strip():
        raise DataError(f"{where(here, fieldname)}: empty")
    return value


def _choices(row: dict, here: str) -> list[str]:
    if "choices" not in row and all(k in row for k in LETTERS):  # CSV columns A, B, C, D (MMLU's layout)
        choices = [row[k] for k in LETTERS]
        for letter, c in zip(LETTERS, choices):
            if c is None or not str(c).strip():
                raise DataError(f"{where(here, letter)}: empty")
        return [str(c) for c in choices]
    choices = row.get("choices")
    if choices is None:
        raise DataError(f"{where(here, 'choices')}: missing; give a list of 4 choices (or columns A, B, C, D)")
    if isinstance(choices, str):  # a CSV cell holds a JSON list
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise DataError(f"{where(here, 'choices')}: {choices!r:.40} is not a JSON list "
                            '(write it as ["a", "b", "c", "d"], or use columns A, B, C, D)') from None
    if isinstance(choices, tuple):
        choices = list(choices)
    if not isinstance(choices, list) or len(choices) != len(LETTERS):
        raise DataError(f"{where(here, 'choices')}: {choices!r:.60}; give a list of exactly 4 choices")
    for c in choices:
        if isinstance(c, bool) or not isinstance(c, str | int | float) or not str(c).strip():
            raise DataError(f"{where(here, 'choices')}: choice {c!r:.40} is not text (or is empty)")
    return [str(c) for c in choices]


def _answer(row: dict, here: str) -> int:
    answer = row.get("answer")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        return LETTERS.index(answer.strip().upper())
    if isinstance(answer, str) and answer.strip() in {"0", "1", "2", "3"}:
        return int(answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(LETTERS):
        return answer
    shown = "missing" if answer is None else f"{answer!r:.40}"
    raise DataError(f"{where(here, 'answer')}: {shown}; give a letter A-D or an index 0-3")


def is_mc(row: dict) -> bool:
    return any(k in row for k in MC_FIELDS)


def parse_mc(row: dict, here: str) -> dict:
    """A checked multiple-choice row: {question, choices (4), answer (index), subject?, id?}."""
    out = {"question": _text(row, "question", here), "choices": _choices(row, here), "answer": _answer(row, here)}
    if _text(row, "subject", here, required=False):
        out["subject"] = row["subject"]
    if row.get("id") is not None:
        out["id"] = str(row["id"])
    return out


def mc_example(row: dict) -> dict:
    """A checked multiple-choice row as a training example: MMLU's prompt, the letter as the reply."""
    prompt = format_mc(row["question"], row["choices"], row.get("subject", "general knowledge"))
    return {"style": "mc", "messages": [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": " " + LETTERS[int(row["answer"])]}]}


def _turns(row: dict, here: str) -> list[dict]:
    """``messages`` (role/content) or ``conversations`` (from/value), checked."""
    key = "messages" if "messages" in row else "conversations"
    role_key, content_key, roles = (("role", "content", {r: r for r in ROLES}) if key == "messages"
                                    else ("from", "value", SHAREGPT_ROLES))
    turns = row[key]
    if isinstance(turns, str):  # a CSV cell, or a column stored as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise DataError(f"{where(here, key)}: not a list of turns (nor JSON text of one)") from None
    if isinstance(turns, tuple):
        turns = list(turns)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where(here, key)}: {turns!r:.60}; give a list of turns "
                        f"({{{role_key!r}: ..., {content_key!r}: ...}})")
    out = []
    for i, turn in enumerate(turns):
        at = where(here, f"{key}[{i}]")
        if not isinstance(turn, dict):
            raise DataError(f"{at}: {turn!r:.40} is not a turn ({{{role_key!r}: ..., {content_key!r}: ...}})")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"{at}.{role_key}: {role!r:.30} is not a role; valid: {', '.join(roles)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{at}.{content_key}: {type(content).__name__}; give text (a string)")
        if roles[role] == "assistant" and not content.strip():
            raise DataError(f"{at}.{content_key}: an empty assistant turn (nothing to train on)")
        out.append({"role": roles[role], "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where(here, key)}: no assistant turn; a conversation needs one to train on")
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where(here, key)}: it ends with a {out[-1]['role']!r} turn; the last turn must be "
                        "the assistant's")
    return out


def to_example(row: dict, here: str) -> dict:
    """One example from a row of any shape (see the module docstring)."""
    if is_mc(row):
        return mc_example(parse_mc(row, here))
    if "messages" in row or "conversations" in row:
        return {"style": "chat", "messages": _turns(row, here)}
    if "prompt" in row or "completion" in row:
        return {"style": "completion", "messages": [{"role": "user", "content": _text(row, "prompt", here)},
                                                    {"role": "assistant", "content": _text(row, "completion", here)}]}
    if "instruction" in row or "output" in row:
        prompt = _text(row, "instruction", here)
        if extra := _text(row, "input", here, required=False):
            prompt += "\n\n" + extra
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", here)}]
        if system := _text(row, "system", here, required=False):
            messages.insert(0, {"role": "system", "content": system})
        return {"style": "instruction", "messages": messages}
    raise DataError(f"{here}: a row has columns {sorted(map(str, row))}; expected {SHAPES} "
                    "(data.columns.<field>=<column> maps other names)")
