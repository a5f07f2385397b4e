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
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from harness import console, failure, records
from harness.measure.environment import environment, now_iso
from harness.records import new_record


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
    import torch
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

    console.quiet()  # progress of this harness (steps, loss, ETA), not a bar per file loaded
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.job", description=__doc__.splitlines()[0])
    parser.add_argument("job_file", help="a job planned by harness.plan.plan, as JSON")
    parser.add_argument("--base", action="store_true", help="evaluate the base model instead of training the arm")
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job_file).read_text())
    console.quiet()

    if "HARNESS_RUN_LOCK_FD" in os.environ:  # the sweep's run-id lock, shared with this process
        records.take_over_holder(int(os.environ["HARNESS_RUN_LOCK_FD"]),
                                 records.lock_path(job["config"]["results_dir"], job["run_id"]))
    execute_base(job, own_process=True) if args.base else execute(job, own_process=True)


if __name__ == "__main__":
    main()
