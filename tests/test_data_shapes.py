"""Your data: every file format and row shape, the chat template, which tokens carry the loss, the
held-out split and the held-out loss, and their one-line errors."""

import json
import math

import pytest

from harness.data import DataError, load_data, tokenize_examples
from harness.data.shapes import to_example
from harness.models import byte_tokenizer

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
]
# a ChatML template in a file, as a user gives one for a tokenizer that has none (tiny-random's)
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write(path, rows, fmt):
    """``rows`` as a file (or folder) of format ``fmt``."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "json-lines":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows])
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("save_to_disk", "save_to_disk-dict"):
        import datasets

        ds = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": ds, "test": ds}) if fmt == "save_to_disk-dict" else ds).save_to_disk(str(path))
    return path


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "json-lines": ".json", "csv": ".csv", "parquet": ".parquet",
          "save_to_disk": "", "save_to_disk-dict": ""}


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_every_format_gives_the_same_chat_examples(tmp_path, fmt):
    path = write(tmp_path / f"chats{SUFFIX[fmt]}", CHAT, fmt)
    data = load_data({"kind": "file", "path": str(path), "split": "test" if fmt.endswith("dict") else None})
    assert [ex["messages"] for ex in data.train] == [r["messages"] for r in CHAT]
    assert {ex["style"] for ex in data.train} == {"chat"}


def test_a_local_file_or_folder_given_as_a_hub_dataset_loads_like_a_file(tmp_path):
    folder = write(tmp_path / "saved", CHAT, "save_to_disk-dict")
    data = load_data({"kind": "hub", "dataset": str(folder), "split": "train"})
    assert [ex["messages"] for ex in data.train] == [r["messages"] for r in CHAT]
    pq = write(tmp_path / "rows.parquet", CHAT, "parquet")
    assert len(load_data({"kind": "hub", "dataset": str(pq), "split": "train"}).train) == 2


@pytest.mark.parametrize("row,style,messages", [
    ({"prompt": "Q?", "completion": " A"}, "completion", [("user", "Q?"), ("assistant", " A")]),
    ({"instruction": "Add", "input": "2+2", "output": "4", "system": "Math."}, "instruction",
     [("system", "Math."), ("user", "Add\n\n2+2"), ("assistant", "4")]),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "hello"}]}, "chat",
     [("system", "S"), ("user", "hi"), ("assistant", "hello")]),
    ({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "C"}, "mc", None),
])
def test_each_row_shape_becomes_a_conversation(row, style, messages):
    ex = to_example(row, "f, line 1")
    assert ex["style"] == style
    if messages:
        assert [(m["role"], m["content"]) for m in ex["messages"]] == messages
    else:
        assert ex["messages"][-1] == {"role": "assistant", "content": " C"}


def test_columns_map_other_names(tmp_path):
    rows = [{"conversation": r["messages"]} for r in CHAT]
    path = write(tmp_path / "c.jsonl", rows, "jsonl")
    data = load_data({"kind": "file", "path": str(path), "columns": {"messages": "conversation"}})
    assert [ex["messages"] for ex in data.train] == [r["messages"] for r in CHAT]


def _one(example, tok, **data):
    (feat,), counts = tokenize_examples([example], tok, seq_len=512, data_cfg=data)
    return feat, counts


def test_a_template_puts_the_loss_on_each_reply_and_its_end_of_turn(tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    tok = byte_tokenizer()
    ex = to_example(CHAT[1], "f, line 2")
    feat, counts = _one(ex, tok, chat_template=str(template))
    text = tok.decode(feat["input_ids"])
    assert text == "<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n<|user|>\nand 3+3?</s>\n<|assistant|>\n6</s>\n"
    targets = tok.decode([t for t in feat["labels"] if t != -100])
    assert targets == "4</s>\n6</s>\n"  # both replies with their end-of-turn, nothing of the prompts
    assert counts["chat_template"] == str(template) and counts["chat_template_hash"]
    last, _ = _one(ex, tok, chat_template=str(template), loss_on="last")
    assert tok.decode([t for t in last["labels"] if t != -100]) == "6</s>\n"
    everything, _ = _one(ex, tok, chat_template=str(template), loss_on="all")
    assert everything["labels"] == everything["input_ids"]


def test_loss_on_all_gives_a_larger_loss_token_share_than_assistant_and_last_a_smaller():
    tok = byte_tokenizer()
    examples = [to_example(r, "f") for r in CHAT]
    share = {on: tokenize_examples(examples, tok, 512, {"loss_on": on, "chat_template": "none"})[1]["loss_token_share"]
             for on in ("all", "assistant", "last")}
    assert share["all"] == 1.0 > share["assistant"] > share["last"] > 0


def test_without_a_template_chat_turns_are_joined_by_blank_lines_and_end_with_eos():
    tok = byte_tokenizer()
    feat, counts = _one(to_example(CHAT[0], "f"), tok)  # auto: the byte tokenizer has no template
    assert counts["chat_template"] == "none"
    assert tok.decode(feat["input_ids"]) == "Be brief.\n\nCapital of France?\n\nParis.</s>"
    assert tok.decode([t for t in feat["labels"] if t != -100]) == "Paris.</s>"


def test_multiple_choice_rows_keep_mmlus_prompt_under_a_template(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(CHATML)
    tok = byte_tokenizer()
    mc = to_example({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 1}, "f")
    with_template, _ = _one(mc, tok, chat_template=str(template))
    without, _ = _one(mc, tok, chat_template="none")
    assert with_template == without and tok.decode(without["input_ids"]).endswith("Answer: B</s>")


def test_heldout_fraction_is_a_seeded_split_never_trained_on(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    path = write(tmp_path / "r.jsonl", rows, "jsonl")
    cfg = {"kind": "file", "path": str(path), "heldout_fraction": 0.25, "seed": 3}
    a, b = load_data(cfg), load_data(cfg)
    assert [ex["id"] for ex in a.heldout_text] == [ex["id"] for ex in b.heldout_text]
    assert len(a.heldout_text) == 10 and len(a.train) == 30
    trained = {ex["messages"][0]["content"] for ex in a.train}
    held = {ex["messages"][0]["content"] for ex in a.heldout_text}
    assert not trained & held and len(trained | held) == 40
    assert held != {ex["messages"][0]["content"] for ex in load_data({**cfg, "seed": 4}).heldout_text}


def test_heldout_loss_is_the_models_own_loss_on_the_reply_tokens():
    """nll_items against the model's own shifted cross-entropy (transformers' loss with labels)."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.models import arch_config
    from harness.nll import loss_metrics, nll_items

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_config({"source": "config", "arch": "tiny-random"})).eval()
    tok = byte_tokenizer()
    examples = [{**to_example(r, "f"), "id": str(i)} for i, r in enumerate(CHAT)]
    features, _ = tokenize_examples(examples, tok, 512, {})
    items = nll_items(model, tok, features, batch_size=2)
    for f, it in zip(features, items):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]))
        n = sum(label != -100 for label in f["labels"][1:])
        assert it["n_tokens"] == n and it["nll"] == pytest.approx(float(out.loss) * n, rel=1e-4)
    m = loss_metrics(items)
    assert m["heldout_loss"] == pytest.approx(sum(i["nll"] for i in items) / sum(i["n_tokens"] for i in items))
    assert m["heldout_ppl"] == pytest.approx(math.exp(m["heldout_loss"])) and m["heldout_n"] == 2


@pytest.mark.parametrize("name,write_bad,needle", [
    ("truncated.parquet", lambda p: p.write_bytes(b"PAR1\x00\x01garbage"), "not a readable Parquet file"),
    ("role.jsonl", lambda p: p.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]})),
     "line 1, field 'messages[0]'.role: 'bot' is not a role"),
    ("empty.jsonl", lambda p: p.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                    {"role": "assistant", "content": " "}]})),
     "an empty assistant turn"),
    ("noreply.jsonl", lambda p: p.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]})),
     "no assistant turn"),
    ("sharegpt.json", lambda p: p.write_text(json.dumps([{"conversations": [{"from": "alien", "value": "x"}]}])),
     "row 1, field 'conversations[0]'.from: 'alien' is not a role"),
    ("array.json", lambda p: p.write_text("[1, 2]"), "row 1: a row must be a JSON object"),
    ("ext.txt", lambda p: p.write_text("x"), "unknown extension '.txt'"),
])
def test_malformed_files_and_rows_are_one_line_naming_file_row_and_field(tmp_path, name, write_bad, needle):
    path = tmp_path / name
    write_bad(path)
    with pytest.raises(DataError, match=None) as err:
        load_data({"kind": "file", "path": str(path)})
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_setting_errors_are_one_line(tmp_path):
    path = write(tmp_path / "c.jsonl", CHAT, "jsonl")
    cases = [
        ({"columns": {"messages": "conversation"}}, "data.columns.messages='conversation' names no column"),
        ({"columns": {"text": "body"}}, "data.columns.text is not a field"),
        ({"chat_template": "/no/such.jinja"}, "data.chat_template='/no/such.jinja'"),
        ({"heldout_fraction": 0.5, "heldout_path": str(path)}, "give one"),
    ]
    for extra, needle in cases:
        with pytest.raises(DataError) as err:
            load_data({"kind": "file", "path": str(path), **extra})
        assert needle in str(err.value) and "\n" not in str(err.value), (extra, str(err.value))
    folder = write(tmp_path / "saved", CHAT, "save_to_disk-dict")
    with pytest.raises(DataError, match=r"has the splits \['test', 'train'\]; give one as data.split"):
        load_data({"kind": "file", "path": str(folder), "split": "validation"})
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_data({"kind": "file", "path": str(tmp_path / "plain")})


def test_a_template_that_cannot_render_names_the_row(tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                        "{% endif %}{{ m['content'] }}{% endfor %}")
    path = write(tmp_path / "c.jsonl", CHAT, "jsonl")
    data = load_data({"kind": "file", "path": str(path), "chat_template": str(template)})
    with pytest.raises(DataError, match=r"c.jsonl, line 1: the chat template cannot render this row"):
        tokenize_examples(data.train, byte_tokenizer(), 512, {"chat_template": str(template)})


def test_a_tokenizer_without_offsets_gets_the_same_reply_mask(tmp_path):
    """A slow (Python) tokenizer has no offset mapping: the rendering is tokenized piece by piece,
    cut at the replies; on the byte tokenizer both ways give the same ids and labels."""
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    fast = byte_tokenizer()
    slow = byte_tokenizer()
    examples = [to_example(r, "f") for r in CHAT]
    cfg = {"chat_template": str(template)}

    class Slow:  # the same tokenizer, seen as one without offsets
        is_fast = False

        def __getattr__(self, name):
            return getattr(slow, name)

        def __call__(self, *args, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return slow(*args, **kwargs)

    assert tokenize_examples(examples, Slow(), 512, cfg) == tokenize_examples(examples, fast, 512, cfg)


def test_a_column_mapping_is_one_override_from_the_shell(tmp_path):
    from conftest import composed

    rows = [{"conversation": r["messages"]} for r in CHAT]
    path = write(tmp_path / "c.jsonl", rows, "jsonl")
    cfg = composed("data=file", f"data.path={path}", "data.columns.messages=conversation")
    assert [ex["messages"] for ex in load_data(cfg["data"]).train] == [r["messages"] for r in CHAT]
