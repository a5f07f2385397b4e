"""Training through transformers' Trainer: a fixed token budget, seeded, same order for all arms.

The token budget is ``max_steps × batch_size × grad_accum × seq_len`` per process (a data-parallel
job of N processes trains on N times that, a global batch of N × batch_size): every sequence is padded
to ``seq_len`` so every arm of a pair processes exactly the same positions, and the Trainer's
sampler is seeded by ``seed`` (and ``data_seed``) so every arm sees the same examples in the
same order.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import weakref

import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from harness.data import fit_warning, tokenize_examples
from harness.distributed import print0, world_size

CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")


def use_bf16(precision: str) -> bool:
    """bf16 autocast where the GPU runs it natively (precision auto), or when asked."""
    if precision == "auto":
        from harness.measure.environment import gpu_has_native_bf16

        return gpu_has_native_bf16()
    return precision == "bf16"


def inference_precision(precision: str, device) -> tuple:
    """(context, label): the one precision every evaluation and serving measurement of a pair runs
    in, base model included. Where training ran under bf16 autocast (``use_bf16``) it is bf16
    autocast on the device, so full FT's fp32 weights, a bf16 frozen base with fp32 adapters and
    the bf16 base model all run bf16 matmuls, and ``generate`` (which bypasses the autocast
    accelerate wraps around ``forward``) decodes as prefill does; else the weights' own dtype."""
    import contextlib

    import torch

    device = torch.device(device)
    if use_bf16(precision):
        return torch.autocast(device.type, dtype=torch.bfloat16), "bf16 autocast"
    return contextlib.nullcontext(), "weights dtype"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16, AMX; oneDNN's own test). Where it
    does not, bf16 autocast is emulated and many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def token_budget(train_cfg: dict) -> int:
    return int(train_cfg["max_steps"]) * int(train_cfg["batch_size"]) * int(train_cfg["grad_accum"]) * int(
        train_cfg["seq_len"]
    )


class ProgressPrinter(TrainerCallback):
    """Step, loss, elapsed and ETA on the console (readable in logs where tqdm is not): the first
    step, then every max_steps/STEP_LINES steps (every logging step with HARNESS_VERBOSE=1); the
    record keeps every logged loss."""

    STEP_LINES = 5

    def __init__(self, label: str):
        self.label = label
        self.start = None

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs or not state.max_steps:
            return
        from harness import console

        every = max(1, math.ceil(state.max_steps / self.STEP_LINES))
        step = state.global_step
        if not (console.verbose() or step <= 1 or step % every == 0 or step == state.max_steps):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step, 1) * (state.max_steps - step)
        print0(
            f"[{self.label}] step {step}/{state.max_steps} loss {logs['loss']:.4f} "
            f"elapsed {elapsed:.0f}s eta {eta:.0f}s",
        )


def training_arguments(train_cfg: dict, learning_rate: float, seed: int, output_dir: str | None = None,
                       single_device: bool = True) -> TrainingArguments:
    """The Trainer's arguments. Build them before loading the model in a distributed job: that
    starts the process group, puts this process on its own device, and lets transformers load
    the weights the strategy's way (ZeRO-3 partitioned init, FSDP rank-0-only loading).

    ``single_device``: one process trains on one device even when more are visible (transformers
    would otherwise wrap the model in ``DataParallel`` over every visible GPU).
    """
    bf16 = use_bf16(str(train_cfg["precision"]))
    scratch = output_dir is None  # the Trainer needs a folder; nothing is saved there (save_strategy "no")
    output_dir = output_dir or tempfile.mkdtemp(prefix="harness-train-")
    if bf16 and not torch.cuda.is_available() and not cpu_has_native_bf16():
        print0("warning: train.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): emulated, "
               "many times slower than fp32; pass train.precision=fp32 to train in fp32")
    args = TrainingArguments(
        # bf16 autocast on a CPU: transformers refuses bf16 without a GPU unless told it is a CPU run
        use_cpu=bf16 and not torch.cuda.is_available(),
        output_dir=output_dir,
        max_steps=int(train_cfg["max_steps"]),
        per_device_train_batch_size=int(train_cfg["batch_size"]),
        gradient_accumulation_steps=int(train_cfg["grad_accum"]),
        learning_rate=learning_rate,
        lr_scheduler_type=str(train_cfg["lr_scheduler"]),
        lr_scheduler_kwargs=dict(train_cfg.get("lr_scheduler_kwargs") or {}),
        max_grad_norm=float(train_cfg.get("max_grad_norm", 1.0)),
        warmup_steps=int(train_cfg["warmup_steps"]),
        weight_decay=float(train_cfg["weight_decay"]),
        optim=str(train_cfg["optim"]),
        bf16=bf16,
        # activation_checkpointing: the name of gradient_checkpointing since transformers 5
        **{CHECKPOINTING_ARG: train_cfg["gradient_checkpointing"]},
        seed=seed,
        data_seed=seed,
        logging_steps=int(train_cfg["logging_steps"]),
        save_strategy="no",
        report_to=[],
        disable_tqdm=not bool(train_cfg.get("tqdm", False)),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory is for copies to a GPU
        remove_unused_columns=False,
        # real (attention-mask) tokens counted on every rank and summed across ranks by the Trainer;
        # the padded positions follow from the steps (measure.flops.padded_tokens)
        include_num_input_tokens_seen="non_padding",
    )
    if scratch:  # removed with the arguments, or at the process's exit
        weakref.finalize(args, shutil.rmtree, output_dir, ignore_errors=True)
    if single_device and args.n_gpu > 1:
        args._n_gpu = 1  # as Trainer itself does under model parallelism: no DataParallel
    return args


def training_features(examples: list[dict], tokenizer, train_cfg: dict, data_cfg: dict | None = None,
                      label: str = "train") -> tuple[list[dict], dict]:
    """The examples tokenized to fit ``train.seq_len`` as ``data`` says (see ``tokenize_examples``),
    and how many were cut or left out: warned about on the console, returned for the record."""
    seq_len = int(train_cfg["seq_len"])
    features, counts = tokenize_examples(examples, tokenizer, seq_len, data_cfg)
    if warning := fit_warning(counts, seq_len, data_cfg or {}):
        print0(f"[{label}] {warning}")
    return features, counts


def build_trainer(model, tokenizer, features: list[dict], train_cfg: dict, learning_rate: float, seed: int,
                  callbacks: list | None = None, label: str = "train", output_dir: str | None = None,
                  args: TrainingArguments | None = None) -> Trainer:
    """A Trainer over ``features`` (from ``training_features``), repeated in order to fill the budget."""
    seq_len = int(train_cfg["seq_len"])
    dataset = Dataset.from_list(features)
    # sequences the whole job takes, over all data-parallel processes
    n_needed = int(train_cfg["max_steps"]) * int(train_cfg["batch_size"]) * int(train_cfg["grad_accum"]) * world_size()
    if len(dataset) < n_needed:
        # repeat the data (in order) rather than end early: the budget is in steps
        dataset = Dataset.from_list(features * math.ceil(n_needed / len(dataset)))
    if args is None:
        args = training_arguments(train_cfg, learning_rate, seed, output_dir)
    collator = DataCollatorForSeq2Seq(
        tokenizer, padding="max_length", max_length=seq_len, label_pad_token_id=-100, return_tensors="pt"
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[ProgressPrinter(label), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts; ProgressPrinter says it better
    return trainer


def release_optimizer(trainer: Trainer) -> None:
    """Free what only training needs, once it is over: the optimizer with its state (AdamW: two
    moments per trainable weight), the learning-rate schedule and the gradients. The Trainer, its
    callback handler and accelerate each hold a reference; all are dropped, so that evaluation's
    memory holds the model alone. Under DeepSpeed they stay: ZeRO-3's engine, which owns the
    optimizer, also gathers the partitioned weights for every forward.
    """
    if trainer.is_deepspeed_enabled:
        return
    from harness.measure.memory import release_free_memory

    trainer.model.zero_grad(set_to_none=True)
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    trainer.accelerator.free_memory()  # its prepared optimizer, scheduler, model and dataloader
    release_free_memory(trainer.args.device)
