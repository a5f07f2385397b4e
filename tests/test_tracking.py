"""Experiment trackers (tracking=mlflow|wandb|tensorboard|trackio, harness-export), against the real
libraries: MLflow with a local sqlite store read back through MlflowClient, W&B in offline mode (its
run folder read back), TensorBoard's event files read back with tensorboard's own reader. Trackio
cannot be installed beside constraints.txt (docs/trackers.md): its test checks the one-line error.

Tiny-random jobs: a sweep through the real harness-run (isolate=false: one process), the other
backends through ``harness.job.execute`` in this process, as harness-run's job process calls it."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import math
import os
import shutil
import socket
import struct
import time
from pathlib import Path

import conftest
import pytest
from conftest import TINY, harness_run

from harness import job as run
from harness import records, tracking
from harness.config import UsageError
from harness.plan import preflight

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny jobs on a shared machine: one torch thread
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same for harness-run's process

# a tiny job whose base model is evaluated too (8 held-out questions: per-question answers)
FAST = [*TINY, "eval.on_random_weights=true", "eval.indomain.batch_size=8", "eval.latency.enabled=false",
        "eval.variants.enabled=false", "eval.forgetting.enabled=false"]


@pytest.fixture(autouse=True)
def clean_tracking():
    """Each test starts with no tracker marked down and leaves the environment as it found it
    (the trackers' settings go through os.environ)."""
    saved = dict(os.environ)
    tracking._down.clear()
    yield
    tracking._down.clear()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made (MLflow's migrations take seconds), copied per test."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def store(empty_store: Path, path: Path) -> str:
    shutil.copy(empty_store, path)
    return f"sqlite:///{path}"


def flat_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The record's scalar metrics as a tracker should show them (nested names dotted)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float)):
            out[f"{prefix}{k}"] = float(v)
    return out


def equal(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def load_records(results: Path) -> dict[str, dict]:
    return {rec["run_id"]: rec for rec in records.load_records(results)}


def job_in(results: Path, *overrides: str) -> dict:
    return conftest.planned(*FAST, f"results_dir={results}", *overrides)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("overrides", [
    ["tracking=mlflow", "tracking.uri=sqlite:///elsewhere.db", "tracking.timeout_s=5"],
    ["tracking=wandb", "tracking.project=peft-vs-full", "tracking.entity=team", "tracking.group=sweep-1"],
    ["tracking=tensorboard", "tracking.dir=tb", "tracking.live=false", "tracking.artifacts=false"],
    ["tracking=trackio"],
])
def test_tracking_settings_change_no_run_id(overrides):
    a, b = conftest.planned("model=tiny-random", "hardware=cpu"), conftest.planned("model=tiny-random", "hardware=cpu",
                                                                                   *overrides)
    assert (a["config_hash"], a["pair_key"], a["run_id"], a["eval_key"], a["base_run_id"]) == (
        b["config_hash"], b["pair_key"], b["run_id"], b["eval_key"], b["base_run_id"])
    assert b["config"]["tracking"]["backend"] == overrides[0].split("=")[1]


@pytest.mark.parametrize("override, message", [
    ("tracking.backend=neptune", "tracking.backend='neptune' is invalid; give one of none, mlflow, wandb"),
    ("tracking.timeout_s=0", "tracking.timeout_s=0 is invalid; give a number > 0"),
    ("+tracking.urii=x", "tracking.urii is not a setting of tracking; did you mean tracking.uri?"),
])
def test_tracking_settings_are_checked_by_the_schema(override, message):
    with pytest.raises(UsageError, match=message.replace("?", r"\?").replace("+", r"\+")):
        conftest.planned("model=tiny-random", override)


# ---------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_mlflow_sweep_one_run_per_record_grouped_and_export_never_duplicates(tmp_path, monkeypatch, empty_store):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns, as harness-run's below
    results, uri = tmp_path / "results", store(empty_store, tmp_path / "mlruns.db")
    out = harness_run("-m", "method=full,lora", *FAST, "isolate=false", "tracking=mlflow", f"tracking.uri={uri}",
                      f"results_dir={results}", cwd=tmp_path, env=ONE_THREAD)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "warning: tracker" not in out.stdout + out.stderr
    recs = load_records(results)
    assert sorted(r["method"] for r in recs.values()) == ["base", "full", "lora"]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("peft-harness")

    def tracker_runs() -> dict:
        found = client.search_runs([exp.experiment_id], "tags.harness_kind = 'run'")
        assert len(found) == len({r.data.tags["run_id"] for r in found})  # one tracker run per record
        return {r.data.tags["run_id"]: r for r in found}

    runs = tracker_runs()
    assert set(runs) == set(recs)
    assert len({r.data.tags["setting_key"] for r in runs.values()}) == 1
    parents = client.search_runs([exp.experiment_id], "tags.harness_kind = 'group'")
    assert len(parents) == 1  # the sweep's pair and its base model sit under one parent run
    for run_id, rec in recs.items():
        r = runs[run_id]
        assert r.info.run_name == run_id and r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {k: r.data.tags[k] for k in ("run_id", "pair_key", "method", "status", "failed_phase")} == {
            "run_id": run_id, "pair_key": str(rec["pair_key"] or "none"), "method": rec["method"], "status": "ok",
            "failed_phase": "none"}
        assert r.data.tags["setting_key"] == tracking.setting_key(rec)
        expected = flat_scalars(rec["metrics"])
        got = {k: v for k, v in r.data.metrics.items() if not k.startswith("train/")}
        assert set(got) == set(expected) and all(equal(got[k], expected[k]) for k in expected), run_id
        assert r.data.params["method.name"] == rec["config"]["method"]["name"]
        assert json.loads(r.data.params["train.max_steps"]) == 5 and "output_dir" not in r.data.params
        assert "tracking.backend" not in r.data.params  # the result config: steering settings are no params
        files = sorted(a.path for a in client.list_artifacts(r.info.run_id))
        assert files == sorted([f"{run_id}.json", rec["items_file"]])
        if rec["method"] != "base":  # streamed during training through the Trainer's MLflowCallback
            loss = client.get_metric_history(r.info.run_id, "train/loss")
            assert [m.step for m in loss] == [1, 2, 3, 4, 5]
            assert [round(m.value, 4) for m in loss] == [round(v, 4) for _, v in rec["metrics"]["loss_curve"]]
            assert len(client.get_metric_history(r.info.run_id, "train/real_tokens_per_s")) == 5
            assert "train/learning_rate" in r.data.metrics

    # harness-export of the same records: the same tracker runs, updated, no metric point added
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            tracking.main(["--to", "mlflow", "--uri", uri, "--results", str(results)])
        assert done.value.code == 0
    again = tracker_runs()
    assert {k: r.info.run_id for k, r in again.items()} == {k: r.info.run_id for k, r in runs.items()}
    assert len(client.search_runs([exp.experiment_id], "tags.harness_kind = 'group'")) == 1
    for r in again.values():
        assert len(client.get_metric_history(r.info.run_id, "run_wall_s")) == 1



def test_an_unreachable_tracker_never_fails_or_holds_up_the_run_and_export_sends_it_later(tmp_path, monkeypatch,
                                                                                         empty_store, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    job = conftest.planned("method=lora", *TINY, "eval.latency.enabled=false", "eval.variants.enabled=false",
                           "tracking=mlflow", "tracking.uri=http://127.0.0.1:9", "tracking.timeout_s=2",
                           f"results_dir={results}")
    t0 = time.monotonic()
    rec = run.execute(job)  # as harness-run's job process runs it
    took = time.monotonic() - t0
    assert rec["status"] == "ok" and records.load_record(records.record_path(results, rec["run_id"])) == rec
    out = capsys.readouterr()
    output = (out.out + out.err).replace(str(tmp_path), "<tmp>")
    lines = [line for line in output.splitlines() if "tracker" in line.lower() or "mlflow" in line.lower()]
    assert len(lines) == 1, lines  # one warning, at the run's start; the record's push is skipped
    assert lines[0].startswith("harness: warning: tracker mlflow (http://127.0.0.1:9) failed at the run's start")
    assert "harness-export --to mlflow --uri http://127.0.0.1:9 --results <tmp>/results" in lines[0]
    assert took < 60  # the tracker's share: at most timeout_s (2 s), and no retries left running

    # later, to a store that never saw it: one run, its metrics the record's; once, however often sent
    uri = store(empty_store, tmp_path / "later.db")
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            tracking.main(["--to", "mlflow", "--uri", uri, "--results", str(results)])
        assert done.value.code == 0
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("peft-harness").experiment_id],
                              "tags.harness_kind = 'run'")
    assert r.data.tags["run_id"] == rec["run_id"] and r.info.status == "FINISHED"
    expected = flat_scalars(rec["metrics"])
    assert set(r.data.metrics) == set(expected) and all(equal(r.data.metrics[k], v) for k, v in expected.items())
    assert [a.path for a in client.list_artifacts(r.info.run_id)] == [f"{rec['run_id']}.json"]  # no answers: no eval


def test_a_tracker_that_does_not_answer_is_given_up_after_timeout_s(tmp_path, capsys):
    """A server that accepts the connection and never answers (a socket nobody accepts on)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        job = job_in(tmp_path, "method=lora", "tracking=mlflow", f"tracking.uri={uri}", "tracking.timeout_s=1")
        rec = records.new_record(job, {})
        records.write_record(tmp_path, rec)
        t0 = time.monotonic()
        assert tracking.log_record(rec, tmp_path) is False
        assert time.monotonic() - t0 < 3
        assert tracking.log_record(rec, tmp_path) is False  # given up for this process: no second wait
        assert time.monotonic() - t0 < 3
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "no answer within 1 s (tracking.timeout_s)" in err[0], err
        t0 = time.monotonic()  # harness-export: one line per record not sent, the same bound
        assert tracking.export(tmp_path, "mlflow", uri=uri, timeout_s=1) == (
            0, [(rec["run_id"], "no answer within 1 s (tracking.timeout_s)")])
        assert time.monotonic() - t0 < 3
    finally:
        silent.close()


def test_a_tracker_error_in_training_is_one_warning_and_training_goes_on(capsys):
    from transformers import TrainerCallback, TrainerControl, TrainerState

    class Failing(TrainerCallback):
        calls = 0

        def on_log(self, args, state, control, logs=None, **kw):
            Failing.calls += 1
            raise ConnectionError("tracker went away")

    cb = tracking._guarded(Failing(), "wandb", TrainerCallback)
    for _ in range(3):
        assert cb.on_log(None, TrainerState(), TrainerControl(), logs={"loss": 1.0}) is None
    assert Failing.calls == 1 and "wandb" in tracking._down
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("harness: warning: tracker wandb failed in training (on_log): tracker went away")


# ---------------------------------------------------------------- W&B (offline)


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): its LevelDB-log framing (32 KiB
    blocks, 7-byte headers, records split as first/middle/last), each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_folder_holds_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    job = job_in(tmp_path, "method=lora", "tracking=wandb", "tracking.project=peft-vs-full")
    rec = run.execute(job)
    assert rec["status"] == "ok"
    base = records.find_ok(tmp_path, job["base_run_id"])
    for r in (rec, base):
        (folder,) = glob.glob(str(tmp_path / "wandb" / "wandb" / f"offline-run-*-{r['run_id']}"))
        recs = wandb_records(Path(folder) / f"run-{r['run_id']}.wandb")
        kinds = [x.WhichOneof("record_type") for x in recs]
        head = next(x.run for x in recs if x.WhichOneof("record_type") == "run")
        assert (head.run_id, head.project, head.job_type) == (r["run_id"], "peft-vs-full", r["method"])
        assert head.run_group == tracking.group_name(rec)  # the pair and its base model: one group
        config = {u.key: json.loads(u.value_json) for x in recs if x.WhichOneof("record_type") in ("run", "config")
                  for u in (x.run.config.update if x.WhichOneof("record_type") == "run" else x.config.update)}
        assert config["harness.run_id"] == r["run_id"] and config["harness.status"] == "ok"
        assert config["method.name"] == r["config"]["method"]["name"] and "tracking.backend" not in config
        summary = {}
        for x in recs:
            if x.WhichOneof("record_type") == "summary":
                for u in x.summary.update:
                    summary[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
        expected = flat_scalars(r["metrics"])
        assert all(equal(float(summary[k]), v) for k, v in expected.items()), r["run_id"]
        artifacts = [x.artifact for x in recs if x.WhichOneof("record_type") == "artifact"]
        assert [a.name for a in artifacts] == [f"record-{r['run_id']}"]
        assert kinds[-1] == "exit" and recs[-1].exit.exit_code == 0
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in x.history.item}
                   for x in recs if x.WhichOneof("record_type") == "history"]
        if r is rec:  # streamed during training through the Trainer's WandbCallback
            losses = [h["train/loss"] for h in history if "train/loss" in h]
            assert [round(v, 4) for v in losses] == [round(v, 4) for _, v in rec["metrics"]["loss_curve"]]
            assert sum("train/real_tokens_per_s" in h for h in history) == 5
        else:
            assert history == []


# ---------------------------------------------------------------- TensorBoard


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_training_and_the_record(tmp_path):
    job = job_in(tmp_path, "method=lora", "tracking=tensorboard")
    rec = run.execute(job)
    assert rec["status"] == "ok"
    group = tmp_path / "tensorboard" / tracking.group_name(rec)
    assert sorted(p.name for p in group.iterdir()) == sorted([rec["run_id"], job["base_run_id"]])
    folder = group / rec["run_id"]

    def check(events) -> None:
        scalars = events.Tags()["scalars"]
        expected = flat_scalars(rec["metrics"])
        got = {k.removeprefix("record/"): events.Scalars(k) for k in scalars if k.startswith("record/")}
        assert set(got) == set(expected)
        assert all(len(v) == 1 and math.isclose(v[0].value, expected[k], rel_tol=1e-6)  # float32 in event files
                   or (math.isnan(v[0].value) and math.isnan(expected[k])) for k, v in got.items())
        loss = events.Scalars("train/loss")
        assert [e.step for e in loss] == [1, 2, 3, 4, 5]
        assert [round(e.value, 4) for e in loss] == [round(v, 4) for _, v in rec["metrics"]["loss_curve"]]
        assert len(events.Scalars("train/real_tokens_per_s")) == 5
        text = events.Tensors("record/tags/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f"| run_id | {rec['run_id']} |" in text and "| status | ok |" in text

    check(tensorboard_events(folder))
    assert json.loads((folder / f"{rec['run_id']}.json").read_text()) == rec  # the record and its answers beside
    assert gzip.decompress((folder / rec["items_file"]).read_bytes())
    # harness-export again: the record's events rewritten, not added
    for _ in range(2):
        assert tracking.export(tmp_path, "tensorboard") == (2, [])
    assert len(list(folder.glob("events.out.tfevents.*.record"))) == 1
    check(tensorboard_events(folder))


# ---------------------------------------------------------------- Trackio


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed (make setup "
                    "installs it: the dev extra)")
def test_trackio_local_project_holds_the_record(tmp_path):
    job = job_in(tmp_path, "method=lora", "tracking=trackio")
    rec = run.execute(job)
    assert rec["status"] == "ok"
    from trackio import Api
    from trackio.sqlite_storage import SQLiteStorage

    base = records.find_ok(tmp_path, job["base_run_id"])
    assert os.environ["TRACKIO_DIR"] == str(tmp_path / "trackio")
    assert sorted(r.name for r in Api().runs("peft-harness")) == sorted([rec["run_id"], base["run_id"]])
    for r in (rec, base):
        config = SQLiteStorage.get_run_config("peft-harness", r["run_id"])
        assert config["harness.run_id"] == r["run_id"] and config["harness.status"] == "ok"
        assert config["method.name"] == r["config"]["method"]["name"]
        logs = SQLiteStorage.get_logs("peft-harness", r["run_id"])
        last = {k: v for entry in logs for k, v in entry.items()}
        assert all(equal(float(last[k]), v) for k, v in flat_scalars(r["metrics"]).items()), r["run_id"]
        losses = [entry["train/loss"] for entry in logs if "train/loss" in entry]
        assert [round(v, 4) for v in losses] == [round(v, 4) for _, v in r["metrics"].get("loss_curve") or []]


def test_trackio_without_its_package_is_one_line_before_any_job(tmp_path, capsys, monkeypatch):
    # the dev extra installs trackio: hide it, as in an environment without the [trackio] extra
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real_find_spec(name, *a))
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as done:
        preflight(["method=lora", *TINY, "tracking=trackio", f"results_dir={results}"])
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("harness-run: error: tracking=trackio needs the trackio package, not installed here: "
                    "pip install 'peft-harness[trackio]' (docs/trackers.md)")
    assert not results.exists()
    results.mkdir()
    with pytest.raises(SystemExit) as done:
        tracking.main(["--to", "trackio", "--results", str(results)])
    assert done.value.code == 2
    assert "needs the trackio package" in capsys.readouterr().err


def test_harness_export_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        tracking.main(["--to", "mlflow", "--results", str(tmp_path / "missing")])
    assert done.value.code == 2 and "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        tracking.main(["--to", "mlflow", "--results", str(tmp_path), "--timeout-s", "0"])
    assert done.value.code == 2
