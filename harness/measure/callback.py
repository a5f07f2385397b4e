"""``MeasureCallback``: the training-phase probes (peak memory, breakdown step, step times, loss
curve) as a transformers ``TrainerCallback``.

    cb = MeasureCallback(warmup_steps=2)                 # pass to Trainer(callbacks=[cb])
    trainer.train()
    metrics = cb.metrics(train_tokens=padded, real_tokens=non_padding)
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback

from harness.measure.memory import RSS_INTERVAL_S, MemoryBreakdown, PhasePeak, memory_measure, sync


class MeasureCallback(TrainerCallback):
    """Training-phase measurements for a transformers ``Trainer``.

    - peak memory of the training phase (``PhasePeak``): on CUDA ``max_memory_allocated`` /
      ``max_memory_reserved`` after a peak reset at train begin; on CPU the highest RSS of the
      process during training (background sampler + a read at each step end); both absolute
      (the weights count) and as growth over the level at train begin;
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
        self.phase: PhasePeak | None = None
        self.tracker: MemoryBreakdown | None = None
        self.probe_step: int | None = None
        self.step_times: list[tuple[int, float]] = []  # (step index, seconds), probe step excluded
        self.probe_step_s: float | None = None
        self.loss_curve: list[list] = []
        self.breakdown: dict = {}
        self.peak_memory_bytes: int | None = None
        self.peak_memory_reserved_bytes: int | None = None
        self.peak_memory_growth_bytes: int | None = None
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
        self.phase = PhasePeak(self.device, self.rss_interval_s).start()
        self._t_train = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.probe_step:
            self.tracker = MemoryBreakdown(self._model, self._optimizer).start()
        sync(self.device)
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        dt = time.perf_counter() - self._t_step
        step = state.global_step - 1  # the Trainer has already counted this step
        if self.tracker is not None:
            self.breakdown = self.tracker.stop()
            self.tracker = None
            self.probe_step_s = dt
        else:
            self.step_times.append((step, dt))
        if self.phase is not None:
            self.phase.sample()

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
        sync(self.device)
        if self.train_wall_s is None:
            self.train_wall_s = time.perf_counter() - self._t_train
        if self.tracker is not None:  # training stopped inside the probe step
            self.breakdown = self.tracker.stop()
            self.tracker = None
        if self.phase is not None:
            peak = self.phase.stop()
            self.phase = None
            self.peak_memory_bytes, self.peak_memory_growth_bytes = peak["peak"], peak["growth"]
            self.peak_memory_reserved_bytes = peak["reserved"]
        self._model = self._optimizer = None

    def metrics(self, train_tokens: int | None = None, real_tokens: int | None = None) -> dict:
        """Record metrics of the training phase.

        ``train_tokens``: token positions trained on, padding included (``flops.padded_tokens``);
        ``real_tokens``: the non-padding ones (attention-mask sum), by default the Trainer's
        ``num_input_tokens_seen`` (``include_num_input_tokens_seen="non_padding"``, summed over
        ranks). ``tokens_per_s`` and ``real_tokens_per_s`` divide them by the train wall time less
        the breakdown probe's extra time (probe step time minus the median step), reported as
        ``train_wall_excl_probe_s``.
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
        tokens = train_tokens or None
        real = real_tokens if real_tokens is not None else (self.num_input_tokens_seen or None)
        return {
            "memory_device": self.device.type,
            "memory_measure": memory_measure(self.device),
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_growth_bytes": self.peak_memory_growth_bytes,
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
            "train_tokens_real": real,
            "real_tokens_per_s": real / wall_excl if real and wall_excl else None,
            "padding_share": 1 - real / tokens if real and tokens else None,
            "loss_curve": list(self.loss_curve),
        }


# Parameters, FLOPs and MFU
