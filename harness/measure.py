"""Measurement probes for a training run: memory, time, FLOPs/MFU, cost, serving footprint, latency.

The training-phase probes live in ``MeasureCallback`` (a transformers ``TrainerCallback``); the rest
are plain functions called before or after training. Every function that feeds the run record
returns a dict keyed by the record's metric names, so run.py can ``metrics.update(...)`` them.

    cb = MeasureCallback(warmup_steps=2)                 # pass to Trainer(callbacks=[cb])
    trainer.train()
    metrics = cb.metrics(train_tokens=budget)            # memory, breakdown, time, loss curve
    with eval_peak_memory(device) as eval_mem: ...       # evaluation, measured apart
    metrics.update(param_counts(model), flops_metrics(...), cost_metrics(...),
                   footprint_metrics(model, dtype), compare_latency(model, tok, prompts))

See docs/readme/measure.md for what each metric means and how it is measured.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import TrainerCallback

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "other")
# the CUDA caching allocator hands out blocks in multiples of 512 bytes
_CUDA_BLOCK = 512


def _sync(device: torch.device | str) -> None:
    """Wait for queued kernels so that a clock read measures finished work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------------------------
# Memory: process RSS sampler (CPU) and eval-phase peak
# --------------------------------------------------------------------------------------------


# How often the background thread reads the process's RSS on CPU. Every 5 ms cost the training
# loop about 10% of its throughput on 2 cores (benchmarks/bench_overhead.py); every 50 ms, with a
# reading at each step end as well, still catches the step peaks.
RSS_INTERVAL_S = 0.05


class RSSSampler:
    """Peak resident memory of this process, sampled in a background thread every ``interval_s``.

    ``baseline`` is the RSS when ``start()`` was called; ``peak_delta`` the highest RSS seen since
    minus that baseline. ``sample()`` lets the caller add a reading (e.g. at each step end), so a
    starved thread cannot miss a peak that a step end sees.
    """

    def __init__(self, interval_s: float = RSS_INTERVAL_S):
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        rss = _rss()
        self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> RSSSampler:
        self.baseline = self.peak = _rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; returns ``peak_delta``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        return self.peak_delta

    @property
    def peak_delta(self) -> int:
        return max(self.peak - self.baseline, 0)


@contextmanager
def eval_peak_memory(device: torch.device | str, rss_interval_s: float = RSS_INTERVAL_S) -> Iterator[dict]:
    """Peak memory of the wrapped block (evaluation), apart from the training peak.

    Yields a dict filled on exit with ``eval_peak_memory_bytes``: on CUDA the
    ``max_memory_allocated`` during the block (peak stats reset at entry, so read the training
    peak first: ``MeasureCallback`` does at train end); on CPU the peak RSS during the block minus
    the RSS at entry.
    """
    device = torch.device(device)
    out: dict[str, Any] = {"eval_peak_memory_bytes": None}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield out
        finally:
            _sync(device)
            out["eval_peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        sampler = RSSSampler(rss_interval_s).start()
        try:
            yield out
        finally:
            out["eval_peak_memory_bytes"] = int(sampler.stop())


# --------------------------------------------------------------------------------------------
# Memory breakdown: live-storage accounting for one training step
# --------------------------------------------------------------------------------------------


class MemoryBreakdown(TorchDispatchMode):
    """Which tensors make up the memory peak of a training step, by category.

    Every tensor storage alive during the step is counted once (deduplicated by storage, so views
    and tied weights are not double-counted) under one of ``CATEGORIES``:

    - parameters: storages of the model's parameters (incl. 4-bit quantization state);
    - gradients: ``param.grad`` storages (labelled when autograd accumulates them);
    - optimizer_state: tensors in ``optimizer.state`` (Adam moments, step counters);
    - activations: every other storage allocated during forward and backward (saved
      activations, temporaries, autocast copies, activation gradients, the loss);
    - other: model buffers and temporaries allocated inside ``optimizer.step()``.

    Storages that exist at ``start()`` are registered from the model and optimizer; new ones are
    seen as outputs of aten ops through ``TorchDispatchMode`` and dropped by a weakref callback
    when freed. ``peak_bytes`` is the highest sum of live tracked storages and ``peak_breakdown``
    the per-category split at that moment (so the parts add up to the peak). Tracking runs Python
    on every op, so use it for one step only.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak_bytes = 0
        self.peak_breakdown = dict(self.totals)
        self._live: dict[int, list] = {}  # id(storage) -> [nbytes, category, weakref]
        self._in_optimizer = False
        self._handles: list = []

    # -- accounting ---------------------------------------------------------------------------

    def _note_peak(self) -> None:
        # >= so a relabel at the peak moment (e.g. a fresh grad) updates the snapshot too
        if self.current >= self.peak_bytes:
            self.peak_bytes = self.current
            self.peak_breakdown = dict(self.totals)

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.current -= entry[0]

    def _track(self, t: Any, category: str, relabel: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        t = getattr(t, "_local_tensor", t)  # a sharded DTensor (FSDP2): this rank's shard
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested tensors have no plain storage
            return
        key = id(st)
        entry = self._live.get(key)
        if entry is not None:
            if relabel and entry[1] != category:
                self.totals[entry[1]] -= entry[0]
                self.totals[category] += entry[0]
                entry[1] = category
                self._note_peak()
            return
        nbytes = st.nbytes()
        if nbytes == 0:
            return
        if st.device.type == "cuda":
            nbytes = math.ceil(nbytes / _CUDA_BLOCK) * _CUDA_BLOCK
        ref = weakref.ref(st, lambda _r, key=key: self._freed(key))
        self._live[key] = [nbytes, category, ref]
        self.totals[category] += nbytes
        self.current += nbytes
        self._note_peak()

    def _track_optimizer_state(self, optimizer: Any) -> None:
        # accelerate wraps the torch optimizer; .state forwards, but go to the source
        inner = getattr(optimizer, "optimizer", optimizer)
        for state in inner.state.values():
            for value in state.values():
                self._track(value, "optimizer_state", relabel=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> MemoryBreakdown:
        for p in self.model.parameters():
            self._track(p, "parameters", relabel=True)
            # bitsandbytes 4-bit weights keep absmax/code tensors on a quant_state object
            qs = getattr(p, "quant_state", None)
            for holder in (qs, getattr(qs, "state2", None)):
                for value in vars(holder).values() if holder is not None else ():
                    self._track(value, "parameters", relabel=True)
            if p.grad is not None:
                self._track(p.grad, "gradients", relabel=True)
            if p.requires_grad:
                self._handles.append(
                    p.register_post_accumulate_grad_hook(lambda q: self._track(q.grad, "gradients", relabel=True))
                )
        for b in self.model.buffers():
            self._track(b, "other")
        if self.optimizer is not None:
            self._track_optimizer_state(self.optimizer)

        def pre_step(opt, args, kwargs):
            # FSDP2 sets each sharded .grad after its reduce-scatter, outside autograd's hook
            for p in self.model.parameters():
                if p.grad is not None:
                    self._track(p.grad, "gradients", relabel=True)
            self._track_optimizer_state(opt)
            self._in_optimizer = True

        def post_step(opt, args, kwargs):
            self._in_optimizer = False
            self._track_optimizer_state(opt)  # state created lazily by the first step

        self._handles += [register_optimizer_step_pre_hook(pre_step), register_optimizer_step_post_hook(post_step)]
        self.__enter__()
        return self

    def stop(self) -> dict:
        """Stop tracking; returns ``{"memory_breakdown_bytes", "memory_breakdown_peak_bytes"}``."""
        self.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._live.clear()  # dropping the weakrefs also drops their callbacks
        return {
            "memory_breakdown_bytes": {c: int(self.peak_breakdown[c]) for c in CATEGORIES},
            "memory_breakdown_peak_bytes": int(self.peak_bytes),
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = "other" if self._in_optimizer else "activations"
        for t in tree_leaves(out):
            self._track(t, category)
        return out


# --------------------------------------------------------------------------------------------
# The training callback: memory peak, breakdown step, step times, loss curve
# --------------------------------------------------------------------------------------------


class MeasureCallback(TrainerCallback):
    """Training-phase measurements for a transformers ``Trainer``.

    - peak memory of the training phase: on CUDA ``max_memory_allocated`` /
      ``max_memory_reserved`` after a peak reset at train begin; on CPU the peak RSS during
      training minus the RSS just before it (background sampler + a read at each step end);
    - the memory breakdown (``MemoryBreakdown``) for one step, ``breakdown_step`` (default: the
      first step after ``warmup_steps``; ``None`` disables it); that step is left out of
      the step-time statistics because tracking slows it down;
    - wall time of each optimizer step (``on_step_begin`` to ``on_step_end``, synchronized on
      CUDA), of the whole training, and the loss curve from the Trainer's logs.

    Read everything with ``metrics()`` after ``trainer.train()``.
    """

    def __init__(self, warmup_steps: int = 2, breakdown_step: int | None | str = "auto",
                 rss_interval_s: float = RSS_INTERVAL_S):
        self.warmup_steps = int(warmup_steps)
        self.breakdown_step = breakdown_step
        self.rss_interval_s = rss_interval_s
        self.device = torch.device("cpu")
        self.sampler: RSSSampler | None = None
        self.tracker: MemoryBreakdown | None = None
        self.probe_step: int | None = None
        self.step_times: list[tuple[int, float]] = []  # (step index, seconds), probe step excluded
        self.probe_step_s: float | None = None
        self.loss_curve: list[list] = []
        self.breakdown: dict = {}
        self.peak_memory_bytes: int | None = None
        self.peak_memory_reserved_bytes: int | None = None
        self.train_wall_s: float | None = None
        self.num_input_tokens_seen = 0
        self._model = None
        self._optimizer = None
        self._t_train = 0.0
        self._t_step = 0.0
        self._open = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.device = torch.device(args.device)
        self._model, self._optimizer = model, optimizer
        self._open = True
        if self.breakdown_step is None or model is None:
            self.probe_step = None
        else:
            wanted = self.warmup_steps if self.breakdown_step == "auto" else int(self.breakdown_step)
            # a run shorter than the warm-up still gets a breakdown, on its last step
            self.probe_step = max(0, min(wanted, state.max_steps - 1)) if state.max_steps else wanted
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.sampler = RSSSampler(self.rss_interval_s).start()
        self._t_train = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.probe_step:
            self.tracker = MemoryBreakdown(self._model, self._optimizer).start()
        _sync(self.device)
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        dt = time.perf_counter() - self._t_step
        step = state.global_step - 1  # the Trainer has already counted this step
        if self.tracker is not None:
            self.breakdown = self.tracker.stop()
            self.tracker = None
            self.probe_step_s = dt
        else:
            self.step_times.append((step, dt))
        if self.sampler is not None:
            self.sampler.sample()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss_curve.append([int(state.global_step), float(logs["loss"])])

    def on_train_end(self, args, state, control, **kwargs):
        self.num_input_tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.close()

    def close(self) -> None:
        """Stop the breakdown tracker and RSS sampler and read the peaks; idempotent.

        ``on_train_end`` calls it. Call it yourself in a ``finally`` when training can raise
        (OOM): an exception inside the tracked step would otherwise leave the dispatch mode
        active, slowing every later op, and the partial peaks are still worth recording.
        """
        if not self._open:
            return  # already closed, or training never began
        self._open = False
        _sync(self.device)
        if self.train_wall_s is None:
            self.train_wall_s = time.perf_counter() - self._t_train
        if self.tracker is not None:  # training stopped inside the probe step
            self.breakdown = self.tracker.stop()
            self.tracker = None
        if self.device.type == "cuda":
            self.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.peak_memory_reserved_bytes = int(torch.cuda.max_memory_reserved(self.device))
        elif self.sampler is not None:
            self.peak_memory_bytes = int(self.sampler.stop())
            self.sampler = None
        self._model = self._optimizer = None

    def metrics(self, train_tokens: int | None = None) -> dict:
        """Record metrics of the training phase.

        ``train_tokens``: tokens trained on (all processed positions); defaults to the Trainer's
        ``num_input_tokens_seen`` when that was counted. ``tokens_per_s`` divides it by the train
        wall time less the breakdown probe's extra time (probe step time minus the median step),
        reported as ``train_wall_excl_probe_s``.
        """
        timed = [dt for step, dt in self.step_times if step >= self.warmup_steps]
        median = statistics.median(timed) if timed else None
        overhead = None
        if self.probe_step_s is not None:
            typical = (
                median
                if median is not None
                else (statistics.median(dt for _, dt in self.step_times) if self.step_times else 0.0)
            )
            overhead = max(self.probe_step_s - typical, 0.0)
        wall = self.train_wall_s
        wall_excl = wall - (overhead or 0.0) if wall is not None else None
        tokens = train_tokens if train_tokens is not None else (self.num_input_tokens_seen or None)
        return {
            "memory_device": self.device.type,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_reserved_bytes": self.peak_memory_reserved_bytes,
            "memory_breakdown_bytes": self.breakdown.get("memory_breakdown_bytes"),
            "memory_breakdown_peak_bytes": self.breakdown.get("memory_breakdown_peak_bytes"),
            "memory_breakdown_step": self.probe_step if self.breakdown else None,
            "memory_breakdown_overhead_s": overhead,
            "train_wall_s": wall,
            "train_wall_excl_probe_s": wall_excl,
            "step_times_s": [dt for _, dt in self.step_times],
            "step_time_median_s": median,
            "train_tokens": tokens,
            "tokens_per_s": tokens / wall_excl if tokens and wall_excl else None,
            "loss_curve": list(self.loss_curve),
        }


# --------------------------------------------------------------------------------------------
# Parameters, FLOPs and MFU
# --------------------------------------------------------------------------------------------


def param_counts(model: torch.nn.Module) -> dict:
    """Trainable and total parameters as peft prints them.

    PEFT models: ``model.get_nb_trainable_parameters()`` (counts a 4-bit packed weight as its
    unpacked size). Other models: ``requires_grad`` parameters over all parameters.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": trainable / total if total else None,
    }


def embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the input embedding when it is a lookup table apart from the output layer.

    A lookup costs no FLOPs, so ``flops_per_token`` subtracts it. Tied embeddings (same storage
    as the output projection) do a matmul in the output layer and stay counted: returns 0.
    """
    try:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return 0
    if emb is None or getattr(emb, "weight", None) is None:
        return 0
    w_out = getattr(out, "weight", None) if out is not None else None
    if w_out is not None and w_out.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr():
        return 0
    return int(emb.weight.numel())


def flops_per_token(
    method: str,
    total_params: int,
    trainable_params: int,
    *,
    embedding_params: int = 0,
    n_layers: int = 0,
    seq_len: int = 0,
    hidden_size: int = 0,
) -> float:
    """Training FLOPs per token (multiply-add = 2 FLOPs), the dense-matmul estimate.

    With N = total_params - embedding_params (the weights that take part in a matmul, adapters
    included) and N_t = trainable_params:

    - forward:                          2·N   (every weight does one multiply-add per token)
    - backward, input gradients:        2·N   (dL/dx through every layer, frozen or not)
    - backward, weight gradients:       2·N_t (dL/dW only for trainable weights)

    so FLOPs/token = 4·N + 2·N_t. Full fine-tuning (N_t = N) gives the familiar 6·N; LoRA and
    QLoRA (N_t = adapter params, a small share) give ≈ 4·N + 2·N_adapter, about 2/3 of full FT.
    The adapter's own forward and input-gradient FLOPs are inside N because its parameters are
    counted in total_params. QLoRA counts its 4-bit base weights at their unpacked size
    (dequantization is not counted). Gradient checkpointing recomputes the forward (+2·N) but
    that is hardware work, not model work, so it is not counted (MFU convention).

    Attention score FLOPs (QKᵀ and AV, no weights) are added when ``n_layers``, ``seq_len`` and
    ``hidden_size`` are given: 2·2·n_layers·seq_len·hidden_size per token forward (upper bound:
    causal masking is not discounted), and twice that backward (input gradients only), i.e.
    12·n_layers·seq_len·hidden_size, the same for every method.
    """
    if method == "base":
        raise ValueError("method 'base' does not train; flops_per_token is for full, lora, qlora or other PEFT")
    if trainable_params > total_params or trainable_params < 0:
        raise ValueError(f"trainable_params {trainable_params} must be between 0 and total_params {total_params}")
    n = total_params - embedding_params
    n_t = min(trainable_params, n)
    attention = 12 * n_layers * seq_len * hidden_size
    return float(4 * n + 2 * n_t + attention)


def measure_peak_flops(
    device: torch.device | str, dtype: torch.dtype, size: int | None = None, reps: int | None = None, warmup: int = 2
) -> float:
    """Achievable dense-matmul FLOP/s of one device in ``dtype``: a timed ``size``×``size`` product.

    Defaults: 2048 on CPU, 8192 on CUDA. Each of ``reps`` trials times a batch of products (1 on
    CPU, 10 on CUDA, synchronized) after ``warmup`` untimed ones; the fastest trial counts.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = size or (8192 if cuda else 2048)
    reps = reps or (5 if cuda else 3)
    inner = 10 if cuda else 1
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * inner / best


def flops_metrics(
    flops_per_token: float, tokens_per_s: float | None, peak_flops_per_s: float | None, device_count: int = 1
) -> dict:
    """achieved = flops_per_token × tokens_per_s (all devices); mfu = achieved / (peak × devices)."""
    achieved = flops_per_token * tokens_per_s if tokens_per_s else None
    mfu = achieved / (peak_flops_per_s * device_count) if achieved and peak_flops_per_s else None
    return {
        "flops_per_token": flops_per_token,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_flops_per_s,
        "mfu": mfu,
    }


# --------------------------------------------------------------------------------------------
# Cost: the hardware price table
# --------------------------------------------------------------------------------------------


class PriceTableError(ValueError):
    """A hardware price file that is missing a field or has an invalid price."""


def _validate_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict):
        raise PriceTableError(f"{where}: expected a mapping with name, price_per_device_hour_usd, ...")
    price = entry.get("price_per_device_hour_usd")
    if price is None:
        raise PriceTableError(
            f"{where}: price_per_device_hour_usd is missing; set a positive USD price per device-hour"
        )
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not price > 0:
        raise PriceTableError(f"{where}: price_per_device_hour_usd {price!r} is not a positive number of USD")
    for field in ("name", "price_source", "price_date"):
        if not entry.get(field):
            raise PriceTableError(f"{where}: {field} is missing")
    match = entry.get("match", [])
    match = [match] if isinstance(match, str) else list(match or [])
    if not all(isinstance(m, str) and m for m in match):
        raise PriceTableError(f"{where}: match {entry.get('match')!r} must be a list of device-name substrings")
    return {**entry, "price_per_device_hour_usd": float(price), "price_date": str(entry["price_date"]), "match": match}


def load_price_table(conf_dir: str | Path) -> dict[str, dict]:
    """Hardware entries from ``<conf_dir>/hardware/*.yaml`` keyed by name (``auto.yaml`` skipped).

    Raises ``PriceTableError`` (one line naming the file) for a missing or non-positive price,
    or a missing name / price_source / price_date.
    """
    hw_dir = Path(conf_dir) / "hardware"
    if not hw_dir.is_dir():
        raise PriceTableError(f"{hw_dir}: no hardware price folder")
    table: dict[str, dict] = {}
    for path in sorted(hw_dir.glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise PriceTableError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if isinstance(raw, dict) and raw.get("name") == "auto":
            continue
        entry = _validate_entry(raw, str(path))
        table[entry["name"]] = entry
    return table


def device_name() -> str:
    """``torch.cuda.get_device_name(0)``, or "cpu" without CUDA."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def detect_hardware(table: dict[str, dict], name: str | None = None) -> dict | None:
    """The entry whose ``match`` substring (case-insensitive, longest wins) is in the device name.

    ``name`` defaults to ``device_name()``; None when no entry matches (an unknown GPU).
    """
    name = (name or device_name()).lower()
    best, best_len = None, 0
    for entry in table.values():
        for m in entry["match"]:
            if m.lower() in name and len(m) > best_len:
                best, best_len = entry, len(m)
    return best


def resolve_hardware(hardware_cfg: dict, table: dict[str, dict]) -> dict | None:
    """The price entry for a run's ``config["hardware"]``.

    ``name: auto`` detects the device (None for an unknown GPU: cost is then not measured); any
    other name uses the config's own fields (so shell overrides such as
    ``hardware.price_per_device_hour_usd=2.1`` apply), validated like a price file.
    """
    name = hardware_cfg.get("name")
    if name == "auto":
        return detect_hardware(table)
    if name not in table and "price_per_device_hour_usd" not in hardware_cfg:
        raise PriceTableError(f"hardware {name!r} is not in the price table; valid: auto, {', '.join(sorted(table))}")
    return _validate_entry({**table.get(name, {}), **hardware_cfg}, f"hardware {name!r}")


def cost_usd(seconds: float, price_per_hour: float, device_count: int = 1) -> float:
    """hours × price per device-hour × devices."""
    return seconds / 3600.0 * price_per_hour * device_count


def projected_cost(tokens: int, epochs: float, tokens_per_s: float, price: float, device_count: int = 1) -> dict:
    """Projected wall time and cost to train ``epochs`` passes over ``tokens`` at the measured rate."""
    projected_tokens = tokens * epochs
    wall_h = projected_tokens / tokens_per_s / 3600.0
    return {
        "projected_tokens": projected_tokens,
        "projected_wall_h": wall_h,
        "projected_cost_usd": wall_h * price * device_count,
    }


def cost_metrics(
    entry: dict | None,
    seconds: float | None,
    device_count: int = 1,
    dataset_tokens: int | None = None,
    epochs: float = 1.0,
    tokens_per_s: float | None = None,
) -> dict:
    """Cost fields of the record; all None when the hardware is unknown (entry None)."""
    out: dict[str, Any] = {
        "hardware": entry["name"] if entry else None,
        "price_per_device_hour_usd": entry["price_per_device_hour_usd"] if entry else None,
        "price_source": entry["price_source"] if entry else None,
        "price_date": entry["price_date"] if entry else None,
        "device_count": device_count,
        "cost_usd": cost_usd(seconds, entry["price_per_device_hour_usd"], device_count)
        if entry and seconds is not None
        else None,
        "projected_tokens": None,
        "projected_wall_h": None,
        "projected_cost_usd": None,
    }
    if entry and dataset_tokens and tokens_per_s:
        out.update(
            projected_cost(dataset_tokens, epochs, tokens_per_s, entry["price_per_device_hour_usd"], device_count)
        )
    return out


# --------------------------------------------------------------------------------------------
# Serving footprint
# --------------------------------------------------------------------------------------------


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_nb_trainable_parameters")


def adapter_bytes(model: torch.nn.Module, state_dict: dict | None = None) -> int | None:
    """Bytes on disk of the saved adapter (``save_pretrained`` with safetensors); None if not PEFT.

    ``state_dict``: the full (gathered) state dict of a sharded model, from which peft saves.
    """
    if not _is_peft(model):
        return None
    with tempfile.TemporaryDirectory(prefix="harness-adapter-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        # several adapters are saved in sub-folders, one adapter_model.safetensors each
        return sum(p.stat().st_size for p in Path(tmp).rglob("adapter_model*.safetensors"))


def full_checkpoint_bytes(n_params: int, dtype: torch.dtype, saved_bytes: int | None = None) -> tuple[int, bool]:
    """(bytes, estimated): the saved size when given, else n_params × bytes per element of dtype."""
    if saved_bytes is not None:
        return int(saved_bytes), False
    return int(n_params) * dtype.itemsize, True


def footprint_metrics(model: torch.nn.Module, dtype: torch.dtype, saved_full_bytes: int | None = None,
                      state_dict: dict | None = None) -> dict:
    """adapter_bytes, full_checkpoint_bytes and full_checkpoint_bytes_estimated for the record.

    The full checkpoint is what serving a fully fine-tuned (or merged) model stores: the base
    model's parameters (adapter parameters excluded) in ``dtype``, the compute/save dtype
    (for QLoRA the merged model is saved in its compute dtype, not 4-bit).
    """
    counts = param_counts(model)
    n = counts["total_params"] - (counts["trainable_params"] if _is_peft(model) else 0)
    full, estimated = full_checkpoint_bytes(n, dtype, saved_full_bytes)
    return {
        "adapter_bytes": adapter_bytes(model, state_dict),
        "full_checkpoint_bytes": full,
        "full_checkpoint_bytes_estimated": estimated,
    }


# --------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, prompts: Sequence, device: torch.device) -> list[torch.Tensor]:
    # without a tokenizer, prompts are token-id lists
    if tokenizer is None:
        return [torch.tensor([list(p)], dtype=torch.long, device=device) for p in prompts]
    return [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in prompts]


def _time_model(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence, n_warmup: int, n_reps: int, gen_tokens: int
) -> tuple[list[float], int, float]:
    """Raw timings: (forward seconds per prompt pass, generated tokens, generation seconds)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            inputs = _encode(tokenizer, prompts, device)
            for _ in range(n_warmup):
                for ids in inputs:
                    model(input_ids=ids)
            times = []
            for _ in range(n_reps):
                for ids in inputs:
                    _sync(device)
                    t0 = time.perf_counter()
                    model(input_ids=ids)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
            if gen_tokens <= 0:
                return times, 0, 0.0
            pad = getattr(tokenizer, "pad_token_id", None)
            if pad is None:
                pad = getattr(tokenizer, "eos_token_id", None)
            # min_new_tokens: an early EOS must not shorten the count
            kw = {
                "max_new_tokens": gen_tokens,
                "min_new_tokens": gen_tokens,
                "do_sample": False,
                "pad_token_id": pad if pad is not None else 0,
            }
            for ids in inputs[: 1 if n_warmup else 0]:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n_reps):
                for ids in inputs:
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            _sync(device)
            return times, n_reps * len(inputs) * gen_tokens, time.perf_counter() - t0
    finally:
        model.train(was_training)


def latency_probe(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence, n_warmup: int = 2, n_reps: int = 10, gen_tokens: int = 16
) -> dict:
    """Median forward latency (ms) of one prompt, and greedy-generation tokens/s.

    Each prompt runs alone (batch 1, a serving request). ``forward_ms`` is the median over
    ``n_reps`` × prompts forward passes after ``n_warmup`` rounds; ``gen_tokens_per_s`` is
    ``n_reps`` × prompts × ``gen_tokens`` new tokens (``min_new_tokens`` forces the count) over
    their total time (None when ``gen_tokens`` is 0). Eval mode, ``torch.inference_mode``,
    synchronized on CUDA. ``prompts`` are strings for ``tokenizer``, or token-id lists when
    ``tokenizer`` is None.
    """
    times, n_gen, gen_s = _time_model(model, tokenizer, prompts, n_warmup, n_reps, gen_tokens)
    return {"forward_ms": statistics.median(times) * 1000.0, "gen_tokens_per_s": n_gen / gen_s if n_gen else None}


def compare_latency(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence,
    n_warmup: int = 2,
    n_reps: int = 10,
    gen_tokens: int = 16,
    rounds: int = 2,
) -> dict:
    """Latency of the base model, the unmerged adapter and the merged adapter, same prompts.

    PEFT (LoRA-style) models: base with ``model.disable_adapter()``, dynamic as is, merged after
    ``merge_adapter()`` (then ``unmerge_adapter()`` restores the model). The three variants are
    interleaved in ``rounds`` rounds of ``n_reps / rounds`` repetitions each, so a slow spell of
    the machine hits all of them; medians and rates pool the rounds. Call it after evaluation:
    with 4-bit base weights merging re-quantizes, so unmerge is not bit-exact.
    Other models (full fine-tuning): the model is its own base, merged and dynamic; measured
    once, overheads 0. Overheads are fractions: variant_ms / base_ms - 1.
    """
    if not (_is_peft(model) and hasattr(model, "merge_adapter")):
        m = latency_probe(model, tokenizer, prompts, n_warmup, n_reps, gen_tokens)
        base = dynamic = merged = m
    else:
        per_round = max(1, math.ceil(n_reps / rounds))
        raw: dict[str, list] = {v: [[], 0, 0.0] for v in ("base", "dynamic", "merged")}

        def add(variant: str) -> None:
            times, n_gen, gen_s = _time_model(model, tokenizer, prompts, n_warmup, per_round, gen_tokens)
            acc = raw[variant]
            acc[0] += times
            acc[1] += n_gen
            acc[2] += gen_s

        for _ in range(rounds):
            with model.disable_adapter():
                add("base")
            add("dynamic")
            model.merge_adapter()
            try:
                add("merged")
            finally:
                model.unmerge_adapter()
        base, dynamic, merged = (
            {"forward_ms": statistics.median(t) * 1000.0, "gen_tokens_per_s": n / s if n else None}
            for t, n, s in (raw["base"], raw["dynamic"], raw["merged"])
        )
    return {
        "latency_base_ms": base["forward_ms"],
        "latency_dynamic_ms": dynamic["forward_ms"],
        "latency_merged_ms": merged["forward_ms"],
        "gen_tokens_per_s_base": base["gen_tokens_per_s"],
        "gen_tokens_per_s_dynamic": dynamic["gen_tokens_per_s"],
        "gen_tokens_per_s_merged": merged["gen_tokens_per_s"],
        "latency_dynamic_overhead": dynamic["forward_ms"] / base["forward_ms"] - 1.0,
        "latency_merged_overhead": merged["forward_ms"] / base["forward_ms"] - 1.0,
    }
