"""Accuracy through lm-evaluation-harness: MMLU (hub task or a local folder) and in-domain.

lm-eval scores every question (loglikelihood of each answer letter, its default MMLU setup);
the harness keeps its per-question samples and computes from them the overall accuracy (over
questions, which is lm-eval's size-weighted MMLU score), its standard error, and the four
category scores. The same model object that was trained is evaluated, in memory, through
``HFLM`` with a real batch size (HFLM's default of 1 is many times slower).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
from pathlib import Path
from unittest import mock

from harness.data import DEMO_SUBJECT, LETTERS

log = logging.getLogger(__name__)

# lm-eval's MMLU categories per subject (lm_eval/tasks/mmlu/_generate_configs.py)
CATEGORY_NAMES = ("stem", "humanities", "social_sciences", "other")


# Under DDP every rank holds the whole model: lm-eval's own data parallelism splits the questions
# over the ranks (``split_over_ranks``) and gathers the answers to rank 0, instead of every rank
# scoring all of them again. A sharded model (FSDP, ZeRO-3) needs every rank in every forward.
_split = {"on": False, "requests": 0}


@contextlib.contextmanager
def split_over_ranks(on: bool):
    """Within: lm-eval runs share the questions out over the initialised process group. Yields a
    dict whose ``requests`` is this process's count of scored loglikelihood requests at exit."""
    before, _split["on"], _split["requests"] = _split["on"], on, 0
    counted: dict = {}
    try:
        yield counted
    finally:
        counted["requests"], _split["on"] = _split["requests"], before


def _share_out(lm) -> None:
    """HFLM treats a model object as single-process; give it the group's rank, size and gather,
    and count the requests this process scores (the record shows each rank's share)."""
    import torch.distributed as dist
    from accelerate import Accelerator

    if _split["on"] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        lm._rank, lm._world_size, lm.accelerator = dist.get_rank(), dist.get_world_size(), Accelerator()
    score = lm.loglikelihood

    def counted(requests, *args, **kwargs):
        _split["requests"] += len(requests)
        return score(requests, *args, **kwargs)

    lm.loglikelihood = counted


class EvalDataError(ValueError):
    """An evaluation setting that names something that does not exist (a usage error)."""


def mmlu_subjects() -> dict[str, str]:
    from lm_eval.tasks.mmlu._generate_configs import SUBJECTS

    return dict(SUBJECTS)


def _mc_task(name: str, data_files: dict, subject: str, csv_columns: bool) -> dict:
    """An lm-eval multiple-choice task config in MMLU's default format, over local files."""
    if csv_columns:  # the original MMLU release: question,A,B,C,D,answer (no header)
        text = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
        builder, kwargs = "csv", {"data_files": data_files, "column_names": ["question", "A", "B", "C", "D", "answer"]}
    else:  # JSONL rows {question, choices, answer: index}
        text = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
        builder, kwargs = "json", {"data_files": data_files}
    task = {
        "task": name,
        "dataset_path": builder,
        "dataset_kwargs": kwargs,
        "test_split": "test",
        "output_type": "multiple_choice",
        "description": f"The following are multiple choice questions (with answers) about {subject}.\n\n",
        "doc_to_text": text,
        "doc_to_choice": list(LETTERS),
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if "dev" in data_files:
        task["fewshot_split"] = "dev"
        task["fewshot_config"] = {"sampler": "first_n"}
    return task


def mmlu_tasks(mmlu_cfg: dict) -> tuple[list, dict[str, str]]:
    """(lm-eval task list, task name -> subject) for the hub's mmlu or a local release folder."""
    subjects = mmlu_subjects()
    folder = mmlu_cfg.get("dir")
    if not folder:
        return ["mmlu"], {f"mmlu_{s}": s for s in subjects}
    root = Path(str(folder)).expanduser()
    if not (root / "test").is_dir():
        raise EvalDataError(
            f"eval.mmlu.dir={str(folder)!r} is not an MMLU release folder; it needs test/<subject>_test.csv "
            "(and dev/ for few-shot)"
        )
    tasks, names = [], {}
    for subject in sorted(subjects):
        test = root / "test" / f"{subject}_test.csv"
        if not test.exists():
            continue
        files = {"test": str(test.resolve())}
        dev = root / "dev" / f"{subject}_dev.csv"
        if dev.exists():
            files["dev"] = str(dev.resolve())
        name = f"mmlu_local_{subject}"
        tasks.append(_mc_task(name, files, subject.replace("_", " "), csv_columns=True))
        names[name] = subject
    if not tasks:
        raise EvalDataError(f"eval.mmlu.dir={str(folder)!r} has no test/<subject>_test.csv for any MMLU subject")
    return tasks, names


@functools.cache
def _task_manager(include_defaults: bool, include_path: str | None = None):
    from lm_eval.tasks import TaskManager

    # indexing lm-eval's thousands of built-in task files takes tens of seconds on a small
    # CPU: skip it when every task is a config dict of ours (or in include_path), once per process
    return TaskManager(include_defaults=include_defaults, include_path=include_path)


def task_manager_for(eval_cfg: dict):
    """The TaskManager that knows ``eval.tasks``: the user's ``eval.include_path`` alone when it
    has them all (no indexing of lm-eval's registry), else with lm-eval's registry. EvalDataError,
    with the closest names, for a task neither knows."""
    names = list(eval_cfg.get("tasks") or [])
    include = str(Path(str(eval_cfg["include_path"])).expanduser()) if eval_cfg.get("include_path") else None
    if include and not Path(include).is_dir():
        raise EvalDataError(f"eval.include_path={eval_cfg['include_path']!r} is not a folder of lm-eval task YAMLs")
    if include:
        own = _task_manager(False, include)
        if all(n in own.all_tasks for n in names):
            return own
    manager = _task_manager(True, include)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise EvalDataError(f"eval.tasks: {name!r} is not an lm-eval task"
                                + (f"; closest: {', '.join(close)}" if close else "")
                                + ("" if include else " (your own task YAMLs: eval.include_path=<folder>)"))
    return manager


def _sample_score(sample: dict, metrics: list[str]) -> float | None:
    for name in metrics:
        value = sample.get(name)
        if isinstance(value, (bool, int, float)):
            return float(value)
    return None


def evaluate_tasks(model, tokenizer, eval_cfg: dict) -> tuple[dict, list[dict]]:
    """Every task of ``eval.tasks`` through lm-eval: ``{"tasks": {name: {acc, stderr, n, metric}}}``
    and per-sample items (``task`` = the task's name), so gaps are paired as for MMLU. A sample's
    score is its task's first metric (``acc`` for multiple-choice tasks, ``exact_match`` for most
    generative ones); tasks whose samples carry no 0/1 score are left out of the items."""
    names = list(eval_cfg.get("tasks") or [])
    manager = task_manager_for(eval_cfg)
    results = _run(model, tokenizer, names, 0, eval_cfg.get("tasks_limit"), eval_cfg["mmlu"].get("batch_size", 8),
                   task_manager=manager) or {}
    items, per_task = [], {}
    for name, samples in sorted(results.get("samples", {}).items()):
        config = (results.get("configs") or {}).get(name) or {}
        metric_names = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m.get("metric"), str)]
        metric_names = metric_names or ["acc", "exact_match"]
        mine = []
        for s in samples:
            score = _sample_score(s, metric_names)
            if score is None or score not in (0.0, 1.0):
                continue
            mine.append({"task": name, "id": f"{name}/{s['doc_id']}", "target": str(s.get("target")),
                         "correct": score == 1.0})
        acc, se, n = accuracy(mine)
        per_task[name] = {"acc": acc, "stderr": se, "n": n, "metric": metric_names[0]}
        items += mine
    return {"tasks": per_task}, items


def _lm_eval_versions(storage: dict) -> None:
    """lm-eval's ``add_env_info`` without torch's ``collect_env`` (``pip list`` and more: about 2 s
    per call on a small CPU, twice per evaluation); the record's ``env`` holds the versions."""
    from importlib.metadata import version

    storage.update(lm_eval_version=version("lm_eval"), transformers_version=version("transformers"))


def _run(model, tokenizer, tasks: list, num_fewshot: int, limit, batch_size: int, progress: bool = False,
         task_manager=None) -> dict:
    """lm-eval over ``tasks``; ``progress``: show its one bar (the requests), for MMLU's long run."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    from harness import console

    console.quiet()  # lm-eval logs a line per task (57 for MMLU): also when called outside a job
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    _share_out(lm)
    with console.lm_eval_bars(show=progress), mock.patch.object(lm_eval.evaluator, "add_env_info", _lm_eval_versions):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager or _task_manager(any(isinstance(t, str) for t in tasks)),
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=True,
            bootstrap_iters=0,  # the harness computes its own errors from the per-question answers
        )


def _items(results: dict, subject_of: dict[str, str], task_kind: str, categories: dict[str, str]) -> list[dict]:
    items = []
    # lm-eval returns None on processes with LOCAL_RANK > 0 (they ran the same forwards; rank 0 records)
    for name, samples in sorted((results or {}).get("samples", {}).items()):
        if name not in subject_of:
            continue
        subject = subject_of[name]
        for s in samples:
            loglik = [r[0] for r in s["filtered_resps"]]
            pred = max(range(len(loglik)), key=loglik.__getitem__)
            target = int(s["target"]) if str(s["target"]).isdigit() else LETTERS.index(str(s["target"]))
            # MMLU rows have no id of their own: subject + row index; in-domain rows carry one
            item_id = str(s["doc"].get("id") or f"{subject}/{s['doc_id']}")
            items.append({
                "task": task_kind, "id": item_id, "subject": subject,
                "category": categories.get(subject), "pred": pred, "target": target, "correct": pred == target,
            })
    return items


def accuracy(items: list[dict]) -> tuple[float | None, float | None, int]:
    """(mean accuracy, its standard error as lm-eval computes it (sample sd / sqrt n), n)."""
    n = len(items)
    if n == 0:
        return None, None, 0
    acc = sum(it["correct"] for it in items) / n
    se = math.sqrt(acc * (1 - acc) * n / (n - 1) / n) if n > 1 else None
    return acc, se, n


def evaluate_mmlu(model, tokenizer, mmlu_cfg: dict) -> tuple[dict, list[dict]]:
    """MMLU metrics (acc, stderr, n, subset flag, categories) and the per-question items."""
    tasks, subject_of = mmlu_tasks(mmlu_cfg)
    limit = mmlu_cfg.get("limit")
    results = _run(model, tokenizer, tasks, mmlu_cfg.get("num_fewshot", 0), limit, mmlu_cfg.get("batch_size", 16),
                   progress=True)
    categories = mmlu_subjects()
    items = _items(results, subject_of, "mmlu", categories)
    acc, se, n = accuracy(items)
    by_cat = {}
    for cat in CATEGORY_NAMES:
        by_cat[cat] = accuracy([it for it in items if it["category"] == cat])[0]
    metrics = {
        "mmlu_acc": acc, "mmlu_stderr": se, "mmlu_n": n,
        "mmlu_subset": limit is not None or len(subject_of) < len(categories),
        "mmlu_num_fewshot": int(mmlu_cfg.get("num_fewshot", 0)),
        "mmlu_categories": by_cat,
        "mmlu_category_n": {cat: sum(it["category"] == cat for it in items) for cat in CATEGORY_NAMES},
    }
    return metrics, items


def evaluate_indomain(model, tokenizer, heldout_rows: list[dict], indomain_cfg: dict, workdir: str) -> tuple[dict, list[dict]]:
    """Accuracy on the training task's held-out split, in the same prompt format as MMLU."""
    import json

    limit = indomain_cfg.get("limit")
    rows = heldout_rows[: int(limit)] if limit else heldout_rows
    path = Path(workdir) / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subject = rows[0].get("subject", DEMO_SUBJECT) if rows else DEMO_SUBJECT
    task = _mc_task("indomain", {"test": str(path)}, subject, csv_columns=False)
    results = _run(model, tokenizer, [task], 0, None, indomain_cfg.get("batch_size", 16))
    items = _items(results, {"indomain": subject}, "indomain", {})
    acc, se, n = accuracy(items)
    return {"indomain_acc": acc, "indomain_stderr": se, "indomain_n": n}, items


def gains_vs_base(metrics: dict, base_metrics: dict) -> dict:
    """``<task>_gain_vs_base``: the arm's accuracy minus the base model's, where both were scored;
    ``heldout_loss_change_vs_base``: its held-out loss minus the base model's (below 0: learned);
    ``forgetting_loss_delta``: its loss on general text minus the base model's (above 0: forgot)."""
    out = {f"{task}_gain_vs_base": metrics[f"{task}_acc"] - base_metrics[f"{task}_acc"]
           for task in ("mmlu", "indomain")
           if metrics.get(f"{task}_acc") is not None and base_metrics.get(f"{task}_acc") is not None}
    if metrics.get("heldout_loss") is not None and base_metrics.get("heldout_loss") is not None:
        out["heldout_loss_change_vs_base"] = metrics["heldout_loss"] - base_metrics["heldout_loss"]
    for name, task in (metrics.get("tasks") or {}).items():
        base_task = (base_metrics.get("tasks") or {}).get(name) or {}
        if task.get("acc") is not None and base_task.get("acc") is not None:
            task["gain_vs_base"] = task["acc"] - base_task["acc"]
    if metrics.get("forgetting_loss") is not None and base_metrics.get("forgetting_loss") is not None:
        out["forgetting_loss_delta"] = metrics["forgetting_loss"] - base_metrics["forgetting_loss"]
    return out
