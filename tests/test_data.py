"""The demo task, user data formats, and the completion-only loss mask."""

import json
import re

import pytest

from harness.data import DataError, format_mc, load_data, make_demo, tokenize_examples
from harness.data.shapes import to_example
from harness.models import byte_tokenizer


def pc(prompt: str, completion: str) -> dict:
    """A prompt/completion example."""
    return to_example({"prompt": prompt, "completion": completion}, "test row")


def raw(example: dict) -> tuple[str, str]:
    """(prompt, reply) text of a two-turn example."""
    return example["messages"][0]["content"], example["messages"][-1]["content"]


def fit_counts(counts: dict) -> tuple[int, int, int]:
    return counts["examples_kept"], counts["examples_truncated"], counts["examples_dropped"]


def test_demo_is_seeded_and_splits_never_overlap():
    train, heldout, validation = make_demo(300, 120, seed=7)
    assert (train, heldout, validation) == make_demo(300, 120, seed=7) and validation == []
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


def test_demo_validation_words_are_their_own_and_leave_the_default_rows_as_they_were():
    import hashlib

    # the rows every earlier demo and ci-smoke run trained and was scored on (the gate's baseline)
    rows = make_demo(400, 128, 1234)
    assert hashlib.sha256(json.dumps(rows[:2], sort_keys=True).encode()).hexdigest()[:16] == "e5e895b199523615"
    train, heldout, validation = make_demo(400, 128, 1234, n_validation=32)
    words = lambda rows: {w for r in rows for w in r["choices"]}  # noqa: E731
    assert len(validation) == len({r["question"] for r in validation}) == 32
    assert not words(validation) & words(train) and not words(validation) & words(heldout)
    assert heldout and not words(train) & words(heldout)


def test_demo_prompt_is_mmlu_format():
    prompt = format_mc("Which of the following is a fruit?", ["dog", "pear", "red", "car"], "word categories")
    assert prompt.startswith("The following are multiple choice questions (with answers) about word categories.\n\n")
    assert prompt.endswith("\nA. dog\nB. pear\nC. red\nD. car\nAnswer:")


@pytest.mark.parametrize(
    "rows,expected",
    [
        ([{"instruction": "Add", "input": "2+2", "output": "4"}], ("instruction", "Add\n\n2+2", "4")),
        ([{"prompt": "Q?", "completion": " A"}], ("completion", "Q?", " A")),
    ],
)
def test_user_jsonl_formats(tmp_path, rows, expected):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data({"kind": "file", "path": str(path)})
    (ex,) = data.train
    assert (ex["style"], *raw(ex)) == expected and data.heldout_mc == data.heldout_text == []


def test_user_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhello,world\n")
    assert [raw(ex) for ex in load_data({"kind": "file", "path": str(path)}).train] == [("hello", "world")]


def test_unknown_columns_and_missing_file_are_clear_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match="expected messages"):
        load_data({"kind": "file", "path": str(path)})
    with pytest.raises(DataError, match="does not exist"):
        load_data({"kind": "file", "path": str(tmp_path / "nope.jsonl")})


def test_loss_is_on_the_completion_only_even_when_truncated():
    tok = byte_tokenizer()
    ex = pc("x" * 100, " B")
    (feat,), _ = tokenize_examples([ex], tok, seq_len=32)
    assert len(feat["input_ids"]) == 32
    completion = tok(" B", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for t in feat["labels"] if t != -100] == completion
    assert feat["input_ids"][-len(completion):] == completion


# ---------------------------------------------------------------- examples longer than train.seq_len


def _fit(prompt_len: int, completion_len: int, seq_len: int, **data):
    """One example of ``prompt_len`` prompt bytes and ``completion_len`` completion bytes (+ eos)
    through tokenize_examples with the byte tokenizer (one token per byte)."""
    tok = byte_tokenizer()
    ex = pc("p" * (prompt_len - 1) + "P", "C" + "c" * (completion_len - 1))
    return tok, tokenize_examples([ex], tok, seq_len=seq_len, data_cfg=data)


def test_a_long_completion_keeps_the_end_of_the_prompt_and_loses_its_own_end():
    # before: the completion was kept whole up to seq_len and the prompt cut away entirely
    tok, (features, counts) = _fit(100, 60, seq_len=32, min_prompt_tokens=16, overlong="truncate")
    (feat,) = features
    assert len(feat["input_ids"]) == 32
    prompt = [i for i, lab in zip(feat["input_ids"], feat["labels"]) if lab == -100]
    completion = [lab for lab in feat["labels"] if lab != -100]
    assert len(prompt) == 16 and tok.decode(prompt) == "p" * 15 + "P"  # the prompt's end, next to the completion
    assert len(completion) == 16 and tok.decode(completion) == "C" + "c" * 15  # the completion's start
    assert fit_counts(counts) == (1, 1, 0)


def test_a_short_completion_is_kept_whole_and_the_prompt_start_goes():
    tok, ((feat,), counts) = _fit(100, 2, seq_len=32)  # 2 bytes + eos
    assert [lab for lab in feat["labels"] if lab != -100][-1] == tok.eos_token_id
    assert feat["labels"].count(-100) == 29 and counts["examples_truncated"] == 1


def test_overlong_drop_leaves_out_what_does_not_fit_whole():
    tok = byte_tokenizer()
    fits = pc("q" * 20, " A")  # 20 + 2 + eos = 23
    too_long = pc("q" * 20, " " + "a" * 20)
    features, counts = tokenize_examples([fits, too_long, fits], tok, seq_len=23, data_cfg={"overlong": "drop"})
    assert [len(f["input_ids"]) for f in features] == [23, 23]
    assert fit_counts(counts) == (2, 0, 1)
    with pytest.raises(DataError, match="no training example is left"):
        tokenize_examples([too_long], tok, seq_len=23, data_cfg={"overlong": "drop"})


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"overlong": "cut"}, "data.overlong='cut' is unknown; valid: truncate, drop"),
        ({"min_prompt_tokens": 32}, "data.min_prompt_tokens=32 is invalid"),
        ({"min_prompt_tokens": -1}, "data.min_prompt_tokens=-1 is invalid"),
        ({"min_prompt_tokens": "many"}, "data.min_prompt_tokens='many' is invalid"),
    ],
)
def test_fit_settings_are_checked(data, needle):
    with pytest.raises(DataError, match=re.escape(needle)):
        _fit(10, 2, seq_len=32, **data)



@pytest.mark.parametrize("overlong,counts", [("truncate", (4, 1, 0)), ("drop", (3, 0, 1))])
def test_a_run_records_and_warns_how_many_examples_were_cut_or_dropped(tmp_path, capsys, overlong, counts):
    from conftest import TINY, planned

    from harness import job as run

    rows = [{"prompt": "Q: short?", "completion": " A"}] * 2 + [{"prompt": "x" * 300, "completion": " " + "y" * 300}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "Q?", "completion": " B"}))
    tiny = [a for a in TINY if not a.startswith("data.")]
    rec = run.execute(planned("method=lora", *tiny, "data=file", f"data.path={path}", f"data.overlong={overlong}",
                              f"results_dir={tmp_path}"))
    m = rec["metrics"]
    assert rec["status"] == "ok", rec["error"]
    assert (m["examples_kept"], m["examples_truncated"], m["examples_dropped"]) == counts
    assert "1 of 4 training examples are longer than train.seq_len=64" in capsys.readouterr().out
