"""Experiment trackers: MLflow, Weights & Biases, TensorBoard, Trackio (``tracking=<backend>``).

The run records in ``results_dir`` stay the results; a tracker gets a copy where a team already
compares runs. One tracker run per harness run:

    during training   the Trainer's own ``report_to`` integration streams loss, learning rate,
                      gradient norm and throughput (``tokens_per_s`` of each logging interval)
                      into the tracker run (``start``, on rank 0; ``guard`` wraps the callbacks)
    at the record     the same tracker run gets the result config flattened as params, every
                      scalar metric of the record, the tags (``TAG_KEYS``), the record and its
                      per-question answers as artifacts (``log_record``); the base model's record
                      too. Runs of one setting share a group (``group_name``): an MLflow parent run
                      with nested runs, a W&B group, a TensorBoard folder, a Trackio group.
    later             ``harness-export`` sends records made before (or while a tracker was down);
                      the harness run id finds the tracker run again, so a second export updates it
                      and never duplicates it.

A tracker never fails or holds up a run: the record is written first, every tracker call runs in
a thread given ``tracking.timeout_s``, and a tracker error is one warning line that says how to
send the record later. One function per backend and phase (``_<backend>_start``,
``_<backend>_log``) behind ``start`` / ``log_record`` / ``export``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

BACKENDS = ("mlflow", "wandb", "tensorboard", "trackio")
# what to install for each (pyproject's extras), and the module that must import
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio"}
MODULES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "torch.utils.tensorboard", "trackio": "trackio"}
DEFAULTS = {"backend": "none", "uri": None, "project": "peft-harness", "entity": None, "dir": None, "group": None,
            "live": True, "artifacts": True, "timeout_s": 30}
TAG_KEYS = ("run_id", "pair_key", "setting_key", "method", "status", "failed_phase")
MLFLOW_PARAM_MAX = 6000  # MLflow's longest parameter value
# the record's headline figures, for TensorBoard's HParams view
HEADLINE = ("mmlu_acc", "indomain_acc", "heldout_loss", "forgetting_loss_delta", "peak_memory_bytes", "train_wall_s",
            "tokens_per_s", "cost_usd", "mfu")


class TrackerError(RuntimeError):
    """A tracker that cannot be reached, is misconfigured, or did not answer in time."""


# trackers found down in this process (backend -> why): the first warning is the only one
_down: dict[str, str] = {}
# the tracker run this process started for live logging: {"backend", "run_id", "tracker_run_id"}
_live: dict[str, Any] = {}


# ---------------------------------------------------------------- what a record sends


def settings(cfg: dict, results_dir: str | Path | None = None, **override: Any) -> dict:
    """The tracking settings of a config (defaults filled in, ``override`` on top), with ``dir``
    resolved to ``<results_dir>/<backend>`` when unset."""
    t = {**DEFAULTS, **(cfg.get("tracking") or {}), **{k: v for k, v in override.items() if v is not None}}
    if t["backend"] != "none" and not t["dir"]:
        t["dir"] = str(Path(results_dir or cfg.get("results_dir") or "results") / t["backend"])
    return t


def enabled(cfg: dict) -> bool:
    return (cfg.get("tracking") or {}).get("backend", "none") != "none"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj} if prefix else {}


def params(record: dict) -> dict[str, str]:
    """The result config (``identity.result_config``) flattened: ``method.r`` -> ``"16"`` (JSON of
    every value but strings)."""
    from harness import identity

    flat = _flatten(identity.result_config(record.get("config") or {}))
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in sorted(flat.items())}


def scalar_metrics(record: dict) -> dict[str, float]:
    """Every scalar metric of the record (nested mappings flattened, ``phase_wall_s.train``;
    booleans as 0/1); text, lists and nulls are left out."""
    out = {}
    for k, v in _flatten(record.get("metrics") or {}).items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return dict(sorted(out.items()))


def group_name(record: dict, t: dict | None = None) -> str:
    """The group a run sits in: ``tracking.group``, else ``<model>-<data>-<setting_key[:8]>``: the
    arms and seeds of one report table (the base model's record with them)."""
    from harness import identity

    t = t or settings(record.get("config") or {})
    if t.get("group"):
        return str(t["group"])
    return f"{identity.model_name(record)}-{identity.data_name(record)}-{setting_key(record)[:8]}"


def setting_key(record: dict) -> str:
    from harness import identity

    return identity.setting_key(record.get("config") or {})


def tags(record: dict) -> dict[str, str]:
    """run_id, pair_key, setting_key, method, status, failed_phase (``none`` when it did not fail)."""
    values = {"run_id": record["run_id"], "pair_key": record.get("pair_key"), "setting_key": setting_key(record),
              "method": record.get("method"), "status": record.get("status"), "failed_phase": record.get("failed_phase")}
    return {k: "none" if v is None else str(v) for k, v in values.items()}


def artifact_files(record: dict, results_dir: str | Path) -> list[Path]:
    """The record's file and its per-question answers, where they exist."""
    from harness import records

    files = [records.record_path(results_dir, record["run_id"])]
    if record.get("items_file"):
        files.append(Path(results_dir) / record["items_file"])
    return [f for f in files if f.is_file()]


def _ms(iso: str | None) -> int | None:
    try:
        return int(datetime.fromisoformat(str(iso)).timestamp() * 1000) if iso else None
    except ValueError:
        return None


# ---------------------------------------------------------------- bounded calls, one warning


def bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread; TrackerError when it has not returned within ``timeout_s``
    (the thread is left behind: it can never hold the run up), its own error when it raised."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"harness-tracking-{what}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TrackerError(f"no answer within {timeout_s:g} s (tracking.timeout_s)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300] + ("..." if len(text) > 300 else "")


def _where(t: dict) -> str:
    return t.get("uri") or t.get("dir") or t.get("project") or ""


def export_hint(t: dict, results_dir: str | Path) -> str:
    uri = f" --uri {t['uri']}" if t.get("uri") else ""
    return f"harness-export --to {t['backend']}{uri} --results {results_dir}"


def warn(t: dict, exc: BaseException, results_dir: str | Path, phase: str) -> None:
    """The one warning line of a tracker that failed; later calls in this process skip it."""
    _down[t["backend"]] = _why(exc)
    print(f"harness: warning: tracker {t['backend']} ({_where(t)}) failed at {phase}: {_why(exc)}; the record is "
          f"written to {results_dir}; send it later: {export_hint(t, results_dir)}", file=sys.stderr, flush=True)


def _require(backend: str) -> None:
    import importlib

    try:
        importlib.import_module(MODULES[backend])
    except ImportError as exc:
        raise TrackerError(f"{MODULES[backend]} is not installed ({exc}); pip install "
                           f"'peft-harness[{EXTRAS[backend]}]'") from exc


# ---------------------------------------------------------------- the interface


def start(job: dict) -> list[str]:
    """Rank 0 of an arm's job process, before training: open the tracker run of ``job`` and point
    the Trainer's integration at it. Returns ``report_to`` (``[]`` when tracking is off, live
    streaming is off, or the tracker failed: one warning, the run goes on)."""
    cfg = job["config"]
    if not enabled(cfg):
        return []
    t = settings(cfg)
    if not t["live"]:
        return []
    stub = {"run_id": job["run_id"], "pair_key": job["pair_key"], "method": job["method"], "status": "running",
            "failed_phase": None, "config": cfg, "model": {"name": cfg["model"]["name"]}}
    try:
        _require(t["backend"])
        _env(t)
        tracker_run = bounded(lambda: START[t["backend"]](t, stub), float(t["timeout_s"]), "start")
    except Exception as exc:  # a tracker never fails a run
        warn(t, exc, cfg["results_dir"], "the run's start")
        return []
    _live.update(backend=t["backend"], run_id=job["run_id"], tracker_run_id=tracker_run)
    return [t["backend"]]


def guard(trainer) -> None:
    """Wrap the Trainer's tracker callbacks so that a tracker error in training is one warning
    and stops that tracker, never the training; put the throughput first, so that every logged
    step carries ``tokens_per_s``."""
    from transformers import TrainerCallback

    names = {"MLflowCallback": "mlflow", "WandbCallback": "wandb", "TensorBoardCallback": "tensorboard",
             "TrackioCallback": "trackio"}
    handler = trainer.callback_handler
    found = False
    for i, cb in enumerate(handler.callbacks):
        if type(cb).__name__ in names:
            handler.callbacks[i] = _guarded(cb, names[type(cb).__name__], TrainerCallback)
            found = True
    if found:
        handler.callbacks.insert(0, _throughput(TrainerCallback))


def _guarded(inner, backend: str, base: type):
    class Guarded(base):
        def __init__(self):
            self.inner, self.failed = inner, False

    def forward(event: str):
        def method(self, args, state, control, **kw):
            if self.failed:
                return None
            try:
                return getattr(self.inner, event)(args, state, control, **kw)
            except Exception as exc:  # a tracker never fails a run
                self.failed = True
                print(f"harness: warning: tracker {backend} failed in training ({event}): {_why(exc)}; training "
                      "goes on without it; the record is still sent when it is written", file=sys.stderr, flush=True)
                return None
        return method

    for event in [n for n in dir(base) if n.startswith("on_")]:
        setattr(Guarded, event, forward(event))
    Guarded.__name__ = f"Guarded{type(inner).__name__}"
    return Guarded()


def _throughput(base: type):
    class Throughput(base):
        """``tokens_per_s``: real (non-padding) tokens per second since the last logging step."""

        def __init__(self):
            self.last: tuple[float, int] | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = (time.perf_counter(), int(state.num_input_tokens_seen or 0))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is None or self.last is None or "loss" not in logs:
                return
            now, seen = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            if now > self.last[0] and seen >= self.last[1]:
                logs["tokens_per_s"] = (seen - self.last[1]) / (now - self.last[0])
            self.last = (now, seen)

    return Throughput()


def log_record(record: dict, results_dir: str | Path, t: dict | None = None, quiet: bool = False) -> bool:
    """After ``record`` is written: send it to the tracker of its config (or of ``t``), bounded by
    ``timeout_s``. True when sent; False (one warning line, unless ``quiet``) when the tracker
    failed, or was found down earlier in this process; None-tracking configs send nothing."""
    t = t or settings(record.get("config") or {}, results_dir)
    if t["backend"] == "none":
        return False
    if t["backend"] in _down and not quiet:
        return False  # its one warning was given
    live = _live.get("tracker_run_id") if _live.get("run_id") == record["run_id"] and \
        _live.get("backend") == t["backend"] else None
    try:
        _require(t["backend"])
        _env(t)
        bounded(lambda: LOG[t["backend"]](t, record, artifact_files(record, results_dir) if t["artifacts"] else [],
                                          live), float(t["timeout_s"]), "record")
    except Exception as exc:  # a tracker never fails a run
        if quiet:
            raise
        warn(t, exc, results_dir, f"record {record['run_id']}")
        return False
    if live:
        _live.clear()
    return True


def safe_log_record(record: dict, results_dir: str | Path) -> None:
    """``log_record`` for the places a record is written: nothing it does can raise."""
    try:
        if enabled(record.get("config") or {}):
            log_record(record, results_dir)
    except Exception as exc:  # noqa: BLE001
        print(f"harness: warning: tracker: {_why(exc)}", file=sys.stderr, flush=True)


def _env(t: dict) -> None:
    """Environment the backend's library reads (never over what the user set): short HTTP
    timeouts and no retries for MLflow, W&B's folder, quiet console and init timeout."""
    timeout = str(max(1, int(float(t["timeout_s"]))))
    if t["backend"] == "mlflow":
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)
        if t.get("uri"):
            os.environ["MLFLOW_TRACKING_URI"] = str(t["uri"])
        os.environ["MLFLOW_EXPERIMENT_NAME"] = str(t["project"])
        os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"  # the record's params, not the TrainingArguments' (they differ per run)
    elif t["backend"] == "wandb":
        Path(t["dir"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(t["dir"]))
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        os.environ.setdefault("WANDB_INIT_TIMEOUT", timeout)
        os.environ["WANDB_PROJECT"] = str(t["project"])
        os.environ.setdefault("WANDB_LOG_MODEL", "false")
        os.environ.setdefault("WANDB_WATCH", "false")
    elif t["backend"] == "trackio":
        Path(t["dir"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TRACKIO_DIR", str(t["dir"]))
        os.environ["TRACKIO_PROJECT"] = str(t["project"])


# ---------------------------------------------------------------- MLflow


def _mlflow_client(t: dict):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=t.get("uri") or None)


def _mlflow_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except Exception:  # created meanwhile by a parallel job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    return exp.experiment_id


def _mlflow_find(client, exp_id: str, kind: str, key: str, value: str) -> list:
    return client.search_runs([exp_id], f"tags.harness_kind = '{kind}' and tags.{key} = '{value}'", max_results=100)


def _mlflow_parent(client, exp_id: str, group: str) -> str:
    """The group's parent run (created once, FINISHED: it holds the nested runs)."""
    found = _mlflow_find(client, exp_id, "group", "harness_group", group)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=group, tags={"harness_kind": "group", "harness_group": group})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _mlflow_run(client, t: dict, record: dict, fresh: bool) -> str:
    """The tracker run of ``record['run_id']``: found by its tag (``fresh``: a new run replaces it,
    as a rerun replaces the record), else created under the group's parent."""
    exp_id = _mlflow_experiment(client, str(t["project"]))
    group = group_name(record, t)
    found = _mlflow_find(client, exp_id, "run", "run_id", record["run_id"])
    if found and not fresh:
        return found[0].info.run_id
    for old in found:
        client.delete_run(old.info.run_id)
    parent = _mlflow_parent(client, exp_id, group)
    run = client.create_run(exp_id, run_name=record["run_id"], start_time=_ms((record.get("env") or {}).get("started_at")),
                            tags={"harness_kind": "run", "harness_group": group, "mlflow.parentRunId": parent,
                                  **tags(record)})
    return run.info.run_id


def _mlflow_start(t: dict, stub: dict) -> str:
    client = _mlflow_client(t)
    run_id = _mlflow_run(client, t, stub, fresh=True)
    os.environ["MLFLOW_RUN_ID"] = run_id  # the Trainer's MLflowCallback resumes this run
    return run_id


def _mlflow_log(t: dict, record: dict, files: list[Path], live: str | None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client = _mlflow_client(t)
    run_id = live or _mlflow_run(client, t, record, fresh=False)
    have = client.get_run(run_id).data
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in scalar_metrics(record).items() if have.metrics.get(k) != v]
    new_params = [Param(k, v[:MLFLOW_PARAM_MAX]) for k, v in params(record).items() if k not in have.params]
    run_tags = [RunTag(k, v) for k, v in {**tags(record), "harness_group": group_name(record, t)}.items()]
    for i in range(0, max(len(metrics), len(new_params), 1), 100):
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=new_params[i:i + 100],
                         tags=run_tags if i == 0 else [])
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id, "FINISHED" if record.get("status") == "ok" else "FAILED",
                          end_time=_ms((record.get("env") or {}).get("ended_at")))


# ---------------------------------------------------------------- Weights & Biases


def _wandb_init(t: dict, record: dict):
    import wandb

    if wandb.run is not None and wandb.run.id == record["run_id"]:
        return wandb.run
    if wandb.run is not None:
        wandb.finish()
    return wandb.init(id=record["run_id"], name=record["run_id"], project=str(t["project"]), entity=t.get("entity"),
                      group=group_name(record, t), job_type=str(record.get("method")), dir=str(t["dir"]),
                      resume="allow", config={**params(record), **{f"harness.{k}": v for k, v in tags(record).items()}},
                      tags=[f"method:{record.get('method')}", f"status:{record.get('status')}"],
                      settings=wandb.Settings(init_timeout=float(t["timeout_s"]), console="off"))


def _wandb_start(t: dict, stub: dict) -> str:
    return _wandb_init(t, stub).id  # the Trainer's WandbCallback logs into the active run


def _wandb_log(t: dict, record: dict, files: list[Path], live: str | None) -> None:
    import wandb

    run = _wandb_init(t, record)
    run.config.update({**params(record), **{f"harness.{k}": v for k, v in tags(record).items()}},
                      allow_val_change=True)
    run.tags = (f"method:{record.get('method')}", f"status:{record.get('status')}",
                f"failed_phase:{tags(record)['failed_phase']}")
    run.summary.update(scalar_metrics(record))
    if files:
        artifact = wandb.Artifact(f"record-{record['run_id']}", type="run-record")
        for f in files:
            artifact.add_file(str(f))
        run.log_artifact(artifact)
    run.finish(exit_code=0 if record.get("status") == "ok" else 1)


# ---------------------------------------------------------------- TensorBoard


def tensorboard_dir(t: dict, record: dict) -> Path:
    """``<dir>/<group>/<run_id>``: one TensorBoard run per harness run, its group a folder."""
    return Path(t["dir"]) / group_name(record, t) / record["run_id"]


def _tensorboard_start(t: dict, stub: dict) -> str:
    folder = tensorboard_dir(t, stub)
    shutil.rmtree(folder, ignore_errors=True)  # a rerun replaces the run, as it replaces the record
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)  # the Trainer's TensorBoardCallback writes there
    return str(folder)


def _tensorboard_log(t: dict, record: dict, files: list[Path], live: str | None) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    folder = tensorboard_dir(t, record)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.out.tfevents.*.record"):  # the record's own events: rewritten, not added
        old.unlink()
    metrics = scalar_metrics(record)
    writer = SummaryWriter(str(folder), filename_suffix=".record")
    try:
        for k, v in metrics.items():
            writer.add_scalar(f"record/{k}", v, 0)
        table = lambda d: "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in d.items())
        writer.add_text("record/tags", table({**tags(record), "group": group_name(record, t)}), 0)
        writer.add_text("record/params", table(params(record)), 0)
        headline = {f"record/{k}": metrics[k] for k in HEADLINE if k in metrics}
        exp, ssi, sei = hparams({**params(record), **tags(record)}, headline)
        for summary in (exp, ssi, sei):
            writer.file_writer.add_summary(summary)
    finally:
        writer.close()
    for f in files:  # TensorBoard has no artifacts: the files beside the events
        shutil.copy2(f, folder / f.name)


# ---------------------------------------------------------------- Trackio


def _trackio_init(t: dict, record: dict):
    import trackio

    return trackio.init(project=str(t["project"]), name=record["run_id"], group=group_name(record, t),
                        config={**params(record), **{f"harness.{k}": v for k, v in tags(record).items()}},
                        resume="allow")


def _trackio_start(t: dict, stub: dict) -> str:
    _trackio_init(t, stub)  # the Trainer's TrackioCallback logs into the current run
    os.environ["TRACKIO_PROJECT"] = str(t["project"])
    return stub["run_id"]


def _trackio_log(t: dict, record: dict, files: list[Path], live: str | None) -> None:
    import trackio

    _trackio_init(t, record)
    trackio.log({f"record/{k}": v for k, v in scalar_metrics(record).items()})
    trackio.finish()


START = {"mlflow": _mlflow_start, "wandb": _wandb_start, "tensorboard": _tensorboard_start, "trackio": _trackio_start}
LOG = {"mlflow": _mlflow_log, "wandb": _wandb_log, "tensorboard": _tensorboard_log, "trackio": _trackio_log}


# ---------------------------------------------------------------- harness-export


def export(results_dir: str | Path, backend: str, uri: str | None = None, project: str | None = None,
           entity: str | None = None, tracker_dir: str | None = None, group: str | None = None,
           artifacts: bool = True, timeout_s: float | None = None,
           run_ids: list[str] | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Send the records of ``results_dir`` (or those of ``run_ids``); (sent, [(run_id, why failed)]).
    A record's own tracking settings (project, group, entity, and the URI when it named the same
    backend) are used where an argument is not given."""
    from harness import records

    sent, failed = 0, []
    for _, rec in records.iter_records(results_dir):
        if run_ids and rec["run_id"] not in run_ids:
            continue
        own = (rec.get("config") or {}).get("tracking") or {}
        base = {k: own[k] for k in ("project", "entity", "group") if own.get(k) is not None}
        if own.get("backend") == backend:
            base.update({k: own[k] for k in ("uri", "dir") if own.get(k) is not None})
        t = settings({"tracking": {**base, "backend": backend}}, results_dir, uri=uri, project=project, entity=entity,
                     dir=tracker_dir, group=group, timeout_s=timeout_s)
        t["artifacts"] = artifacts
        try:
            log_record(rec, results_dir, t, quiet=True)
            sent += 1
        except Exception as exc:  # noqa: BLE001  (one line per record, the rest go on)
            failed.append((rec["run_id"], _why(exc)))
    return sent, failed


def main(argv: list[str] | None = None) -> None:
    """harness-export: exit 0 when every record was sent, 1 when some failed, 2 on a usage error."""
    parser = argparse.ArgumentParser(
        prog="harness-export", description="Send run records to an experiment tracker (MLflow, W&B, TensorBoard, "
        "Trackio). Idempotent: a record already sent is updated, never duplicated.",
        epilog="exit codes: 0 every record sent, 1 some failed (one line each), 2 usage error")
    parser.add_argument("--to", required=True, choices=BACKENDS, help="the tracker")
    parser.add_argument("--results", default="results", help="the records' folder (default: results)")
    parser.add_argument("--uri", help="MLflow tracking URI (sqlite:///mlruns.db, http://host:5000)")
    parser.add_argument("--project", help="MLflow experiment, W&B or Trackio project (default: the record's, "
                        f"else {DEFAULTS['project']})")
    parser.add_argument("--entity", help="W&B entity")
    parser.add_argument("--dir", dest="tracker_dir", help="TensorBoard / W&B / Trackio local folder "
                        "(default: <results>/<backend>)")
    parser.add_argument("--group", help="the group of every record sent (default: per setting)")
    parser.add_argument("--run-id", action="append", dest="run_ids", help="only this run (repeatable)")
    parser.add_argument("--no-artifacts", action="store_true", help="send no record or answers files")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="the most one record may take (default 60)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        parser.exit(2, f"harness-export: error: --results {args.results} is not a folder\n")
    try:
        _require(args.to)
    except TrackerError as exc:
        parser.exit(2, f"harness-export: error: {exc}\n")
    sent, failed = export(args.results, args.to, uri=args.uri, project=args.project, entity=args.entity,
                          tracker_dir=args.tracker_dir, group=args.group, artifacts=not args.no_artifacts,
                          timeout_s=args.timeout_s, run_ids=args.run_ids)
    for run_id, why in failed:
        print(f"harness-export: {run_id}: not sent: {why}", file=sys.stderr)
    where = args.uri or args.tracker_dir or ""
    print(f"harness-export: {sent + len(failed)} records to {args.to}{f' ({where})' if where else ''}: "
          f"{sent} sent, {len(failed)} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
