"""Your data end to end on tiny-random: one run per file format and row shape, the held-out loss of
every arm and the base model, and a bad chat template stopped before any job."""

import pytest
from conftest import TINY, harness_run, planned
from test_data_shapes import CHAT, CHATML, write

from harness import job, records

BASE = [a for a in TINY if not a.startswith("data.")] + ["eval.on_random_weights=true", "eval.latency.enabled=false"]
SHAPES = {
    "chat": lambda i: CHAT[i % 2],
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"say {i}"}, {"from": "gpt", "value": f"{i}!"}]},
    "instruction": lambda i: {"instruction": "Repeat", "input": f"word {i}", "output": f"word {i}"},
    "completion": lambda i: {"prompt": f"Count to {i}:", "completion": " " + " ".join(map(str, range(i % 5 + 1)))},
}


def _run(tmp_path, *overrides):
    rec = job.execute(planned("method=lora", *BASE, "data=file", f"results_dir={tmp_path / 'results'}", *overrides))
    assert rec["status"] == "ok", rec["error"]
    return rec


@pytest.mark.parametrize("fmt,shape", [("jsonl", "chat"), ("json", "instruction"), ("parquet", "completion"),
                                       ("save_to_disk", "sharegpt"), ("csv", "instruction")])
def test_a_run_on_each_format_records_its_held_out_loss_template_and_loss_share(tmp_path, fmt, shape):
    rows = [SHAPES[shape](i) for i in range(12)]
    path = write(tmp_path / f"data.{fmt}" if fmt != "save_to_disk" else tmp_path / "saved", rows, fmt)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    rec = _run(tmp_path, f"data.path={path}", "data.heldout_fraction=0.25", f"data.chat_template={template}")
    m = rec["metrics"]
    assert m["chat_template"] == str(template) and m["loss_on"] == "assistant"
    assert 0 < m["loss_token_share"] < 1
    assert m["heldout_n"] == 3 and m["heldout_loss"] > 0 and m["heldout_loss_se"] > 0
    assert m["indomain_acc"] is None  # no multiple-choice rows held out
    base = records.find_ok(tmp_path / "results", rec["base_run_id"])
    assert base["metrics"]["heldout_n"] == 3
    assert m["heldout_loss_change_vs_base"] == pytest.approx(m["heldout_loss"] - base["metrics"]["heldout_loss"])
    items = records.read_items(tmp_path / "results", rec)
    base_items = records.read_items(tmp_path / "results", base)
    ids = lambda its: sorted(it["id"] for it in its if it["task"] == "heldout_loss")  # noqa: E731
    assert ids(items) == ids(base_items) and len(ids(items)) == 3  # the same examples, paired by id


def test_training_lowers_the_held_out_loss_on_the_training_rows_below_the_base_models(tmp_path):
    """Held out = the training rows themselves: a full fine-tune that fits them must have a lower
    loss on their replies than the base model. A loss on the wrong tokens (the prompts, or
    unshifted) does not fall like this."""
    rows = [{"prompt": f"Q{i}:", "completion": " yes" if i % 2 else " no"} for i in range(8)]
    path = write(tmp_path / "d.jsonl", rows, "jsonl")
    rec = job.execute(planned("method=full", *BASE, "data=file", f"data.path={path}", f"data.heldout_path={path}",
                              "train.max_steps=30", "method.learning_rate=3e-3", f"results_dir={tmp_path}"))
    assert rec["status"] == "ok", rec["error"]
    base = records.find_ok(tmp_path, rec["base_run_id"])["metrics"]
    m = rec["metrics"]
    assert m["heldout_loss"] < 0.5 * base["heldout_loss"], (m["heldout_loss"], base["heldout_loss"])


@pytest.mark.slow
def test_loss_on_all_trains_on_more_tokens_than_assistant(tmp_path):
    path = write(tmp_path / "c.jsonl", CHAT * 4, "jsonl")
    share = {on: _run(tmp_path / on, f"data.path={path}", f"data.loss_on={on}")["metrics"]["loss_token_share"]
             for on in ("assistant", "all")}
    assert share["all"] == 1.0 > share["assistant"]


def test_a_template_that_cannot_render_stops_the_sweep_before_any_job(tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text("{{ raise_exception('this template renders nothing') }}")
    path = write(tmp_path / "c.jsonl", CHAT, "jsonl")
    results = tmp_path / "results"
    proc = harness_run("-m", "method=full,lora", *BASE, "data=file", f"data.path={path}",
                       f"data.chat_template={template}", f"results_dir={results}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "c.jsonl, line 1: the chat template cannot render this row" in line
    assert not results.exists() or not any(results.iterdir())


def test_auto_on_a_tokenizer_without_a_template_trains_on_raw_text_and_says_so(tmp_path):
    path = write(tmp_path / "c.jsonl", CHAT * 2, "jsonl")
    m = _run(tmp_path, f"data.path={path}")["metrics"]
    assert m["chat_template"] == "none" and m["chat_template_hash"] is None  # tiny-random has no template


def test_the_report_shows_the_paired_held_out_loss_gap_of_each_peft_arm(tmp_path):
    from harness.report import build_report

    rows = [SHAPES["instruction"](i) for i in range(16)]
    path = write(tmp_path / "d.jsonl", rows, "jsonl")
    results = tmp_path / "results"
    recs = {m: job.execute(planned(f"method={m}", *BASE, "data=file", f"data.path={path}",
                                   "data.heldout_fraction=0.25", f"results_dir={results}"))
            for m in ("full", "lora")}
    assert all(r["status"] == "ok" for r in recs.values())
    written = build_report(results, tmp_path / "reports")
    assert written["learning_vs_forgetting.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "indomain_by_rank.png" not in written  # no multiple-choice held-out rows: no in-domain accuracy
    table = (tmp_path / "reports" / "at-a-glance.md").read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| held-out loss gap vs full FT")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    gap = recs["lora"]["metrics"]["heldout_loss"] - recs["full"]["metrics"]["heldout_loss"]
    assert cells[2].startswith("reference: ") and f"{gap:+.3f} nats/token [" in cells[3], cells
    assert "(1 seed: training noise not estimated)" in cells[3]
    (row,) = [line for line in table.splitlines() if line.startswith("| forgetting: general-text loss rise")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("reference: ")  # the base model
    for cell, method in zip(cells[2:], ("full", "lora")):
        assert f"{recs[method]['metrics']['forgetting_loss_delta']:+.3f} nats/token [" in cell, cells


def test_forgetting_is_the_rise_of_the_general_text_loss_over_the_base_model(tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": " yes" if i % 2 else " no"} for i in range(8)]
    path = write(tmp_path / "d.jsonl", rows, "jsonl")
    text = tmp_path / "general.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    rec = job.execute(planned("method=full", *BASE, "data=file", f"data.path={path}", "train.max_steps=30",
                              "method.learning_rate=3e-3", f"eval.forgetting.path={text}",
                              "eval.forgetting.max_tokens=512", "eval.forgetting.chunk_tokens=64",
                              f"results_dir={tmp_path}"))
    assert rec["status"] == "ok", rec["error"]
    m, base = rec["metrics"], records.find_ok(tmp_path, rec["base_run_id"])["metrics"]
    assert m["forgetting_n"] == base["forgetting_n"] == 8 and m["forgetting_tokens"] == 512 - 8  # 63 targets a chunk
    assert m["forgetting_loss_delta"] == pytest.approx(m["forgetting_loss"] - base["forgetting_loss"])
    assert m["forgetting_loss_delta"] != 0  # training on the task moved the loss on other text


def test_the_default_forgetting_sample_is_bundled_and_a_missing_one_is_a_usage_error(tmp_path):
    from harness.config import UsageError
    from harness.models import byte_tokenizer
    from harness.nll import DEFAULT_TEXT, forgetting_features
    from harness.plan import check_inputs

    assert DEFAULT_TEXT.is_file() and 50_000 < DEFAULT_TEXT.stat().st_size < 500_000
    chunks = forgetting_features(byte_tokenizer(), {"path": None, "max_tokens": 2048, "chunk_tokens": 128})
    assert len(chunks) == 16 and all(c["labels"] == c["input_ids"] for c in chunks)
    cfg = planned(*BASE, "eval.forgetting.path=/no/such.txt", f"results_dir={tmp_path}")["config"]
    with pytest.raises(UsageError, match="eval.forgetting.path='/no/such.txt' does not exist"):
        check_inputs(cfg)
