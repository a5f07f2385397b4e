"""One job over N processes: the ``accelerate launch`` command, rank helpers, per-rank figures.

``distributed=none`` (the default) runs the job process with plain python on exactly one device
(``CUDA_VISIBLE_DEVICES`` narrowed to the first visible one, so transformers cannot wrap the
model in ``DataParallel`` over the others). ``ddp``, ``fsdp`` and ``zero3`` start the job's
processes with ``accelerate launch``, whose flags set accelerate's own plugins, which
transformers' Trainer then uses:

    ddp    --multi_gpu: every process holds the whole model; gradients are all-reduced
    fsdp   --use_fsdp --fsdp_version 2: FULL_SHARD (reshard after forward), one FSDP unit per
           transformer layer (TRANSFORMER_BASED_WRAP), SHARDED_STATE_DICT, weights loaded once on
           rank 0 and broadcast (cpu_ram_efficient_loading)
    zero3  --use_deepspeed --zero_stage 3 (pip install 'peft-harness[deepspeed]')

Under FSDP1 (``distributed.fsdp.version=1``) the Trainer swaps in peft's ``fsdp_auto_wrap_policy``
for adapters (``update_fsdp_plugin_peft``); FSDP2 shards per parameter, so frozen base weights
get no gradient memory with the transformer-layer policy alone.

Every rank trains and measures; ``gather`` brings each rank's figures to all ranks and rank 0
writes the one record. ``print0`` prints on rank 0 only.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from typing import Any

STRATEGIES = ("none", "ddp", "fsdp", "zero3")
SHARDED = ("fsdp", "zero3")


class DistributedError(ValueError):
    """A distributed setting that cannot run (a usage error)."""


# ---------------------------------------------------------------- rank helpers (no torch import)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only (every rank runs the same code; one copy of each line is enough)."""
    if is_main():
        print(*args, **{"flush": True, **kwargs})


def strategy_of(cfg: dict) -> str:
    return str((cfg.get("distributed") or {}).get("strategy") or "none")


# ---------------------------------------------------------------- validating and launching


def validate(dist: dict) -> None:
    """Raise DistributedError naming the first setting that cannot run."""
    strategy = dist.get("strategy")
    if strategy not in STRATEGIES:
        raise DistributedError(f"distributed.strategy={strategy!r} is unknown; valid: {', '.join(STRATEGIES)}")
    n, machines = dist.get("num_processes"), dist.get("num_machines")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DistributedError(f"distributed.num_processes={n!r} is invalid; give a positive integer")
    if not isinstance(machines, int) or isinstance(machines, bool) or machines < 1:
        raise DistributedError(f"distributed.num_machines={machines!r} is invalid; give a positive integer")
    if strategy == "none" and (n != 1 or machines != 1):
        raise DistributedError(
            f"distributed.num_processes={n} with distributed=none; none runs one process on one device "
            "(use distributed=ddp, fsdp or zero3 for more)"
        )
    if strategy == "ddp" and n < 2:
        raise DistributedError(f"distributed.num_processes={n} with distributed=ddp; give 2 or more")
    if n % machines:
        raise DistributedError(
            f"distributed.num_processes={n} is not a multiple of distributed.num_machines={machines}; "
            "num_processes is the total over all machines"
        )
    if machines > 1 and not dist.get("main_process_ip"):
        raise DistributedError("distributed.main_process_ip is empty with num_machines > 1; give machine 0's address")
    if strategy == "zero3" and importlib.util.find_spec("deepspeed") is None:
        raise DistributedError("distributed=zero3 needs deepspeed; pip install 'peft-harness[deepspeed]'")


def _flags(values: dict) -> list[str]:
    """``{"zero_stage": 3, "fsdp_offload_params": False}`` -> ``--zero_stage 3 --fsdp_offload_params false``."""
    return [x for k, v in values.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


DEFAULT_PORT = 29500  # accelerate's (torch.distributed's) default rendezvous port


def rendezvous_port(dist: dict) -> int:
    """The port rank 0 listens on: ``distributed.main_process_port``, plus k in parallel slot k
    (``hydra/launcher=parallel``: jobs run side by side on one machine, and two launches on one
    port would collide: the second dies, or joins the first's group). On several machines every
    machine must name the same port, so it is used as given."""
    from harness.sweep import ENV_SLOT

    port = int(dist.get("main_process_port") or DEFAULT_PORT)
    slot = os.environ.get(ENV_SLOT)
    if slot and int(dist.get("num_machines") or 1) == 1:
        port += int(slot.split("/")[0])
    return port


def accelerate_flags(dist: dict, train_cfg: dict) -> list[str]:
    """``accelerate launch`` flags for a job (all given explicitly, so a user's accelerate
    default config cannot change what runs)."""
    strategy = dist["strategy"]
    flags = _flags({
        "num_processes": dist["num_processes"],
        "num_machines": dist["num_machines"],
        "machine_rank": dist.get("machine_rank") or 0,
        "main_process_port": rendezvous_port(dist),
        "mixed_precision": "no",  # the Trainer sets bf16 itself from train.precision
        "dynamo_backend": "no",
    })
    if dist.get("main_process_ip"):
        flags += _flags({"main_process_ip": dist["main_process_ip"]})
    if strategy == "ddp":
        flags += ["--multi_gpu"]
    elif strategy == "fsdp":
        fsdp = dist.get("fsdp") or {}
        version = int(fsdp.get("version", 2))
        flags += ["--use_fsdp"] + _flags({
            "fsdp_version": version,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": fsdp.get("state_dict_type", "SHARDED_STATE_DICT"),
            "fsdp_offload_params": bool(fsdp.get("offload_params", False)),
            "fsdp_cpu_ram_efficient_loading": bool(fsdp.get("cpu_ram_efficient_loading", True)),
            "fsdp_sync_module_states": True,
            "fsdp_use_orig_params": True,
            "fsdp_activation_checkpointing": False,
            # FULL_SHARD: FSDP2 reshards after forward; FSDP1 names the strategy
            **({"fsdp_reshard_after_forward": True} if version == 2 else
               {"fsdp_sharding_strategy": "FULL_SHARD", "fsdp_reshard_after_forward": "FULL_SHARD"}),
        })
        if fsdp.get("transformer_layer_cls_to_wrap"):  # default: the model's _no_split_modules
            flags += _flags({"fsdp_transformer_layer_cls_to_wrap": fsdp["transformer_layer_cls_to_wrap"]})
    elif strategy == "zero3":
        zero = dist.get("zero3") or {}
        flags += ["--use_deepspeed"] + _flags({
            "zero_stage": 3,
            "zero3_init_flag": True,
            "zero3_save_16bit_model": True,
            "offload_optimizer_device": zero.get("offload_optimizer_device", "none"),
            "offload_param_device": zero.get("offload_param_device", "none"),
            "gradient_accumulation_steps": int(train_cfg["grad_accum"]),
            # the Trainer fills DeepSpeed's gradient_clipping from max_grad_norm and raises on a
            # config that disagrees: the launch passes the same setting
            "gradient_clipping": float(train_cfg.get("max_grad_norm", 1.0)),
        })
    return flags


def launch_command(job_file: str, cfg: dict, base: bool = False) -> list[str]:
    """The command that runs a job file: plain python for one process (and for the base-model
    evaluation, always single-process), ``accelerate launch`` over N processes otherwise."""
    entry = ["-m", "harness.job", job_file, *(["--base"] if base else [])]
    dist = cfg["distributed"]
    if base or dist["strategy"] == "none":
        return [sys.executable, *entry]
    return [sys.executable, "-m", "accelerate.commands.launch", *accelerate_flags(dist, cfg["train"]), *entry]


def launch_env(cfg: dict, base: bool = False) -> dict[str, str]:
    """The job process's environment: one process = exactly one device (the first visible)."""
    import torch

    env = dict(os.environ)
    if base or cfg["distributed"]["strategy"] == "none":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0].strip() if visible else "0"
    elif not torch.cuda.is_available():
        # processes on CPUs: accelerate's MULTI_CPU (gloo), which it only picks when told
        env["ACCELERATE_USE_CPU"] = "true"
    return env


# ---------------------------------------------------------------- per-rank figures


def device_label(device) -> str:
    """``cuda:<physical id>`` (the id as CUDA_VISIBLE_DEVICES names it) or ``cpu``, with the host."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return f"{socket.gethostname()}/cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    return f"{socket.gethostname()}/cuda:{physical}"


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group).

    The one place that knows the backends: NCCL moves the pickled object through the current
    CUDA device (accelerate set it to LOCAL_RANK), gloo through the CPU.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    if dist.get_backend() == "nccl":
        import torch

        torch.cuda.set_device(local_rank())
    dist.all_gather_object(out, obj)
    return out


def combine(per_rank: list[dict], strategy: str) -> dict:
    """Record metrics from every rank's figures: the peak is the largest rank's, throughput and
    MFU are given in total and per device, devices are the ones used (one per rank)."""
    n = len(per_rank)
    peaks = [r.get("peak_memory_bytes") for r in per_rank]
    reserved = [r.get("peak_memory_reserved_bytes") for r in per_rank]
    out = {
        "world_size": n,
        "strategy": strategy,
        "devices": [r["device"] for r in per_rank],
        "peak_memory_bytes_per_rank": peaks,
        "peak_memory_reserved_bytes_per_rank": reserved,
        "peak_memory_bytes": max((p for p in peaks if p is not None), default=None),
        "peak_memory_reserved_bytes": max((p for p in reserved if p is not None), default=None),
        "eval_peak_memory_bytes_per_rank": [r.get("eval_peak_memory_bytes") for r in per_rank],
        "memory_breakdown_bytes_per_rank": [r.get("memory_breakdown_bytes") for r in per_rank],
        "peak_flops_per_s_per_rank": [r.get("peak_flops_per_s") for r in per_rank],
        # lm-eval's loglikelihood requests each rank scored (DDP splits them; harness.evaluate)
        "eval_requests_per_rank": [r.get("eval_requests") for r in per_rank],
    }
    evals = [p for p in out["eval_peak_memory_bytes_per_rank"] if p is not None]
    if evals:
        out["eval_peak_memory_bytes"] = max(evals)
    # growths over the level at phase start: the largest rank's, as for the peaks
    for growth in ("peak_memory_growth_bytes", "eval_peak_memory_growth_bytes"):
        values = [r.get(growth) for r in per_rank]
        if any(v is not None for v in values):
            out[growth] = max(v for v in values if v is not None)
    return out


def adapter_state_dict(model, strategy: str) -> dict | None:
    """The trainable parameters (the adapter) of a sharded model as whole tensors on rank 0, for
    peft to save; None on the other ranks. Every rank must call it (each gather is a collective).

    Only the adapter's parameters are gathered, never the whole model onto one CPU: FSDP2 from
    their DTensor shards, ZeRO-3 through ``deepspeed.zero.GatheredParameters`` (accelerate's
    ``get_state_dict`` would consolidate every weight, and fails on a PeftModel, which lacks
    DeepSpeed's engine methods).
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    out = {}
    if strategy == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            if is_main():
                out = {name: p.detach().cpu().clone() for name, p in trainable}
        return out if is_main() else None
    from torch.distributed.tensor import DTensor

    for name, p in trainable:
        whole = p.full_tensor() if isinstance(p, DTensor) else p
        if is_main():
            out[name] = whole.detach().cpu()
    return out if is_main() else None
