"""The demo task, user data formats, and the completion-only loss mask."""

import json

import pytest

from harness.data import DataError, format_mc, load_examples, make_demo, tokenize_examples
from harness.models import byte_tokenizer


def test_demo_is_seeded_and_splits_never_overlap():
    train, heldout = make_demo(300, 120, seed=7)
    assert (train, heldout) == make_demo(300, 120, seed=7)
    assert make_demo(300, 120, seed=8)[0] != train
    answers = lambda rows: {r["choices"][r["answer"]] for r in rows}
    assert not answers(train) & answers(heldout)
    questions = lambda rows: {(r["question"], tuple(r["choices"])) for r in rows}
    assert not questions(train) & questions(heldout)
    words = lambda rows: {w for r in rows for w in r["choices"]}  # noqa: E731
    assert not words(train) & words(heldout)  # distractors too
    assert {r["answer"] for r in heldout} == {0, 1, 2, 3}
    assert len(heldout) == len({r["question"] for r in heldout}) == 120  # each held-out word once
    assert len(make_demo(10, 500, seed=7)[1]) == 128  # no more held-out questions than held-out words


def test_demo_prompt_is_mmlu_format():
    prompt = format_mc("Which of the following is a fruit?", ["dog", "pear", "red", "car"], "word categories")
    assert prompt.startswith("The following are multiple choice questions (with answers) about word categories.\n\n")
    assert prompt.endswith("\nA. dog\nB. pear\nC. red\nD. car\nAnswer:")


@pytest.mark.parametrize(
    "rows,expected",
    [
        ([{"instruction": "Add", "input": "2+2", "output": "4"}], {"prompt": "Add\n\n2+2\n\n", "completion": "4"}),
        ([{"prompt": "Q?", "completion": " A"}], {"prompt": "Q?", "completion": " A"}),
    ],
)
def test_user_jsonl_formats(tmp_path, rows, expected):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, heldout = load_examples({"kind": "file", "path": str(path)})
    assert examples == [expected] and heldout == []


def test_user_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhello,world\n")
    assert load_examples({"kind": "file", "path": str(path)})[0] == [{"prompt": "hello", "completion": "world"}]


def test_unknown_columns_and_missing_file_are_clear_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match="expected instruction/input/output"):
        load_examples({"kind": "file", "path": str(path)})
    with pytest.raises(DataError, match="does not exist"):
        load_examples({"kind": "file", "path": str(tmp_path / "nope.jsonl")})


def test_loss_is_on_the_completion_only_even_when_truncated():
    tok = byte_tokenizer()
    ex = {"prompt": "x" * 100, "completion": " B"}
    (feat,) = tokenize_examples([ex], tok, seq_len=32)
    assert len(feat["input_ids"]) == 32
    completion = tok(" B", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for t in feat["labels"] if t != -100] == completion
    assert feat["input_ids"][-len(completion):] == completion
