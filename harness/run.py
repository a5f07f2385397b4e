"""harness-run: the Hydra entry point. Orchestration only: plan a job, skip or run it, record it.

One job = one arm (method) of a paired comparison:
load base model -> apply method -> train (measured) -> evaluate -> write the run record.
Each job runs in a fresh Python process by default (``isolate=true``) so one run's
allocations, caches and compiled kernels never leak into the next run's figures, and a crash
(or the OOM killer) in one run still leaves a record and lets the sweep go on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness import failure, identity, records, sweep

# The configs: packaged inside harness/ by `pip install .` (setup.py), conf/ in a checkout.
CONF_DIR = next(d for d in (Path(__file__).resolve().parent / "conf", Path(__file__).resolve().parent.parent / "conf")
                if (d / "config.yaml").is_file())
LOCK_PROBE_S = 2.0  # how long a job waits for its run id's lock before leaving it to the holder
GROUPS = ("model", "method", "data", "train", "eval", "hardware", "distributed", "experiment")


class UsageError(ValueError):
    """Bad input from the user: one line, exit code 2, nothing written."""


def usage_exit(message: str, prog: str = "harness-run") -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- planning (no heavy imports)


def plan(cfg: dict) -> dict:
    """Resolved config -> job: normalized config, hashes, run ids. Raises UsageError on bad input."""
    from harness import distributed
    from harness.data import DataError, check_fit
    from harness.measure.pricing import PriceTableError, load_price_table, resolve_hardware, unpriced_hardware
    from harness.methods import MethodError, normalize, rank_of, validate
    from harness.models import ModelSourceError, check_dtype
    from harness.schedule import ScheduleError, check_schedule

    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    cfg["method"] = normalize(cfg["method"])
    try:
        validate(cfg["method"])
        check_dtype(cfg["model"].get("dtype"))
        distributed.validate(cfg["distributed"])
        check_fit(cfg["data"], int(cfg["train"]["seq_len"]))
        check_schedule(cfg["train"])
        # hardware=auto becomes the detected entry, so runs on other hardware are other runs
        table = load_price_table(CONF_DIR)
        entry = resolve_hardware(cfg["hardware"], table)
    except (MethodError, ModelSourceError, PriceTableError, distributed.DistributedError, DataError,
            ScheduleError) as exc:
        raise UsageError(str(exc)) from exc
    cfg["hardware"] = entry or unpriced_hardware(table)  # an unknown device: no neighbour's price, a warning
    method = cfg["method"]["name"]
    rank = rank_of(cfg["method"])
    return {
        "config": cfg,
        "config_hash": identity.config_hash(cfg),
        "pair_key": identity.pair_key(cfg),
        "eval_key": identity.base_key(cfg),
        "method": method,
        "rank": rank,
        "run_id": identity.run_id(method, rank, cfg),
        "base_run_id": records.run_id_for("base", None, identity.base_key(cfg)),
    }


def check_inputs(cfg: dict) -> None:
    """Fail fast, before any record is written, on paths that do not exist."""
    from harness.data import DataError, load_examples
    from harness.evaluate import EvalDataError, mmlu_tasks
    from harness.models import ModelSourceError, arch_path, resolve_gguf

    try:
        model = cfg["model"]
        if model["source"] == "gguf":
            resolve_gguf(model.get("gguf") or {})
        elif model["source"] == "config":
            arch_path(str(model["arch"]))
        elif model["source"] == "hub":
            from harness.models import model_folder

            model_folder(model)
        if cfg["data"]["kind"] != "hub":
            load_examples(cfg["data"])
        if cfg["eval"]["mmlu"]["enabled"] and cfg["eval"]["mmlu"].get("dir"):
            mmlu_tasks(cfg["eval"]["mmlu"])
    except (ModelSourceError, DataError, EvalDataError) as exc:
        raise UsageError(str(exc)) from exc


# ---------------------------------------------------------------- executing one job


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "lm_eval", "datasets", "hydra-core"):
        try:
            versions[pkg.replace("-", "_")] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg.replace("-", "_")] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=CONF_DIR.parent,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "versions": versions,
        "git_commit": commit,
        "python": platform.python_version(),
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        **sweep.launch_env(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def empty_metrics() -> dict:
    return {name: None for name in records.REQUIRED_METRICS}


def new_record(job: dict, env: dict) -> dict:
    """The record of ``job`` before anything is measured: identity, config, null metrics."""
    cfg = job["config"]
    return {
        "schema": records.SCHEMA, "run_id": job["run_id"], "config_hash": job["config_hash"],
        "pair_key": job["pair_key"], "eval_key": job["eval_key"], "status": "ok", "error": None, "failed_phase": None,
        "method": job["method"], "rank": job["rank"],
        "model": {"name": cfg["model"]["name"], "source": cfg["model"]["source"], "total_params": None,
                  "random_weights": cfg["model"]["source"] == "config"},
        "config": cfg, "env": env, "items_file": None, "base_run_id": None, "metrics": empty_metrics(),
    }


def should_evaluate(cfg: dict, random_weights: bool) -> bool:
    return not random_weights or bool(cfg["eval"].get("on_random_weights"))


def evaluate_all(model, tokenizer, cfg: dict, heldout: list[dict]) -> tuple[dict, list[dict]]:
    """MMLU and in-domain accuracy of ``model`` as configured; (metrics, per-question items)."""
    from harness.evaluate import evaluate_indomain, evaluate_mmlu

    metrics: dict = {"mmlu_acc": None, "mmlu_stderr": None, "mmlu_n": None, "indomain_acc": None,
                     "indomain_stderr": None, "indomain_n": None}
    items: list[dict] = []
    was_training = model.training
    model.eval()
    if cfg["eval"]["mmlu"]["enabled"]:
        m, it = evaluate_mmlu(model, tokenizer, cfg["eval"]["mmlu"])
        metrics.update(m)
        items += it
    if cfg["eval"]["indomain"]["enabled"] and heldout:
        with tempfile.TemporaryDirectory() as tmp:
            m, it = evaluate_indomain(model, tokenizer, heldout, cfg["eval"]["indomain"], tmp)
        metrics.update(m)
        items += it
    model.train(was_training)
    return metrics, items


def base_record(job: dict, cfg: dict, heldout: list[dict], env: dict, startup_s: float | None = None) -> dict:
    """Evaluate the base model without fine-tuning once per (model, eval settings, data);
    ``startup_s``: the start-up of its own process, when it has one."""
    import torch

    from harness.models import load_model, model_dtype

    print(f"[{job['base_run_id']}] evaluating the base model (once for all arms and seeds)", flush=True)
    started = now_iso()
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model_dtype(cfg["model"], {"name": "base"}, device)
    loaded = load_model(cfg["model"], dtype=getattr(torch, dtype), mmap=device != "cpu")
    acc, items = evaluate_all(loaded.model, loaded.tokenizer, cfg, heldout)
    base_job = {**job, "run_id": job["base_run_id"], "config_hash": job["eval_key"], "pair_key": None,
                "method": "base", "rank": None, "config": {**cfg, "method": {"name": "base"}}}
    rec = new_record(base_job, {**env, "started_at": started, "ended_at": now_iso()})
    rec["model"]["total_params"] = loaded.total_params
    metrics = rec["metrics"]
    metrics.update(acc, total_params=loaded.total_params, model_dtype=dtype, run_wall_s=time.perf_counter() - t0,
                   startup_wall_s=startup_s)
    rec["items_file"] = records.write_items(cfg["results_dir"], base_job["run_id"], items)
    records.write_record(cfg["results_dir"], rec)
    print(f"[base] {rec['run_id']}: mmlu_acc={metrics['mmlu_acc']} indomain_acc={metrics['indomain_acc']}", flush=True)
    return rec


def execute(job: dict, own_process: bool = False) -> dict | None:
    """Run one planned job end to end on this process; rank 0 writes the one record.
    ``own_process``: this process was started for the job (``harness.job``), so its start-up
    (interpreter, imports) is the job's and is recorded as ``startup_wall_s``.

    Every rank of a distributed job runs this: each trains and measures its own part, and the
    figures of all ranks are gathered to rank 0. One process (world size 1) records its own
    failures; in a job of several processes a failing rank writes its error beside the job
    (``HARNESS_JOB_ERROR_DIR``) and exits, so that the launcher stops the other ranks and the
    parent writes the record.
    """
    import datasets
    import torch
    import transformers
    from transformers import set_seed

    from harness import distributed
    from harness.data import load_examples
    from harness.measure import callback, flops, memory, pricing, serving
    from harness.methods import apply_method, quantization_config
    from harness.models import load_model, model_dtype
    from harness.train import (
        build_trainer,
        release_optimizer,
        token_budget,
        training_arguments,
        training_features,
        use_bf16,
    )

    # progress of this harness (steps, loss, ETA) rather than a bar per file loaded
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = job["config"]
    strategy = distributed.strategy_of(cfg)
    sharded = strategy in distributed.SHARDED
    results_dir = cfg["results_dir"]
    label = job["run_id"]
    env = environment()
    started = now_iso()
    t_run = time.perf_counter()
    record = new_record(job, env)
    metrics = record["metrics"]
    mine: dict = {"device": None}  # this rank's figures, gathered to rank 0
    skipped: dict = {}
    phases = failure.Phases()
    metrics["startup_wall_s"] = failure.process_age_s() if own_process else None
    try:
        set_seed(int(cfg["seed"]))
        examples, heldout = load_examples(cfg["data"])
        evaluate = should_evaluate(cfg, record["model"]["random_weights"])
        base = None
        if evaluate:
            base = records.find_ok(results_dir, job["base_run_id"])
            if base is None and distributed.world_size() > 1:
                raise RuntimeError(f"base-model record {job['base_run_id']} is missing; the launcher writes it first")
            if base is None:
                phases.enter("base_eval")
                base = base_record(job, cfg, heldout, env)
                phases.enter("load")
            record["base_run_id"] = base["run_id"]
        # before the model: starts the process group and puts this process on its device
        args = training_arguments(cfg["train"], float(cfg["method"]["learning_rate"]), int(cfg["seed"]))
        world = args.world_size
        env.update(device_count=world, visible_device_count=torch.cuda.device_count() if torch.cuda.is_available() else 1)
        mine["device"] = distributed.device_label(args.device)
        set_seed(int(cfg["seed"]))  # the same initial RNG state for every arm, base eval or not
        metrics["model_dtype"] = model_dtype(cfg["model"], cfg["method"], args.device, sharded)
        loaded = load_model(cfg["model"], dtype=getattr(torch, metrics["model_dtype"]),
                            quantization_config=quantization_config(cfg["method"], sharded=sharded),
                            device="cpu" if sharded else args.device, mmap=args.device.type != "cpu")
        record["model"]["total_params"] = loaded.total_params
        model = apply_method(loaded.model, cfg["method"], bool(cfg["train"]["gradient_checkpointing"]))
        metrics.update(flops.param_counts(model))
        trainable, total = metrics["trainable_params"], metrics["total_params"]
        embedding = flops.embedding_params(model)  # before sharding turns weights into shards
        distributed.print0(f"[{label}] trainable params: {trainable:,} || all params: {total:,} || "
                           f"trainable%: {100 * trainable / total:.4f} || {strategy} over {world} process(es)")

        probe = callback.MeasureCallback(warmup_steps=int(cfg["train"]["warmup_steps_excluded"]))
        features, fit = training_features(examples, loaded.tokenizer, cfg["train"], cfg["data"], label)
        metrics.update(fit)
        trainer = build_trainer(model, loaded.tokenizer, features, cfg["train"], float(cfg["method"]["learning_rate"]),
                                int(cfg["seed"]), callbacks=[probe], label=label, args=args)
        phases.enter("train")
        try:
            trainer.train()
        finally:  # stop the probe's hooks and keep what it measured, even when training fails
            probe.close()
            # padded positions from the steps taken; real tokens counted by the Trainer on every rank
            metrics.update(probe.metrics(
                train_tokens=flops.padded_tokens(trainer.state.global_step, args, int(cfg["train"]["seq_len"])),
                real_tokens=int(trainer.state.num_input_tokens_seen) or None))
        metrics["token_budget"] = token_budget(cfg["train"])  # per process
        for key in ("peak_memory_bytes", "peak_memory_growth_bytes", "peak_memory_reserved_bytes",
                    "memory_breakdown_bytes"):
            mine[key] = metrics[key]
        # nothing after training steps the optimizer: its moments and the gradients must not sit
        # in the evaluation's memory peak (AdamW: 2 x the trainable weights, for full FT)
        release_optimizer(trainer)

        # MFU: each device's matmul peak in the training dtype, measured once per hardware (cached)
        device = args.device
        train_dtype = torch.bfloat16 if use_bf16(str(cfg["train"]["precision"])) else torch.float32
        arch = model.config
        fpt = flops.flops_per_token(
            job["method"], total, trainable, embedding_params=embedding, n_layers=arch.num_hidden_layers,
            seq_len=int(cfg["train"]["seq_len"]), hidden_size=arch.hidden_size)
        phases.enter("mfu")
        peak = flops.device_peak_flops(device, train_dtype)
        mine["peak_flops_per_s"] = peak.pop("peak_flops_per_s")
        metrics.update(peak)  # where rank 0's peak came from (measured now / cached, when)
        metrics["train_dtype"] = str(train_dtype).removeprefix("torch.")

        if evaluate:
            phases.enter("eval")
            # every rank evaluates the same questions: a sharded model's forward needs them all
            with memory.eval_peak_memory(device) as eval_mem:
                acc, items = evaluate_all(model, loaded.tokenizer, cfg, heldout)
            metrics.update(acc)
            mine.update(eval_mem)
            for task in ("mmlu", "indomain"):
                if metrics.get(f"{task}_acc") is not None and base["metrics"].get(f"{task}_acc") is not None:
                    metrics[f"{task}_gain_vs_base"] = metrics[f"{task}_acc"] - base["metrics"][f"{task}_acc"]
            if distributed.is_main():
                record["items_file"] = records.write_items(results_dir, job["run_id"], items)

        # serving: adapter vs full checkpoint, exact tensor bytes in the serving dtype: QLoRA's compute
        # dtype; else the weights' dtype when it is narrower than fp32 (a bf16 frozen base), else the
        # training dtype (bf16 where training ran in bf16, fp32 on CPU); latency
        weights_dtype = getattr(torch, metrics["model_dtype"])
        serve_dtype = (getattr(torch, cfg["method"]["compute_dtype"]) if cfg["method"].get("quantize")
                       else weights_dtype if weights_dtype.itemsize < 4 else train_dtype)
        # a sharded adapter is saved from its parameters gathered by every rank
        phases.enter("footprint")
        state_dict = (distributed.adapter_state_dict(trainer.accelerator, model, strategy)
                      if sharded and trainable < total else None)
        if distributed.is_main():
            metrics.update(serving.footprint_metrics(model, serve_dtype, state_dict=state_dict))
        lat = cfg["eval"]["latency"]
        if lat["enabled"] and sharded:
            # merging adapters into sharded weights is not supported by peft; a sharded forward
            # is not a serving latency either
            skipped["latency"] = f"not measured under distributed={strategy}: peft cannot merge adapters into " \
                                 "sharded weights; measure serving latency with distributed=none"
        elif lat["enabled"] and distributed.is_main():
            phases.enter("latency")
            prompts = [ex["prompt"] for ex in examples[: int(lat["prompts"])]]
            metrics.update(serving.compare_latency(model, loaded.tokenizer, prompts, reps=int(lat["reps"]),
                                                   new_tokens=int(lat["gen_tokens"])))
        per_rank = distributed.gather(mine)
        metrics.update(distributed.combine(per_rank, strategy))
        peaks = [p for p in metrics["peak_flops_per_s_per_rank"] if p]
        metrics.update(flops.flops_metrics(fpt, metrics["tokens_per_s"], statistics.fmean(peaks) if peaks else None,
                                             world))
        metrics.update(flops.datasheet_metrics(cfg["hardware"], metrics["achieved_flops_per_s"], metrics["train_dtype"],
                                               world))
        metrics["tokens_per_s_per_device"] = metrics["tokens_per_s"] / world if metrics["tokens_per_s"] else None
        metrics["achieved_flops_per_s_per_device"] = (metrics["achieved_flops_per_s"] / world
                                                      if metrics["achieved_flops_per_s"] else None)
    except Exception as exc:  # record every failure; the sweep goes on
        traceback.print_exc()
        record.update(failure.fields(exc, phases.current))
        if distributed.world_size() > 1:
            write_rank_error(record["status"], record["error"], record["failed_phase"])
            sys.stdout.flush()
            os._exit(1)  # the launcher stops the other ranks; the parent writes the record
        if mine.get("peak_flops_per_s"):  # training finished and the peak was measured: its MFU stands
            metrics.update(flops.flops_metrics(fpt, metrics["tokens_per_s"], mine["peak_flops_per_s"]))
    if not distributed.is_main():
        return None
    metrics["skipped_measurements"] = skipped or None
    metrics.setdefault("world_size", 1)
    metrics.setdefault("strategy", strategy)
    metrics["run_wall_s"] = time.perf_counter() - t_run
    metrics["phase_wall_s"] = phases.seconds()  # where run_wall_s went (this rank's)
    # cost_usd: the fine-tuning itself (training phase); run_cost_usd: the whole run with evals;
    # both × the devices used (one per process), not the devices visible
    # (a CPU run: the cores its processes' torch threads used); projected at the real-token rate
    devices_used = metrics["world_size"]
    metrics.update(pricing.cost_metrics(cfg["hardware"], metrics.get("train_wall_excl_probe_s"), devices_used,
                                        # no projection from a run that did not finish
                                        dataset_tokens=cfg.get("projected_tokens") if record["status"] == "ok" else None,
                                        tokens_per_s=metrics.get("real_tokens_per_s"),
                                        cpu_cores=pricing.cpu_cores_used(env["cpu_threads"], devices_used),
                                        run_seconds=metrics["run_wall_s"]))
    env.update(started_at=started, ended_at=now_iso())
    records.write_record(results_dir, record)
    phase = f" in phase {record['failed_phase']}" if record["failed_phase"] else ""
    print(f"[{label}] {record['status']}{phase}: record {records.record_path(results_dir, job['run_id'])} "
          f"({time_breakdown(metrics)})", flush=True)
    return record


def time_breakdown(metrics: dict) -> str:
    """Where a run's wall time went, for the console: ``221 s: train 152, eval 32, latency 36, ...``."""
    spent = sorted((metrics.get("phase_wall_s") or {}).items(), key=lambda kv: -kv[1])
    parts = [f"{phase} {s:.0f}" for phase, s in spent if s >= 0.5]
    if metrics.get("startup_wall_s"):
        parts.append(f"start-up {metrics['startup_wall_s']:.0f}")
    return f"{metrics['run_wall_s']:.0f} s" + (": " + ", ".join(parts) if parts else "")


def write_rank_error(status: str, error: str, failed_phase: str) -> None:
    """Leave this rank's failure where the parent of a distributed job finds it."""
    from harness import distributed

    folder = os.environ.get("HARNESS_JOB_ERROR_DIR")
    if folder:
        Path(folder, f"rank{distributed.rank()}.json").write_text(json.dumps({"status": status, "error": error,
                                                                               "failed_phase": failed_phase}))


def execute_base(job: dict, own_process: bool = False) -> None:
    """Write the base-model record of ``job`` (its own process when isolated)."""
    import torch  # noqa: F401  (the start-up includes the heavy imports, as an arm's does)
    import transformers  # noqa: F401

    from harness.data import load_examples

    startup = failure.process_age_s() if own_process else None

    _, heldout = load_examples(job["config"]["data"])
    base_record(job, job["config"], heldout, environment(), startup_s=startup)


def run_isolated(job: dict, base: bool = False, lock: records.FileLock | None = None) -> None:
    """Run the job in fresh processes (``python -m harness.job``, under ``accelerate launch`` for
    several); if an arm's processes end without a record, write one from what they left.

    ``lock``: the job's held run-id lock, shared with the job process, so that the lock outlives
    a sweep killed while the job goes on (the job still writes its record): a rerun then skips
    it as running rather than training it a second time beside it."""
    from harness import distributed

    cfg = job["config"]
    results_dir = cfg["results_dir"]
    before = records.record_stamp(results_dir, job["run_id"])
    with tempfile.TemporaryDirectory(prefix="harness-job-") as tmp:
        job_file = str(Path(tmp, "job.json"))
        Path(job_file).write_text(json.dumps(job))
        env = {**distributed.launch_env(cfg, base), "HARNESS_JOB_ERROR_DIR": tmp}
        if lock is not None:
            env["HARNESS_RUN_LOCK_FD"] = str(records.lock_fd(lock))
        proc = subprocess.run(distributed.launch_command(job_file, cfg, base), cwd=os.getcwd(), env=env,
                              pass_fds=(records.lock_fd(lock),) if lock is not None else ())
        # the first rank to fail is the cause; the others then lose their peers
        errors = [json.loads(p.read_text())
                  for p in sorted(Path(tmp).glob("rank*.json"), key=lambda p: p.stat().st_mtime_ns)]
        died = failure.killed(proc.returncode, tmp)  # where it was, should it have left no account
    # on several machines, machine 0 (where rank 0 runs) records the job
    if (not base and proc.returncode != 0 and records.record_stamp(results_dir, job["run_id"]) == before
            and not cfg["distributed"].get("machine_rank")):
        if records.find_ok(results_dir, job["run_id"]):  # a force=true rerun died: the ok record stays
            print(f"[{job['run_id']}] rerun died (exit code {proc.returncode}); the earlier ok record is kept",
                  flush=True)
            return
        rec = new_record(job, sweep.launch_env())
        # a rank's own account, or killed (e.g. by the kernel's OOM killer: -9) before it could say why
        rec.update({**died, **errors[0]} if errors else died)
        records.write_record(results_dir, rec)


# ---------------------------------------------------------------- Hydra app


class ReportCallback(Callback):
    """Rebuild the report when a run or a sweep ends (report=true)."""

    def _report(self, config: DictConfig) -> None:
        if not config.get("report", True):
            return
        from harness.report import build_report

        try:
            written = build_report(config.results_dir, config.reports_dir)
        except Exception as exc:  # the runs are safe in results/; a report problem must not hide that
            print(f"harness-run: report not rebuilt: {exc}", file=sys.stderr)
            return
        at_a_glance = written.get("at_a_glance") if isinstance(written, dict) else None
        print(f"At-a-glance table: {at_a_glance or Path(config.reports_dir) / 'at-a-glance.md'}", flush=True)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._report(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._report(config)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    os.environ[sweep.ENV_LAUNCHER] = sweep.launcher_kind(hc.launcher.get("_target_"))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    with contextlib.ExitStack() as stack:
        if os.environ[sweep.ENV_LAUNCHER] == "parallel":
            # first this machine's share (GPUs, threads), before anything can touch a GPU
            try:
                stack.enter_context(sweep.parallel_slot(resolved))
            except sweep.SlotError as exc:
                usage_exit(str(exc))
        try:
            job = plan(resolved)
            check_inputs(job["config"])
        except UsageError as exc:
            if multirun:
                sweep.discard_if_unstarted(resolved["results_dir"], hc)
            usage_exit(str(exc))
        if multirun:
            sweep.register_job(job["config"]["results_dir"], hc, job)
        run_job(job, stack)


def _skip_done(job: dict) -> bool:
    """True (and says so) when an ok record of ``job`` exists and force is off."""
    existing = records.find_ok(job["config"]["results_dir"], job["run_id"])
    if not existing or job["config"]["force"]:
        return False
    changes = identity.provenance_changes(existing, CONF_DIR.parent)
    made_with = f"; it was made with other code or packages ({', '.join(changes)})" if changes else ""
    print(f"[{job['run_id']}] skipped: an ok record exists{made_with} (force=true reruns it)", flush=True)
    return True


def run_job(job: dict, stack: contextlib.ExitStack) -> None:
    """Skip, or run ``job`` (and the base-model evaluation it needs) under its run-id lock."""
    cfg = job["config"]
    results_dir = cfg["results_dir"]
    if _skip_done(job):
        return
    try:  # a moment's wait, so that harness-status probing the lock is never taken for a holder
        lock = stack.enter_context(records.run_lock(results_dir, job["run_id"], timeout=LOCK_PROBE_S))
    except records.Timeout:
        holder = records.lock_holder(results_dir, job["run_id"]) or {}
        print(f"[{job['run_id']}] skipped: another sweep is running it (pid {holder.get('pid', '?')} "
              f"on {holder.get('host', '?')})", flush=True)
        return
    # another sweep may have finished it while this one planned
    if _skip_done(job):
        return
    rank_text = "" if job["rank"] is None else f" r={job['rank']}"
    print(f"[{job['run_id']}] {job['method']}{rank_text} model={cfg['model']['name']} "
          f"seed={cfg['seed']}", flush=True)
    random_weights = cfg["model"]["source"] == "config"
    distributed = cfg["distributed"]["strategy"] != "none"  # always its own processes (accelerate launch)
    if should_evaluate(cfg, random_weights):
        # exactly once per folder: jobs running at once wait here for the one evaluating it
        with records.run_lock(results_dir, job["base_run_id"]) as base_lock:
            if not records.find_ok(results_dir, job["base_run_id"]):
                # its own process too when isolated, so its evaluation leaves nothing in the
                # process whose training memory is measured
                if cfg["isolate"] or distributed:
                    run_isolated(job, base=True, lock=base_lock)
                else:
                    try:
                        execute_base(job)
                    except Exception:  # the arm tries again in execute() and records the failure
                        traceback.print_exc()
    if cfg["isolate"] or distributed:
        run_isolated(job, lock=lock)
    else:
        execute(job)


def main() -> None:
    from harness import preflight

    preflight.check(sys.argv[1:], CONF_DIR)  # every job of the command, before the first one runs
    hydra_main()


if __name__ == "__main__":
    main()
