"""Experiment trackers: MLflow, Weights & Biases, TensorBoard, Trackio (``tracking=<backend>``).

The run records in ``results_dir`` stay the results; a tracker gets a copy where a team already
compares runs (docs/trackers.md). One tracker run per harness run (its id: the harness run id):

    during training   the Trainer's own ``report_to`` integration streams the logged loss,
                      learning rate, gradient norm and throughput (``real_tokens_per_s`` of each
                      logging interval) as ``train/...`` into that run (``start`` and ``guard``,
                      on rank 0; ``tracking.live=false`` keeps the training loop free of it)
    at the record     once the record is written: the result config flattened as params, every
                      scalar metric of the record under its own name, the tags (``TAG_KEYS``), the
                      record and its per-question answers as artifacts (``log_record``); the base
                      model's record too. The runs of one setting share a group (``group_name``):
                      an MLflow parent run with nested runs, a W&B group, a TensorBoard folder, a
                      Trackio group.
    later             ``harness-export`` sends records made before (or while a tracker was down);
                      the ``run_id`` tag finds the tracker run again, so a second export updates
                      it and never duplicates it.

A tracker never fails or holds up a run: the record is written first, each tracker call runs in a
thread given ``tracking.timeout_s``, and a tracker error is one warning line that says how to send
the record later; the process then leaves that tracker alone. A tracker whose package is missing
is a usage error before any job (``check``, from ``plan.check_inputs``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

BACKENDS = ("mlflow", "wandb", "tensorboard", "trackio")
MODULES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio"}
# the Trainer's integration callback of each backend (transformers.integrations)
CALLBACKS = {"MLflowCallback": "mlflow", "WandbCallback": "wandb", "TensorBoardCallback": "tensorboard",
             "TrackioCallback": "trackio"}
DEFAULTS = {"backend": "none", "uri": None, "project": "peft-harness", "entity": None, "dir": None, "group": None,
            "live": True, "artifacts": True, "timeout_s": 30}
TAG_KEYS = ("run_id", "pair_key", "setting_key", "method", "status", "failed_phase")
# the record's headline figures, for TensorBoard's HParams view
HEADLINE = ("mmlu_acc", "indomain_acc", "heldout_loss", "forgetting_loss_delta", "peak_memory_bytes", "train_wall_s",
            "tokens_per_s", "cost_usd", "mfu")
DOCS = "docs/trackers.md"


class TrackerError(RuntimeError):
    """A tracker that cannot be reached, is misconfigured, or did not answer in time."""


# trackers found failing in this process (backend -> why): their one warning was given
_down: dict[str, str] = {}


# ---------------------------------------------------------------- settings


def settings(cfg: dict, results_dir: str | Path | None = None, **override: Any) -> dict:
    """The tracking settings of a config (defaults filled in, ``override`` on top where not None),
    ``dir`` resolved to ``<results_dir>/<backend>`` when unset."""
    t = {**DEFAULTS, **(cfg.get("tracking") or {}), **{k: v for k, v in override.items() if v is not None}}
    if t["backend"] != "none" and not t["dir"]:
        t["dir"] = str(Path(results_dir or cfg.get("results_dir") or "results") / t["backend"])
    return t


def enabled(cfg: dict) -> bool:
    return (cfg.get("tracking") or {}).get("backend", "none") != "none"


def missing_package(backend: str) -> str | None:
    """Why ``backend`` cannot run here (its package is not installed), or None."""
    if importlib.util.find_spec(MODULES[backend]) is not None:
        return None
    return f"tracking={backend} needs the {MODULES[backend]} package, not installed here: " \
           f"pip install 'peft-harness[{backend}]' ({DOCS})"


def check(cfg: dict) -> None:
    """Preflight: a tracker whose package is missing is a usage error (one line, exit 2)."""
    from harness.config import UsageError

    backend = (cfg.get("tracking") or {}).get("backend", "none")
    if backend != "none" and (why := missing_package(backend)):
        raise UsageError(why)


# ---------------------------------------------------------------- what a record sends


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
    """Every scalar metric of the record (nested mappings flattened: ``phase_wall_s.train``;
    booleans as 0/1); text, lists and nulls are left out."""
    flat = _flatten(record.get("metrics") or {})
    return {k: float(v) for k, v in sorted(flat.items()) if isinstance(v, (bool, int, float))}


def setting_key(record: dict) -> str:
    from harness import identity

    return identity.setting_key(record.get("config") or {})


def group_name(record: dict, t: dict | None = None) -> str:
    """The group a run sits in: ``tracking.group``, else ``<model>-<data>-<setting_key[:8]>``: the
    arms, seeds and base model of one report table. Letters, digits, ``.``, ``_``, ``-`` are kept."""
    from harness import identity

    t = t or settings(record.get("config") or {})
    name = t.get("group") or f"{identity.model_name(record)}-{identity.data_name(record)}-{setting_key(record)[:8]}"
    return re.sub(r"[^\w.\-]+", "-", str(name))


def tags(record: dict) -> dict[str, str]:
    """run_id, pair_key, setting_key, method, status, failed_phase (``none`` where null)."""
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


def _same(a: float | None, b: float) -> bool:
    return a is not None and (a == b or (math.isnan(a) and math.isnan(b)))


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


def export_hint(t: dict, results_dir: str | Path) -> str:
    uri = f" --uri {t['uri']}" if t.get("uri") else ""
    return f"harness-export --to {t['backend']}{uri} --results {results_dir}"


def warn(t: dict, exc: BaseException, results_dir: str | Path, when: str) -> None:
    """The one warning line of a tracker that failed; later calls in this process skip it."""
    _down[t["backend"]] = _why(exc)
    where = t.get("uri") or t.get("dir") or ""
    print(f"harness: warning: tracker {t['backend']}{f' ({where})' if where else ''} failed {when}: {_why(exc)}; "
          f"the run goes on without it and its record is written to {results_dir}; send it later: "
          f"{export_hint(t, results_dir)}", file=sys.stderr, flush=True)


def _require(backend: str) -> None:
    if why := missing_package(backend):
        raise TrackerError(why)


# ---------------------------------------------------------------- the interface


def start(job: dict, args) -> None:
    """Rank 0 of an arm's job, before the Trainer is built: open the tracker run of ``job`` and
    point the Trainer's integration at it through ``args`` (``report_to``, ``run_name``). Tracking
    off, ``tracking.live=false`` or a failing tracker (one warning) leave ``report_to`` empty."""
    cfg = job["config"]
    t = settings(cfg)
    if t["backend"] == "none" or not t["live"] or t["backend"] in _down:
        return
    stub = {"run_id": job["run_id"], "pair_key": job["pair_key"], "method": job["method"], "status": "running",
            "failed_phase": None, "config": cfg, "model": {"name": cfg["model"]["name"]}, "env": {}}
    try:
        _env(t)
        _require(t["backend"])
        bounded(lambda: START[t["backend"]](t, stub), float(t["timeout_s"]), "start")
    except Exception as exc:  # a tracker never fails a run
        warn(t, exc, cfg["results_dir"], "at the run's start")
        return
    args.report_to = [t["backend"]]
    args.run_name = job["run_id"]
    if t["backend"] == "trackio":  # TrackioCallback opens the run itself: a local project, no Space
        args.project, args.trackio_space_id, args.trackio_static_space_id = str(t["project"]), None, False


def guard(trainer) -> None:
    """Wrap the Trainer's tracker callbacks: a tracker error in training is one warning and stops
    that tracker, never the training; what they log gets ``real_tokens_per_s`` of the interval.
    Their ``on_train_end`` (MLflow ends its run, flushing its queue) moves after every other
    callback's, so that the measured training (harness.measure.callback) has ended before it."""
    from transformers import TrainerCallback

    handler = trainer.callback_handler
    wrapped = []
    for i, cb in enumerate(handler.callbacks):
        if type(cb).__name__ in CALLBACKS:
            handler.callbacks[i] = _guarded(cb, CALLBACKS[type(cb).__name__], TrainerCallback)
            wrapped.append(handler.callbacks[i])
    if wrapped:
        class TrackerTrainEnd(TrainerCallback):
            def on_train_end(self, args, state, control, **kw):
                for cb in wrapped:
                    cb.call("on_train_end", args, state, control, **kw)

        handler.callbacks.append(TrackerTrainEnd())


def _guarded(inner, backend: str, base: type):
    class Guarded(base):
        def __init__(self):
            self.inner, self.failed, self.last = inner, False, None

        def throughput(self, state, logs: dict | None) -> dict | None:
            """A copy of ``logs`` (the Trainer's, shared by every callback, stays as it is) with the
            real tokens per second since the last logging step; MLflow's keys prefixed ``train/``
            as the other integrations prefix theirs."""
            if logs is None:
                return None
            now, seen = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            logs = dict(logs)
            if "loss" in logs and self.last is not None and now > self.last[0] and seen >= self.last[1]:
                logs["real_tokens_per_s"] = (seen - self.last[1]) / (now - self.last[0])
            if "loss" in logs:
                self.last = (now, seen)
            if backend == "mlflow":
                logs = {k if k.startswith(("eval_", "test_")) else f"train/{k}": v for k, v in logs.items()}
            return logs

        def call(self, event: str, args, state, control, **kw):
            if self.failed:
                return None
            try:
                if event == "on_train_begin":
                    self.last = (time.perf_counter(), int(state.num_input_tokens_seen or 0))
                if event == "on_log":
                    kw["logs"] = self.throughput(state, kw.get("logs"))
                return getattr(self.inner, event)(args, state, control, **kw)
            except Exception as exc:  # a tracker never fails a run
                self.failed = True
                _down[backend] = _why(exc)
                print(f"harness: warning: tracker {backend} failed in training ({event}): {_why(exc)}; training "
                      f"goes on without it; send the record later: harness-export --to {backend}",
                      file=sys.stderr, flush=True)
                return None

    def forward(event: str):
        if event == "on_train_end":  # called by TrackerTrainEnd, after the other callbacks
            return lambda self, args, state, control, **kw: None
        return lambda self, args, state, control, **kw: self.call(event, args, state, control, **kw)

    for event in [n for n in dir(base) if n.startswith("on_")]:
        setattr(Guarded, event, forward(event))
    Guarded.__name__ = f"Guarded{type(inner).__name__}"
    return Guarded()


def log_record(record: dict, results_dir: str | Path, t: dict | None = None, raise_errors: bool = False) -> bool:
    """After ``record`` is written: send it to the tracker of its config (or of ``t``), bounded by
    ``timeout_s``. True when sent; False when tracking is off, or the tracker failed (one warning
    line) or was found failing earlier in this process. ``raise_errors``: raise instead (export)."""
    t = t or settings(record.get("config") or {}, results_dir)
    if t["backend"] == "none" or (t["backend"] in _down and not raise_errors):
        return False
    try:
        _env(t)
        _require(t["backend"])
        files = artifact_files(record, results_dir) if t["artifacts"] else []
        if t["backend"] == "mlflow":
            _mlflow_end_live(record)
        bounded(lambda: LOG[t["backend"]](t, record, files), float(t["timeout_s"]), "record")
    except Exception as exc:  # a tracker never fails a run
        if raise_errors:
            raise
        warn(t, exc, results_dir, f"at record {record['run_id']}")
        return False
    return True


def safe_log_record(record: dict, results_dir: str | Path) -> None:
    """``log_record`` for the places a record is written: nothing it does can raise."""
    try:
        if enabled(record.get("config") or {}):
            log_record(record, results_dir)
    except Exception as exc:  # noqa: BLE001
        print(f"harness: warning: tracker: {_why(exc)}", file=sys.stderr, flush=True)


def _env(t: dict) -> None:
    """What the backend's library reads from the environment (never over what the user set but
    for the run's own destination): short HTTP timeouts and no retries for MLflow; W&B's folder,
    a quiet console, no system-metrics sampler beside the measured training; Trackio's folder
    (read when trackio is first imported)."""
    timeout = str(max(1, math.ceil(float(t["timeout_s"]))))
    if t["backend"] == "mlflow":
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)
        if t.get("uri"):
            os.environ["MLFLOW_TRACKING_URI"] = str(t["uri"])
        os.environ["MLFLOW_EXPERIMENT_NAME"] = str(t["project"])
        # the Trainer's MLflowCallback logs no TrainingArguments as params: the record's config is them
        os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no database set-up notes; errors still show
    elif t["backend"] == "wandb":
        Path(t["dir"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        os.environ.setdefault("WANDB_LOG_MODEL", "false")
        os.environ.setdefault("WANDB_WATCH", "false")
    elif t["backend"] == "trackio":
        Path(t["dir"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TRACKIO_DIR", str(Path(t["dir"]).resolve()))


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
    """Active runs of ``kind`` (``run``, ``group``) whose tag ``key`` is ``value``, oldest first."""
    found = client.search_runs([exp_id], f"tags.harness_kind = '{kind}' and tags.{key} = '{value}'",
                               max_results=100)
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _mlflow_parent(client, exp_id: str, group: str) -> str:
    """The group's parent run (FINISHED at once: it holds the nested runs). Two jobs creating it at
    the same moment keep the older one."""
    found = _mlflow_find(client, exp_id, "group", "harness_group", group)
    if found:
        return found[0].info.run_id
    mine = client.create_run(exp_id, run_name=group, tags={"harness_kind": "group", "harness_group": group})
    client.set_terminated(mine.info.run_id, "FINISHED")
    oldest = _mlflow_find(client, exp_id, "group", "harness_group", group)[0].info.run_id
    if oldest != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return oldest


def _mlflow_run(client, t: dict, record: dict, fresh: bool) -> str:
    """The tracker run of ``record['run_id']``: found by its tag, else created under the group's
    parent. ``fresh`` (a run starting): a new run replaces it, as a rerun replaces the record."""
    exp_id = _mlflow_experiment(client, str(t["project"]))
    group = group_name(record, t)
    found = _mlflow_find(client, exp_id, "run", "run_id", record["run_id"])
    if found and not fresh:
        return found[-1].info.run_id
    for old in found:
        client.delete_run(old.info.run_id)
    parent = _mlflow_parent(client, exp_id, group)
    run = client.create_run(exp_id, run_name=record["run_id"],
                            start_time=_ms((record.get("env") or {}).get("started_at")),
                            tags={"harness_kind": "run", "harness_group": group, "mlflow.parentRunId": parent,
                                  **tags(record)})
    return run.info.run_id


def _mlflow_start(t: dict, stub: dict) -> None:
    os.environ["MLFLOW_RUN_ID"] = _mlflow_run(_mlflow_client(t), t, stub, fresh=True)  # MLflowCallback resumes it


def _mlflow_end_live(record: dict) -> None:
    """In this (main) thread: end the run MLflowCallback resumed, if training left it open (it
    failed): else mlflow's exit hook would mark it FINISHED after the record said otherwise."""
    if "mlflow" not in sys.modules:
        return
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.data.tags.get("run_id") == record["run_id"]:
        mlflow.end_run("FINISHED" if record.get("status") == "ok" else "FAILED")


def _mlflow_log(t: dict, record: dict, files: list[Path]) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    client = _mlflow_client(t)
    run_id = _mlflow_run(client, t, record, fresh=False)
    have = client.get_run(run_id).data
    now = int(time.time() * 1000)
    clean = lambda k: re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k)  # the metric names MLflow takes
    metrics = [Metric(clean(k), v, now, 0) for k, v in scalar_metrics(record).items()
               if not _same(have.metrics.get(clean(k)), v)]
    new_params = [Param(clean(k), v[:MAX_PARAM_VAL_LENGTH]) for k, v in params(record).items()
                  if clean(k) not in have.params]
    run_tags = [RunTag(k, v) for k, v in {**tags(record), "harness_group": group_name(record, t)}.items()]
    for i in range(0, max(len(metrics), len(new_params), 1), 100):
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=new_params[i:i + 100],
                         tags=run_tags if i == 0 else [])
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id, "FINISHED" if record.get("status") == "ok" else "FAILED",
                          end_time=_ms((record.get("env") or {}).get("ended_at")))


# ---------------------------------------------------------------- Weights & Biases


def _wandb_config(record: dict) -> dict:
    return {**params(record), **{f"harness.{k}": v for k, v in tags(record).items()}}


def _wandb_init(t: dict, record: dict):
    """The active run when it is this record's (opened at the start), else the record's run,
    resumed by id (offline: a new run folder with the same id, merged when synced)."""
    import wandb

    if wandb.run is not None and wandb.run.id == record["run_id"]:
        return wandb.run
    if wandb.run is not None:
        wandb.finish()
    return wandb.init(id=record["run_id"], name=record["run_id"], project=str(t["project"]), entity=t.get("entity"),
                      group=group_name(record, t), job_type=str(record.get("method")), dir=str(t["dir"]),
                      resume="allow", config=_wandb_config(record),
                      tags=[f"method:{record.get('method')}", f"status:{record.get('status')}"],
                      settings=wandb.Settings(init_timeout=float(t["timeout_s"]), console="off", x_disable_stats=True,
                                              save_code=False))


def _wandb_start(t: dict, stub: dict) -> None:
    _wandb_init(t, stub)  # the Trainer's WandbCallback logs into the active run


def _wandb_log(t: dict, record: dict, files: list[Path]) -> None:
    import wandb

    run = _wandb_init(t, record)
    run.config.update(_wandb_config(record), allow_val_change=True)
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


def _tensorboard_start(t: dict, stub: dict) -> None:
    folder = tensorboard_dir(t, stub)
    shutil.rmtree(folder, ignore_errors=True)  # a rerun replaces the run, as it replaces the record
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)  # the Trainer's TensorBoardCallback writes there


def _tensorboard_log(t: dict, record: dict, files: list[Path]) -> None:
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
        for summary in hparams({**params(record), **tags(record)}, headline):
            writer.file_writer.add_summary(summary)
    finally:
        writer.close()
    for f in files:  # TensorBoard has no artifacts: the files beside the events
        shutil.copy2(f, folder / f.name)


# ---------------------------------------------------------------- Trackio


def _trackio_start(t: dict, stub: dict) -> None:
    """Nothing to open: the Trainer's TrackioCallback opens the run (``args.project``, ``run_name``)
    in the training thread, where trackio keeps its current run."""


def _trackio_log(t: dict, record: dict, files: list[Path]) -> None:
    import trackio

    trackio.init(project=str(t["project"]), name=record["run_id"], group=group_name(record, t),
                 config=_wandb_config(record), resume="allow", auto_log_cpu=False, auto_log_gpu=False)
    trackio.log(scalar_metrics(record))
    for f in files if hasattr(trackio, "log_artifact") else []:
        trackio.log_artifact(str(f), name=f"{record['run_id']}-{f.name.split('.')[1]}", type="run-record",
                             overwrite=True)
    trackio.finish()


START = {"mlflow": _mlflow_start, "wandb": _wandb_start, "tensorboard": _tensorboard_start, "trackio": _trackio_start}
LOG = {"mlflow": _mlflow_log, "wandb": _wandb_log, "tensorboard": _tensorboard_log, "trackio": _trackio_log}


# ---------------------------------------------------------------- harness-export


def export(results_dir: str | Path, backend: str, uri: str | None = None, project: str | None = None,
           entity: str | None = None, tracker_dir: str | None = None, group: str | None = None,
           artifacts: bool = True, timeout_s: float | None = None,
           run_ids: list[str] | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Send the records of ``results_dir`` (or those of ``run_ids``); (sent, [(run_id, why not)]).
    A record's own tracking settings (project, entity, group; uri and dir where it named the same
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
            log_record(rec, results_dir, t, raise_errors=True)
            sent += 1
        except Exception as exc:  # noqa: BLE001  (one line per record, the rest go on)
            failed.append((rec["run_id"], _why(exc)))
    return sent, failed


def main(argv: list[str] | None = None) -> None:
    """harness-export: exit 0 when every record was sent, 1 when some were not, 2 on a usage error."""
    parser = argparse.ArgumentParser(
        prog="harness-export", description="Send run records to an experiment tracker (MLflow, W&B, TensorBoard, "
        "Trackio). Idempotent: a record already sent updates its tracker run, never duplicates it.",
        epilog=f"exit codes: 0 every record sent, 1 some not sent (one line each), 2 usage error. Docs: {DOCS}")
    parser.add_argument("--to", required=True, choices=BACKENDS, help="the tracker")
    parser.add_argument("--results", default="results", help="the records' folder (default: results)")
    parser.add_argument("--uri", help="MLflow tracking URI (sqlite:///mlruns.db, http://host:5000)")
    parser.add_argument("--project", help="MLflow experiment, W&B or Trackio project (default: the record's, "
                        f"else {DEFAULTS['project']})")
    parser.add_argument("--entity", help="W&B entity")
    parser.add_argument("--dir", dest="tracker_dir", help="TensorBoard / W&B / Trackio local folder "
                        "(default: <results>/<backend>)")
    parser.add_argument("--group", help="the group of every record sent (default: one per setting)")
    parser.add_argument("--run-id", action="append", dest="run_ids", help="only this run (repeatable)")
    parser.add_argument("--no-artifacts", action="store_true", help="send no record or answers files")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="the most one record may take (default 60)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        parser.exit(2, f"harness-export: error: --results {args.results} is not a folder\n")
    if why := missing_package(args.to):
        parser.exit(2, f"harness-export: error: {why}\n")
    if args.timeout_s <= 0:
        parser.exit(2, "harness-export: error: --timeout-s must be > 0\n")
    sent, failed = export(args.results, args.to, uri=args.uri, project=args.project, entity=args.entity,
                          tracker_dir=args.tracker_dir, group=args.group, artifacts=not args.no_artifacts,
                          timeout_s=args.timeout_s, run_ids=args.run_ids)
    for run_id, why in failed:
        print(f"harness-export: {run_id}: not sent: {why}", file=sys.stderr)
    where = args.uri or args.tracker_dir or ""
    print(f"harness-export: {sent + len(failed)} records to {args.to}{f' ({where})' if where else ''}: "
          f"{sent} sent, {len(failed)} not sent", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
