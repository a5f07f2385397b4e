"""User data files: multiple-choice rows in JSONL and CSV, row-level errors, and a loader fuzz."""

import json
import random

import pytest

from harness.data import DataError, load_data

MC = [
    {"question": "Which is a fruit?", "choices": ["dog", "pear", "red", "car"], "answer": "B"},
    {"question": "Which is a colour?", "choices": ["teal", "cow", "bus", "fig"], "answer": 0},
    {"question": "Which is a tool?", "choices": ["lime", "owl", "awl", "sky"], "answer": "2"},
]
EXPECTED_ANSWERS = [1, 0, 2]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows, columns: bool):
    if columns:  # choices as columns A-D
        lines = ["question,A,B,C,D,answer"]
        lines += [",".join([r["question"], *r["choices"], str(r["answer"])]) for r in rows]
    else:  # choices as a JSON list in one cell (CSV-quoted)
        lines = ["question,choices,answer"]
        lines += [f'{r["question"]},"{json.dumps(r["choices"]).replace(chr(34), chr(34) * 2)}",{r["answer"]}'
                  for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def load(path, heldout=None):
    """(training examples as (prompt, reply) text, held-out multiple-choice rows)."""
    data = load_data({"kind": "file", "path": str(path), "heldout_path": str(heldout) if heldout else None})
    return [(ex["messages"][0]["content"], ex["messages"][-1]["content"]) for ex in data.train], data.heldout_mc


@pytest.mark.parametrize("fmt", ["jsonl", "csv-list", "csv-columns"])
def test_multiple_choice_rows_train_and_hold_out_in_every_format(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "mc.jsonl", MC)
    else:
        path = write_csv(tmp_path / "mc.csv", MC, columns=fmt == "csv-columns")
    examples, heldout = load(path, heldout=path)
    assert [reply for _, reply in examples] == [" B", " A", " C"]
    assert examples[0][0].endswith("Which is a fruit?\nA. dog\nB. pear\nC. red\nD. car\nAnswer:")
    assert [r["answer"] for r in heldout] == EXPECTED_ANSWERS
    assert [r["choices"] for r in heldout] == [r["choices"] for r in MC]


def test_heldout_path_in_the_other_format(tmp_path):
    """Training rows in one format, the held-out split in the other."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": " A"}])
    heldout_csv = write_csv(tmp_path / "heldout.csv", MC, columns=True)
    examples, heldout = load(train, heldout=heldout_csv)
    assert examples == [("Q?", " A")] and [r["answer"] for r in heldout] == EXPECTED_ANSWERS
    heldout_jsonl = write_jsonl(tmp_path / "heldout.jsonl", MC)
    assert load(write_csv(tmp_path / "train.csv", MC, columns=False), heldout=heldout_jsonl)[1] == heldout


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("bad.jsonl", '{"question": "Q", "choices": ["a", "b", "c", "d"], "answer": "E"}\n', "line 1, field 'answer'"),
        ("bad.jsonl", '{"prompt": "p", "completion": "c"}\n\n{"question": "Q", "answer": 1}\n', "line 3, field 'choices'"),
        ("bad.jsonl", '{"question": "Q", "choices": ["a", "b"], "answer": 1}\n', "line 1, field 'choices'"),
        ("bad.jsonl", '{"question": 5, "choices": ["a", "b", "c", "d"], "answer": 1}\n', "line 1, field 'question'"),
        ("bad.jsonl", '{"prompt": "p", "completion": 4}\n', "line 1, field 'completion'"),
        ("bad.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "p", "compl\n', "line 2: not a JSON object"),
        ("bad.jsonl", '["a", "b"]\n', "line 1: a row must be a JSON object"),
        ("bad.csv", "question,A,B,C,D,answer\nQ,a,b,c,d,7\n", "line 2, field 'answer'"),
        ("bad.csv", "question,A,B,C,D,answer\nQ,a,b\n", "line 2, field 'C'"),
        ("bad.csv", "question,choices,answer\nQ,not a list,A\n", "line 2, field 'choices'"),
        ("bad.csv", "question,choices,answer\nQ,x,A,extra\n", "line 2: more fields than the header"),
        ("bad.csv", "", "no rows"),
        ("bad.csv", "question,choices,answer\n", "no rows"),
    ],
)
def test_a_malformed_row_names_file_line_and_field(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c"}\n{"prompt": "caf\xe9", "completion": "c"}\n')
    with pytest.raises(DataError, match=r"line 2: byte 0xe9 is not UTF-8"):
        load(path)


# ---------------------------------------------------------------- fuzz
# Each corruption is chosen so that the file is certainly invalid; every one must end in a
# DataError (one line), never another exception.


def _valid_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"question": f"Question {i} {rng.random():.3f}?", "choices": [f"c{j}{i}" for j in range(4)],
                     "answer": rng.choice(["A", "B", "C", "D", 0, 1, 2, 3])})
    return rows


WRONG_VALUES = {"question": [None, 3, ["q"], {"q": 1}, True], "choices": [None, "abc", 4, ["a"], ["a", "b", "c", "d", "e"],
                                                                        [None, "b", "c", "d"], {"a": 1}],
                "answer": [None, "E", "AB", 4, -1, 1.5, True, [0], "x"]}


def corrupt(rng: random.Random, fmt: str) -> tuple[bytes, str]:
    """(file bytes, kind of corruption) of a certainly invalid data file."""
    rows = _valid_rows(rng, rng.randint(1, 6))
    k = rng.randrange(len(rows))
    kind = rng.choice(["truncated", "wrong type", "missing field", "non-utf8", "empty"])
    if kind == "empty":
        return rng.choice([b"", b"\n", b"  \n\n"] + ([b"question,choices,answer\n"] if fmt == "csv" else [])), kind
    if kind == "wrong type":
        field = rng.choice(list(WRONG_VALUES))
        rows[k][field] = rng.choice(WRONG_VALUES[field])
    if kind == "missing field":
        del rows[k][rng.choice(list(rows[k]))]
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in rows]
        if kind == "truncated":  # cut a line before its closing brace
            lines[k] = lines[k][: rng.randrange(1, len(lines[k]) - 1)]
    else:
        if kind == "wrong type" and "question" in rows[k] and not isinstance(rows[k]["question"], str):
            rows[k]["question"] = None  # a CSV cell is always text: the wrong type is an empty cell
        columns = rng.choice([True, False]) and all(isinstance(r.get("choices"), list) and len(r["choices"]) == 4
                                                    and all(isinstance(c, str) for c in r["choices"]) for r in rows)
        header = ["question", "A", "B", "C", "D", "answer"] if columns else ["question", "choices", "answer"]

        def cells(r):
            out = [r.get("question")]
            out += (list(r["choices"]) if columns else [json.dumps(r["choices"]) if "choices" in r else None])
            return out + [r.get("answer")]

        def cell(v):
            text = v if isinstance(v, str) else ("" if v is None else json.dumps(v))
            return '"' + text.replace('"', '""') + '"'

        lines = [",".join(header)]
        for r in rows:
            values = cells(r)
            if kind == "missing field":  # the field's cell is left out: fewer fields than the header
                values = [v for v in values if v is not None]
            lines.append(",".join(cell(v) for v in values))
        if kind == "truncated":  # the row loses its last fields
            parts = lines[k + 1].split('","')
            lines[k + 1] = '","'.join(parts[: rng.randint(1, len(parts) - 1)]) + '"'
    data = ("\n".join(lines) + "\n").encode()
    if kind == "non-utf8":
        cut = rng.randrange(len(data))
        data = data[:cut] + rng.choice([b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\x80abc"]) + data[cut:]
    return data, kind


def fuzz_files(tmp_path, n: int, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        fmt = rng.choice(["jsonl", "csv"])
        data, kind = corrupt(rng, fmt)
        path = tmp_path / f"fuzz{i}.{fmt}"
        path.write_bytes(data)
        yield path, kind


def test_fuzzed_files_always_give_one_line_data_errors(tmp_path):
    kinds: dict[str, int] = {}
    for path, kind in fuzz_files(tmp_path, 400, seed=14):
        # as training data and as the held-out split
        for cfg in ({"path": str(path)}, {"path": str(ok_file(tmp_path)), "heldout_path": str(path)}):
            try:
                load_data({"kind": "file", **cfg})
            except DataError as exc:
                assert "\n" not in str(exc) and str(path) in str(exc), (kind, path.read_bytes(), str(exc))
            else:
                raise AssertionError(f"{kind}: no error for {path.read_bytes()!r}")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"truncated", "wrong type", "missing field", "non-utf8", "empty"}


def ok_file(tmp_path):
    path = tmp_path / "ok.jsonl"
    if not path.exists():
        write_jsonl(path, MC)
    return path


# ---------------------------------------------------------------- fuzz: chat rows in JSONL, JSON and Parquet

CHAT_BREAKS = {
    "unknown role": lambda t: t.__setitem__(0, {"role": "narrator", "content": "x"}),
    "empty assistant turn": lambda t: t.__setitem__(-1, {"role": "assistant", "content": "  "}),
    "no assistant turn": lambda t: [t.__setitem__(i, {"role": "user", "content": "x"}) for i in range(len(t))],
    "ends with a user turn": lambda t: t.append({"role": "user", "content": "and?"}),
    "content not text": lambda t: t.__setitem__(0, {"role": "user", "content": 7}),
    "turn not an object": lambda t: t.__setitem__(0, "hello"),
}


def corrupt_chat(rng: random.Random, fmt: str, path) -> str:
    """Write a certainly invalid chat file of format ``fmt`` at ``path``; the kind of corruption."""
    rows = [{"messages": [{"role": "user", "content": f"q{i} {rng.random():.3f}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(rng.randint(1, 5))]
    kind = rng.choice([*CHAT_BREAKS, "truncated", "not a list"])
    k = rng.randrange(len(rows))
    if kind in CHAT_BREAKS:
        CHAT_BREAKS[kind](rows[k]["messages"])
    elif kind == "not a list":
        rows[k]["messages"] = rng.choice([None, 3, {"role": "user"}, []])
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if kind in ("turn not an object", "content not text", "not a list"):  # a column of one type
            rows = [{"messages": json.dumps(r["messages"])} for r in rows]  # as JSON text in a string column
        pq.write_table(pa.Table.from_pylist(rows), path)
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: rng.randrange(4, len(data) - 4)])
    else:
        text = json.dumps(rows) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in rows)
        if kind == "truncated":  # an array loses its end; JSON lines lose the end of the last line
            text = text[: rng.randrange(1, len(text) - 2)] if fmt == "json" else text[: -rng.randint(2, 10)]
        path.write_text(text)
    return kind


def test_fuzzed_chat_files_always_give_one_line_data_errors(tmp_path):
    rng, kinds = random.Random(21), set()
    for i in range(150):
        fmt = rng.choice(["jsonl", "json", "parquet"])
        path = tmp_path / f"chat{i}.{fmt}"
        kind = corrupt_chat(rng, fmt, path)
        for cfg in ({"path": str(path)}, {"path": str(ok_file(tmp_path)), "heldout_path": str(path)}):
            try:
                load_data({"kind": "file", **cfg})
            except DataError as exc:
                assert "\n" not in str(exc) and str(path) in str(exc), (kind, fmt, str(exc))
            else:
                raise AssertionError(f"{kind} ({fmt}): no error for {path}")
        kinds.add(kind)
    assert kinds == {*CHAT_BREAKS, "truncated", "not a list"}
