"""What a run prints: the harness's own lines (one per phase, the step lines, one MMLU progress
bar) and none of the stack's known noise. ``HARNESS_VERBOSE=1`` brings all of it back.

The noise, each silenced here at its source, once per process (``quiet()``):
- per-file and per-split bars of datasets and transformers ("Generating test split", "Loading
  weights"), and lm-eval's bar per task while it builds requests (57 for MMLU);
- lm-eval's ``git describe`` in the working folder ("fatal: not a git repository" outside one);
- deprecation FutureWarnings of the stack and peft's 4-bit merge rounding notices (the latency
  probe merges on purpose; the record says what was measured);
- bitsandbytes' notice that it runs its CPU kernels, and lm-eval's line per task;
- DeepSpeed's warning that it found no GPU ("Setting accelerator to CPU"), where it is installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import warnings

VERBOSE_ENV = "HARNESS_VERBOSE"

# (category, message regex) of warnings that say nothing about this run's figures
NOISY_WARNINGS = (
    (FutureWarning, ""),
    (UserWarning, r".*pin_memory.*"),
    (UserWarning, r"(Merge|Unmerge) lora module to 4-bit linear"),
    (UserWarning, r".*torch.utils.checkpoint: the use_reentrant parameter.*"),
)
NOISY_LOGGERS = ("bitsandbytes", "lm_eval", "datasets", "transformers", "accelerate")


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0", "false")


def quiet() -> None:
    """Silence the known noise in this process and the processes it starts (a no-op when verbose)."""
    if verbose():
        return
    # read when datasets / transformers / huggingface_hub are imported, here or in a child process
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed sets its own logger's level when imported (after this): a filter stays
    if not any(isinstance(f, _ErrorsOnly) for f in logging.getLogger("DeepSpeed").filters):
        logging.getLogger("DeepSpeed").addFilter(_ErrorsOnly())
    if "datasets" in sys.modules:  # imported before the variables were set
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
        sys.modules["transformers"].utils.logging.set_verbosity_error()


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2 h 05 min``: a wall time for a progress line."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def _git_hash_quietly() -> str | None:
    """lm-eval's ``get_git_commit_hash`` without git's complaint outside a repository."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def lm_eval_bars(show: bool):
    """While lm-eval runs: at most one bar (its requests), none per task; ``show=False``: none."""
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface
    from tqdm import tqdm

    if verbose():
        yield
        return
    def hidden(*args, **kwargs):  # lm-eval passes disable= itself: override it
        return tqdm(*args, **{**kwargs, "disable": True})

    patched = [(lm_eval.api.task, "tqdm", hidden), (lm_eval.api.model, "tqdm", hidden),
               (lm_eval.evaluator, "get_git_commit_hash", _git_hash_quietly)]
    if not show:
        patched.append((lm_eval.models.huggingface, "tqdm", hidden))
    saved = [(module, name, getattr(module, name)) for module, name, _ in patched]
    try:
        for module, name, value in patched:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
