"""One job end to end, and the job process: ``python -m harness.job <job.json> [--base]``.

``job.json`` is a job planned by ``harness.plan.plan``. Without ``--base`` the process trains,
measures and evaluates the arm and writes its record (on rank 0; ``execute``); with ``--base`` it
writes the base-model record (``execute_base``). The sequential launcher runs it with plain
python; a distributed job runs it on every process under ``accelerate launch`` (see
``harness.distributed.launch_command``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import console, failure, records, tracking
from harness.measure.environment import environment, now_iso
from harness.records import new_record


def should_evaluate(cfg: dict, random_weights: bool) -> bool:
    return not random_weights or bool(cfg["eval"].get("on_random_weights"))


def evaluate_all(model, tokenizer, cfg: dict, data) -> tuple[dict, list[dict]]:
    """MMLU, in-domain accuracy (multiple-choice held-out rows), held-out loss (other held-out
    rows) and the loss on general text (forgetting) of ``model`` as configured; (metrics, per-question / per-example items). ``data``: a
    ``harness.data.Data``."""
    from harness.evaluate import evaluate_indomain, evaluate_mmlu, evaluate_tasks
    from harness.nll import evaluate_forgetting, evaluate_heldout_loss

    metrics: dict = {"mmlu_acc": None, "mmlu_stderr": None, "mmlu_n": None, "indomain_acc": None,
                     "indomain_stderr": None, "indomain_n": None}
    items: list[dict] = []
    was_training = model.training
    model.eval()
    if cfg["eval"]["mmlu"]["enabled"]:
        m, it = evaluate_mmlu(model, tokenizer, cfg["eval"]["mmlu"])
        metrics.update(m)
        items += it
    if cfg["eval"]["indomain"]["enabled"] and data.heldout_mc:
        with tempfile.TemporaryDirectory() as tmp:
            m, it = evaluate_indomain(model, tokenizer, data.heldout_mc, cfg["eval"]["indomain"], tmp)
        metrics.update(m)
        items += it
    if cfg["eval"]["indomain"]["enabled"] and data.heldout_text:
        m, it = evaluate_heldout_loss(model, tokenizer, data.heldout_text, cfg)
        metrics.update(m)
        items += it
    if cfg["eval"].get("tasks"):
        m, it = evaluate_tasks(model, tokenizer, cfg["eval"])
        metrics.update(m)
        items += it
    if (cfg["eval"].get("forgetting") or {}).get("enabled"):
        m, it = evaluate_forgetting(model, tokenizer, cfg)
        metrics.update(m)
        items += it
    m, it = evaluate_validation(model, tokenizer, cfg, data)
    metrics.update(m)
    items += it
    model.train(was_training)
    return metrics, items


def evaluate_validation(model, tokenizer, cfg: dict, data) -> tuple[dict, list[dict]]:
    """The validation split (tune=lr chooses a rate on it), scored as the test split is, under
    ``validation_*`` names: ``validation_indomain_acc`` (multiple-choice rows) and
    ``validation_heldout_loss`` (other rows); its items carry the task ``validation_indomain`` /
    ``validation_heldout``, so no reported gap ever reads them."""
    from harness.evaluate import evaluate_indomain
    from harness.nll import loss_metrics, nll_items

    metrics: dict = {}
    items: list[dict] = []
    if data.validation_mc:
        with tempfile.TemporaryDirectory() as tmp:
            m, it = evaluate_indomain(model, tokenizer, data.validation_mc, {**cfg["eval"]["indomain"], "limit": None},
                                      tmp)
        metrics.update({f"validation_{k}": v for k, v in m.items()})
        items += [{**i, "task": "validation_indomain"} for i in it]
    if data.validation_text:
        from harness.data import tokenize_examples

        features, _ = tokenize_examples(data.validation_text, tokenizer, cfg["train"]["seq_len"], cfg["data"])
        it = nll_items(model, tokenizer, features, cfg["eval"]["indomain"].get("batch_size", 16),
                       task="validation_heldout")
        metrics.update(loss_metrics(it, prefix="validation_heldout"))
        items += it
    return metrics, items


def base_job_of(job: dict) -> dict:
    """The base-model evaluation of an arm's job, as a job of its own (its run id and eval key)."""
    return {**job, "run_id": job["base_run_id"], "config_hash": job["eval_key"], "pair_key": None,
            "method": "base", "rank": None, "config": {**job["config"], "method": {"name": "base"}}}


def base_failure_text(results_dir: str, base_run_id: str) -> str | None:
    """``the base-model evaluation base-… failed (oom in base_eval: …)`` when its record says so."""
    path = records.record_path(results_dir, base_run_id)
    try:
        rec = records.load_record(path) if path.exists() else None
    except records.RecordError:
        return None
    if rec is None or rec.get("status") == "ok":
        return None
    first = (str(rec.get("error") or "").splitlines() or [""])[0]
    return f"the base-model evaluation {base_run_id} {rec['status']} ({first}); its record: {path}"


def base_record(job: dict, cfg: dict, data, env: dict, startup_s: float | None = None) -> dict:
    """Evaluate the base model without fine-tuning once per (model, eval settings, data);
    ``startup_s``: the start-up of its own process, when it has one."""
    import torch

    from harness.models import load_model, model_dtype

    print(f"[{job['base_run_id']}] evaluating the base model (once for all arms and seeds)", flush=True)
    started = now_iso()
    t0 = time.perf_counter()
    from harness.train import inference_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model_dtype(cfg["model"], {"name": "base"}, device, precision=cfg["train"]["precision"])
    loaded = load_model(cfg["model"], dtype=getattr(torch, dtype), mmap=device != "cpu")
    precision, eval_precision = inference_precision(cfg["train"]["precision"], device)
    with precision:
        acc, items = evaluate_all(loaded.model, loaded.tokenizer, cfg, data)
    base_job = base_job_of(job)
    rec = new_record(base_job, {**env, "started_at": started, "ended_at": now_iso()})
    rec["model"]["total_params"] = loaded.total_params
    metrics = rec["metrics"]
    metrics.update(acc, total_params=loaded.total_params, model_dtype=dtype, eval_precision=eval_precision,
                   run_wall_s=time.perf_counter() - t0, startup_wall_s=startup_s)
    rec["items_file"] = records.write_items(cfg["results_dir"], base_job["run_id"], items)
    records.write_record(cfg["results_dir"], rec)
    print(f"[base] {rec['run_id']}: mmlu_acc={metrics['mmlu_acc']} indomain_acc={metrics['indomain_acc']}", flush=True)
    tracking.safe_log_record(rec, cfg["results_dir"])  # after the record: a tracker never holds it up
    return rec


@dataclass
class Run:
    """What the phases of one job share: its plan, its record, this rank's own figures (gathered
    to rank 0 at the end) and what each phase hands to the next."""

    job: dict
    env: dict
    record: dict
    phases: failure.Phases = field(default_factory=failure.Phases)
    mine: dict = field(default_factory=lambda: {"device": None})  # this rank's figures
    skipped: dict = field(default_factory=dict)  # measurements not taken, and why
    data: Any = None  # harness.data.Data: training examples and held-out rows
    evaluate: bool = False
    base: dict | None = None
    args: Any = None  # the Trainer's TrainingArguments
    loaded: Any = None  # harness.models.Loaded
    model: Any = None  # the model with its method applied
    trainer: Any = None
    embedding_params: int = 0
    train_dtype: Any = None
    flops_per_token: float | None = None

    @property
    def cfg(self) -> dict:
        return self.job["config"]

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]

    @property
    def label(self) -> str:
        return self.job["run_id"]

    @property
    def strategy(self) -> str:
        from harness import distributed

        return distributed.strategy_of(self.cfg)


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
    from harness import distributed
    from harness.measure import flops

    console.quiet()  # progress of this harness (steps, loss, ETA), not a bar per file loaded
    env = environment()
    started = now_iso()
    t_run = time.perf_counter()
    run = Run(job=job, env=env, record=new_record(job, env))
    run.metrics["startup_wall_s"] = failure.process_age_s() if own_process else None
    run.metrics["hardware_warning"] = hardware_warning(run.cfg["hardware"])
    try:
        load(run)
        train(run)
        peak_flops(run)
        if run.evaluate:
            evaluate(run)
        serve(run)
        combine(run)
    except Exception as exc:  # record every failure; the sweep goes on
        traceback.print_exc()
        run.record.update(failure.fields(exc, run.phases.current))
        if distributed.world_size() > 1:
            write_rank_error(run.record["status"], run.record["error"], run.record["failed_phase"])
            sys.stdout.flush()
            os._exit(1)  # the launcher stops the other ranks; the parent writes the record
        if run.mine.get("peak_flops_per_s"):  # training finished and the peak was measured: its MFU stands
            run.metrics.update(flops.flops_metrics(run.flops_per_token, run.metrics["tokens_per_s"],
                                                   run.mine["peak_flops_per_s"]))
    if not distributed.is_main():
        return None
    return finish(run, started, time.perf_counter() - t_run)


def hardware_warning(entry: dict) -> str | None:
    """The preset this job is priced as against the device it found (pricing.hardware_mismatch),
    printed once (rank 0) and recorded as ``metrics.hardware_warning``."""
    from harness import distributed
    from harness.measure import pricing
    from harness.measure.environment import device_identity

    warning = pricing.hardware_mismatch(entry, *device_identity())
    if warning and distributed.is_main():
        print(f"harness: warning: {warning}", file=sys.stderr, flush=True)
    return warning


def load(run: Run) -> None:
    """Data, the base model's record (evaluated first when missing), the process group and this
    process's device, the model with its method applied."""
    import torch
    from transformers import set_seed

    from harness import distributed
    from harness.data import load_data
    from harness.measure import flops
    from harness.methods import apply_method, quantization_config
    from harness.models import load_model, model_dtype
    from harness.train import training_arguments

    cfg, metrics = run.cfg, run.metrics
    sharded = run.strategy in distributed.SHARDED
    set_seed(cfg["seed"])
    run.data = load_data(cfg["data"])
    run.evaluate = should_evaluate(cfg, run.record["model"]["random_weights"])
    if run.evaluate:
        run.base = records.find_ok(cfg["results_dir"], run.job["base_run_id"])
        if run.base is None and distributed.world_size() > 1:
            # the launcher evaluates the base first; say why it has no ok record, not only that
            raise RuntimeError(base_failure_text(cfg["results_dir"], run.job["base_run_id"])
                               or f"base-model record {run.job['base_run_id']} is missing; the launcher writes it first")
        if run.base is None:
            run.phases.enter("base_eval")
            run.base = base_record(run.job, cfg, run.data, run.env)
            run.phases.enter("load")
        run.record["base_run_id"] = run.base["run_id"]
    # before the model: starts the process group and puts this process on its device
    run.args = args = training_arguments(cfg["train"], cfg["method"]["learning_rate"], cfg["seed"])
    run.env.update(device_count=args.world_size,
                   visible_device_count=torch.cuda.device_count() if torch.cuda.is_available() else 1)
    run.mine["device"] = distributed.device_label(args.device)
    set_seed(cfg["seed"])  # the same initial RNG state for every arm, base eval or not
    metrics["model_dtype"] = model_dtype(cfg["model"], cfg["method"], args.device, sharded, cfg["train"]["precision"])
    run.loaded = load_model(cfg["model"], dtype=getattr(torch, metrics["model_dtype"]),
                            quantization_config=quantization_config(cfg["method"], sharded=sharded),
                            device="cpu" if sharded else args.device, mmap=args.device.type != "cpu")
    run.record["model"]["total_params"] = run.loaded.total_params
    run.model = apply_method(run.loaded.model, cfg["method"], cfg["train"]["gradient_checkpointing"])
    metrics.update(flops.param_counts(run.model))
    run.embedding_params = flops.embedding_params(run.model)  # before sharding turns weights into shards
    trainable, total = metrics["trainable_params"], metrics["total_params"]
    distributed.print0(f"[{run.label}] trainable params: {trainable:,} || all params: {total:,} || "
                       f"trainable%: {100 * trainable / total:.4f} || {run.strategy} over {args.world_size} process(es)")


def train(run: Run) -> None:
    """Tokenize, train under the measuring probe, and free the optimizer for what follows."""
    from harness.measure import callback, flops
    from harness.train import build_trainer, release_optimizer, token_budget, training_features

    cfg, metrics, args = run.cfg, run.metrics, run.args
    probe = callback.MeasureCallback(warmup_steps=cfg["train"]["warmup_steps_excluded"])
    features, fit = training_features(run.data.train, run.loaded.tokenizer, cfg["train"], cfg["data"], run.label)
    metrics.update(fit)
    from harness import distributed

    if distributed.is_main():  # the job's tracker run, streamed by the Trainer's own integration (tracking=...)
        tracking.start(run.job, args)
    run.trainer = build_trainer(run.model, run.loaded.tokenizer, features, cfg["train"],
                                cfg["method"]["learning_rate"], cfg["seed"], callbacks=[probe], label=run.label,
                                args=args)
    tracking.guard(run.trainer)
    run.phases.enter("train")
    try:
        run.trainer.train()
    finally:  # stop the probe's hooks and keep what it measured, even when training fails
        probe.close()
        # padded positions from the steps taken; real tokens counted by the Trainer on every rank
        metrics.update(probe.metrics(
            train_tokens=flops.padded_tokens(run.trainer.state.global_step, args, cfg["train"]["seq_len"]),
            real_tokens=int(run.trainer.state.num_input_tokens_seen) or None))
    metrics["token_budget"] = token_budget(cfg["train"])  # per process
    for key in ("peak_memory_bytes", "peak_memory_growth_bytes", "peak_memory_reserved_bytes",
                "memory_breakdown_bytes"):
        run.mine[key] = metrics[key]
    # nothing after training steps the optimizer: its moments and the gradients must not sit
    # in the evaluation's memory peak (AdamW: 2 x the trainable weights, for full FT)
    release_optimizer(run.trainer)


def peak_flops(run: Run) -> None:
    """FLOPs per token of this model and method, and this device's matmul peak in the training
    dtype (measured once per hardware, then cached), for MFU."""
    import torch

    from harness.measure import flops
    from harness.train import use_bf16

    cfg, metrics = run.cfg, run.metrics
    run.train_dtype = torch.bfloat16 if use_bf16(cfg["train"]["precision"]) else torch.float32
    arch = run.model.config
    run.flops_per_token = flops.flops_per_token(
        run.job["method"], metrics["total_params"], metrics["trainable_params"],
        embedding_params=run.embedding_params, n_layers=arch.num_hidden_layers, seq_len=cfg["train"]["seq_len"],
        hidden_size=arch.hidden_size)
    run.phases.enter("mfu")
    peak = flops.device_peak_flops(run.args.device, run.train_dtype)
    run.mine["peak_flops_per_s"] = peak.pop("peak_flops_per_s")
    metrics.update(peak)  # where rank 0's peak came from (measured now / cached, when)
    metrics["train_dtype"] = str(run.train_dtype).removeprefix("torch.")


def evaluate(run: Run) -> None:
    """MMLU and in-domain accuracy of the trained arm, its gain over the base model, its answers."""
    from harness import distributed
    from harness.evaluate import gains_vs_base, split_over_ranks
    from harness.measure import memory
    from harness.train import inference_precision

    run.phases.enter("eval")
    precision, run.metrics["eval_precision"] = inference_precision(run.cfg["train"]["precision"], run.args.device)
    # a sharded model's forward needs every rank on every question; DDP's whole replicas split
    # them (lm-eval's data parallelism, answers gathered to rank 0)
    split = run.strategy == "ddp"
    run.metrics["eval_split"] = (f"questions split over {distributed.world_size()} ranks" if split else
                                 "every rank scores every question" if run.strategy in distributed.SHARDED else
                                 "one process")
    with memory.eval_peak_memory(run.args.device) as eval_mem, precision, split_over_ranks(split) as scored:
        acc, items = evaluate_all(run.model, run.loaded.tokenizer, run.cfg, run.data)
    run.metrics.update(acc)
    run.mine.update(eval_mem, eval_requests=scored["requests"])
    run.metrics.update(gains_vs_base(run.metrics, run.base["metrics"]))
    if distributed.is_main():
        run.record["items_file"] = records.write_items(run.cfg["results_dir"], run.job["run_id"], items)


def serve(run: Run) -> None:
    """Serving footprint (adapter vs full checkpoint, exact tensor bytes in the serving dtype)
    and, on one process, the latency of the merged and the dynamic adapter against the base."""
    import torch

    from harness import distributed
    from harness.measure import serving

    cfg, metrics = run.cfg, run.metrics
    sharded = run.strategy in distributed.SHARDED
    dtype = serving.serve_dtype(cfg["method"], getattr(torch, metrics["model_dtype"]), run.train_dtype)
    run.phases.enter("footprint")
    # a sharded adapter is saved from its parameters gathered by every rank
    state_dict = (distributed.adapter_state_dict(run.model, run.strategy)
                  if sharded and metrics["trainable_params"] < metrics["total_params"] else None)
    if distributed.is_main():
        metrics.update(serving.footprint_metrics(run.model, dtype, state_dict=state_dict))
    lat = cfg["eval"]["latency"]
    if lat["enabled"] and sharded:
        # merging adapters into sharded weights is not supported by peft; a sharded forward
        # is not a serving latency either
        run.skipped["latency"] = f"not measured under distributed={run.strategy}: peft cannot merge adapters " \
                                 "into sharded weights; measure serving latency with distributed=none"
    elif lat["enabled"] and distributed.is_main():
        run.phases.enter("latency")
        from harness.data import prompt_texts

        prompts = prompt_texts(run.data.train[: lat["prompts"]], run.loaded.tokenizer, cfg["data"])
        with _inference_precision(run):  # prefill and generate's decode alike
            metrics.update(serving.compare_latency(run.model, run.loaded.tokenizer, prompts, reps=lat["reps"],
                                                   new_tokens=lat["gen_tokens"]))
    with _inference_precision(run):
        serve_variants(run)


def _inference_precision(run: Run):
    from harness.train import inference_precision

    return inference_precision(run.cfg["train"]["precision"], run.args.device)[0]


def serve_variants(run: Run) -> None:
    """Serving N variants (harness.measure.variants): a PEFT arm on one process measures one base
    with N adapters against N merged models; full FT's entries are N x its checkpoint. A failure
    here loses no other figure: the record says why the measurement is missing."""
    from harness import distributed
    from harness.measure import variants

    cfg, metrics = run.cfg, run.metrics
    settings = cfg["eval"]["variants"]
    if not settings["enabled"] or not distributed.is_main():
        return
    counts = variants.counts_of(settings)
    if metrics["trainable_params"] >= metrics["total_params"]:
        metrics["variants"] = variants.full_model_variants(counts, metrics)
        return
    if run.strategy in distributed.SHARDED:
        run.skipped["variants"] = f"not measured under distributed={run.strategy}: serving N variants runs on one " \
                                  "process; measure it with distributed=none"
        return
    run.phases.enter("variants")
    from harness.data import prompt_texts

    prompts = prompt_texts(run.data.train[: settings["batch"]], run.loaded.tokenizer, cfg["data"])
    try:
        metrics["variants"], metrics["variants_settings"] = variants.measure_variants(
            run.model, run.loaded.tokenizer, prompts, settings, metrics, seed=int(cfg["seed"]))
    except Exception as exc:  # noqa: BLE001 - an optional measurement: the run's figures stand without it
        first = (str(exc).splitlines() or [""])[0]
        run.skipped["variants"] = f"failed: {type(exc).__name__}: {first}"
        print(f"[{run.label}] serving N variants failed ({type(exc).__name__}: {first}); the record says so", flush=True)


def combine(run: Run) -> None:
    """Every rank's figures gathered to rank 0, and the FLOPs figures over all devices."""
    from harness import distributed
    from harness.measure import flops

    metrics = run.metrics
    metrics.update(distributed.combine(distributed.gather(run.mine), run.strategy))
    metrics.update(flops.run_flops_metrics(run.flops_per_token, metrics["tokens_per_s"],
                                           metrics["peak_flops_per_s_per_rank"], run.cfg["hardware"],
                                           metrics["train_dtype"], run.args.world_size))


def finish(run: Run, started: str, wall_s: float) -> dict:
    """Rank 0: costs, where the time went, and the record written."""
    from harness.measure import pricing

    cfg, metrics, record = run.cfg, run.metrics, run.record
    metrics["skipped_measurements"] = run.skipped or None
    metrics.setdefault("world_size", 1)
    metrics.setdefault("strategy", run.strategy)
    metrics["run_wall_s"] = wall_s
    metrics["phase_wall_s"] = run.phases.seconds()  # where run_wall_s went (this rank's)
    # cost_usd: the fine-tuning itself (training phase); run_cost_usd: the whole run with evals;
    # both × the devices used (one per process), not the devices visible
    # (a CPU run: the cores its processes' torch threads used); projected at the real-token rate
    devices_used = metrics["world_size"]
    metrics.update(pricing.cost_metrics(cfg["hardware"], metrics.get("train_wall_excl_probe_s"), devices_used,
                                        # no projection from a run that did not finish
                                        dataset_tokens=cfg.get("projected_tokens") if record["status"] == "ok" else None,
                                        tokens_per_s=metrics.get("real_tokens_per_s"),
                                        cpu_cores=pricing.cpu_cores_used(run.env["cpu_threads"], devices_used),
                                        run_seconds=metrics["run_wall_s"]))
    run.env.update(started_at=started, ended_at=now_iso())
    records.write_record(cfg["results_dir"], record)
    phase = f" in phase {record['failed_phase']}" if record["failed_phase"] else ""
    print(f"[{run.label}] {record['status']}{phase}: record {records.record_path(cfg['results_dir'], run.job['run_id'])} "
          f"({time_breakdown(metrics)})", flush=True)
    tracking.safe_log_record(record, cfg["results_dir"])  # after the record: a tracker never holds it up
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

    from harness.data import load_data

    startup = failure.process_age_s() if own_process else None
    env = environment()
    try:
        base_record(job, job["config"], load_data(job["config"]["data"]), env, startup_s=startup)
    except Exception as exc:
        # a record of the failure (the arms that need the base then say why they cannot run);
        # a later run evaluates it again, since only an ok base record is reused
        rec = new_record(base_job_of(job), {**env, "started_at": now_iso(), "ended_at": now_iso()})
        rec.update(failure.fields(exc, "base_eval"))
        records.write_record(job["config"]["results_dir"], rec)
        raise


def import_the_stack() -> None:
    """Import what an arm's training uses, then take the objects those imports made out of the
    garbage collector's view (``gc.freeze``). Every ``gc.collect()`` walks all tracked objects, and
    the stack's imports leave about half a million that live as long as the process: each collect
    took ~0.4 s on a 2-core CPU, and a job collects about ten times (before each memory
    measurement, and accelerate before each device-cache clear). Freezing them changes no
    measurement: the job's own objects (data, models, optimizer) are made after the freeze and are
    collected as before, and nothing is imported that training did not import anyway (lm-eval
    still comes with the evaluation, after the training peak)."""
    import gc
    import importlib.util

    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401

    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401  (accelerate imports it on unwrapping any model where installed)
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.job", description=__doc__.splitlines()[0])
    parser.add_argument("job_file", help="a job planned by harness.plan.plan, as JSON")
    parser.add_argument("--base", action="store_true", help="evaluate the base model instead of training the arm")
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job_file).read_text())
    console.quiet()
    if not args.base:
        import_the_stack()

    if "HARNESS_RUN_LOCK_FD" in os.environ:  # the sweep's run-id lock, shared with this process
        records.take_over_holder(int(os.environ["HARNESS_RUN_LOCK_FD"]),
                                 records.lock_path(job["config"]["results_dir"], job["run_id"]))
    execute_base(job, own_process=True) if args.base else execute(job, own_process=True)


if __name__ == "__main__":
    main()
