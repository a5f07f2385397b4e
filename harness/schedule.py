"""Check a learning-rate schedule at planning, without the Trainer's imports.

Importing transformers' scheduler code takes seconds (torch and transformers), and every
``harness-run`` plans its jobs in the parent process: a schedule that needs no arguments, given
none, is not built here (the common case stays fast); any other is built on a throwaway optimizer,
so a bad ``train.lr_scheduler`` or ``train.lr_scheduler_kwargs`` fails at planning with one line,
not after the model has loaded.
"""

from __future__ import annotations

# transformers' schedules that build from warm-up and step counts alone
NO_KWARGS = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                       "constant_with_warmup", "inverse_sqrt"})


class ScheduleError(ValueError):
    """A learning-rate schedule the Trainer cannot build (an unknown name, missing or unknown kwargs)."""


def check_schedule(train_cfg: dict) -> None:
    kwargs = dict(train_cfg.get("lr_scheduler_kwargs") or {})
    name = str(train_cfg["lr_scheduler"])
    if name in NO_KWARGS and not kwargs:
        return
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(name, optimizer, num_warmup_steps=int(train_cfg["warmup_steps"]),
                      num_training_steps=int(train_cfg["max_steps"]), scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as exc:
        raise ScheduleError(f"train.lr_scheduler={name} with train.lr_scheduler_kwargs={kwargs}: {exc}") from exc
