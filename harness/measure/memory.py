"""Memory probes: the peak of a phase (training, evaluation) in the device's measure
(``PhasePeak``: CUDA allocated bytes, or the process RSS on a CPU), and the per-category breakdown
of one training step (``MemoryBreakdown``)."""

from __future__ import annotations

import ctypes
import gc
import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "other")
# the CUDA caching allocator hands out blocks in multiples of 512 bytes
_CUDA_BLOCK = 512


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels so that a clock read measures finished work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    return psutil.Process().memory_info().rss


# What each device's memory figures are (the record's ``memory_measure``): bytes handed out by
# torch's CUDA caching allocator, or the resident set of the whole process on a CPU.
MEASURES = {"cuda": "CUDA allocated", "cpu": "CPU RSS"}


def memory_measure(device: torch.device | str) -> str:
    return MEASURES["cuda" if torch.device(device).type == "cuda" else "cpu"]


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory(device: torch.device | str) -> None:
    """Give back memory that nothing references any more, before a phase's peak is measured.

    Python garbage is collected; on a CPU, glibc is asked to return the free heap it holds
    (``malloc_trim``): it keeps freed blocks, so the RSS at the start of a phase would still hold
    what an earlier phase freed (loading QLoRA frees the fp32 weights it quantized: about 700 MiB
    of RSS on SmolLM2-135M). On CUDA the caching allocator's free blocks are released, which
    ``max_memory_allocated`` never counts but ``max_memory_reserved`` would.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    elif _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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


class PhasePeak:
    """Peak memory of one phase (training or evaluation) in the device's measure.

    ``start()`` gives back free memory (``release_free_memory``) and reads the starting level;
    ``stop()`` returns the phase's absolute peak, its growth over the starting level, and on CUDA
    the peak the caching allocator reserved:

    - CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` (weights and every tensor
      alive on the device count); growth = peak - ``memory_allocated`` at start.
    - CPU: the highest RSS of the process (``RSSSampler``: a background thread, plus ``sample()``
      at step ends); growth = peak - RSS at start.
    """

    def __init__(self, device: torch.device | str, rss_interval_s: float = RSS_INTERVAL_S):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rss_interval_s = rss_interval_s
        self.sampler: RSSSampler | None = None
        self.baseline = 0

    def start(self) -> PhasePeak:
        release_free_memory(self.device)
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = int(torch.cuda.memory_allocated(self.device))
        else:
            self.sampler = RSSSampler(self.rss_interval_s).start()
            self.baseline = self.sampler.baseline
        return self

    def sample(self) -> None:
        if self.sampler is not None:
            self.sampler.sample()

    def stop(self) -> dict:
        """``{"peak", "growth", "reserved"}`` in bytes (``reserved`` None on a CPU)."""
        sync(self.device)
        if self.cuda:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            reserved = int(torch.cuda.max_memory_reserved(self.device))
        else:
            self.sampler.stop()
            peak, reserved = int(self.sampler.peak), None
        return {"peak": peak, "growth": max(peak - self.baseline, 0), "reserved": reserved}


@contextmanager
def eval_peak_memory(device: torch.device | str, rss_interval_s: float = RSS_INTERVAL_S) -> Iterator[dict]:
    """Peak memory of the wrapped block (evaluation), apart from the training peak.

    Yields a dict filled on exit with ``eval_peak_memory_bytes`` (the absolute peak) and
    ``eval_peak_memory_growth_bytes`` (over the level at entry), in the measure of ``PhasePeak``.
    On CUDA the peak stats are reset at entry, so read the training peak first
    (``MeasureCallback`` does at train end).
    """
    out: dict[str, Any] = {"eval_peak_memory_bytes": None, "eval_peak_memory_growth_bytes": None}
    phase = PhasePeak(device, rss_interval_s).start()
    try:
        yield out
    finally:
        peak = phase.stop()
        out.update(eval_peak_memory_bytes=peak["peak"], eval_peak_memory_growth_bytes=peak["growth"])


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


# The training callback: memory peak, breakdown step, step times, loss curve
