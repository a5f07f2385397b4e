"""What makes two runs the same run, a fair pair, and one comparison group (the one place).

Every stage asks this module: ``run.plan`` (config_hash, run_id, pair_key, base_key), the gap
statistics and the gate (comparison groups), and the report (tables and their arms).

    result config   the resolved config without what cannot change a result (NON_RESULT_KEYS at
                    the top level, NON_RESULT_PATHS inside groups): results/report paths, force,
                    isolate, report, prices and their source, latency-probe settings, progress bars
    config_hash     hash of the result config: equal hash, same run (skip-on-rerun, run_id)
    pair_key        hash of the result config without ``method``: model, data, seed, training
                    budget and schedule, eval settings, hardware, distributed strategy and world
                    size. Arms with equal pair_key are a fair pair: same examples, same order,
                    same questions, same devices.
    setting_key     pair_key without the seed: one report table (its arms are compared there);
                    table_key names it (model, data, hardware, setting_key)
    base_key        the base model's evaluation: model, eval, held-out data, hardware, precision
    arm             the method and every setting of it (name, rank, alpha, learning rate, target
                    modules, ...): a learning-rate or alpha sweep of one method is several arms
    group_key       setting_key + arm: one comparison group. Its runs differ only in the seed,
                    so they are pooled as seeds; nothing else is.

A PEFT arm's gap is taken against the full fine-tuning run of the same pair_key. Several full
runs (e.g. a full-FT learning-rate sweep) under one pair_key make that reference ambiguous;
``full_references`` reports it rather than picking one, unless the caller names the reference.

A setting added to a config group after runs exist goes into NEUTRAL_DEFAULTS with the value that
reproduces the old behaviour, so adding it changes no existing run id, pair or baseline group.

Top-level keys that steer the harness without changing a result (a launcher, a thread budget, a
lock timeout) go into NON_RESULT_KEYS, and only here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.data.shapes import FIELDS
from harness.records import run_id_for, stable_hash

# Top-level config keys that steer the harness but do not change a result.
NON_RESULT_KEYS = ("hydra", "results_dir", "reports_dir", "force", "isolate", "report", "projected_tokens", "parallel",
                   "verdict", "tune",  # tune: how a job's rate was chosen; the rate itself is a method setting
                   "tracking")  # tracking: where results are also sent (harness.tracking)
# Settings inside config groups that do not change a result.
NON_RESULT_PATHS = (
    ("eval", "latency"),  # the latency probe runs after evaluation and changes no accuracy or training figure
    ("eval", "variants"),  # so does serving N variants (harness.measure.variants)
    ("method", "lr_grid"),  # the rates tune=lr tries; each run's own is method.learning_rate
    ("hardware", "price_per_device_hour_usd"),
    ("hardware", "price_source"),
    ("hardware", "price_date"),
    ("hardware", "match"),
    ("hardware", "price_per_core_hour_usd"),  # how a preset is priced and detected, and its datasheet peak,
    ("hardware", "exclude"),                  # none of which changes what a run trains or measures
    ("hardware", "memory_gib"),
    ("hardware", "datasheet_bf16_dense_tflops"),
    ("hardware", "datasheet_source"),
    ("hardware", "price_warning"),
    ("train", "tqdm"),
    ("distributed", "main_process_ip"),  # where the processes meet, not how many or how they split the work
    ("distributed", "main_process_port"),
    ("distributed", "machine_rank"),  # differs per machine of one multi-node job
)
# Settings added after records and the committed baseline existed: at their neutral value (the
# library default they always had) they stay out of every hash, so older runs keep their identity;
# set to anything else they enter it.
NEUTRAL_DEFAULTS = (
    (("train", "max_grad_norm"), 1.0),  # the Trainer's default clipping norm
    (("train", "lr_scheduler_kwargs"), {}),
    # how rows are rendered and masked: multiple-choice rows (the demo, ci-smoke) ignore the first two
    (("data", "chat_template"), "auto"),
    (("data", "loss_on"), "assistant"),
    (("data", "columns"), {f: None for f in FIELDS}),  # every field at its own name
    (("data", "heldout_fraction"), 0),
    (("data", "validation_path"), None),  # no validation split: the data every earlier run had
    (("data", "validation_fraction"), 0),
    (("data", "n_validation"), 0),
    (("data", "config_name"), None),
    (("data", "split"), None),
    (("eval", "tasks"), []),
    (("eval", "include_path"), None),
    (("eval", "tasks_limit"), None),
    (("eval", "forgetting"), {"enabled": True, "path": None, "max_tokens": 2048, "chunk_tokens": 128}),
)
# Method settings an arm label can show, with their short names (e.g. "lora r16 lr 0.001")
ARM_LABEL_FIELDS = (("learning_rate", "lr"), ("alpha", "alpha"), ("target_modules", "targets"), ("dropout", "dropout"))


# how a method reads in tables, plots and the plan line
METHOD_LABEL = {"base": "base model", "full": "full FT", "lora": "LoRA", "qlora": "QLoRA"}


def arm_label(method: str, rank: int | None) -> str:
    """``full FT``, ``LoRA r=16``: an arm by its method and rank."""
    label = METHOD_LABEL.get(method, method)
    return f"{label} r={rank}" if rank is not None else label


def result_config(cfg: dict) -> dict:
    """``cfg`` without what does not change a result (a copy; ``cfg`` is left as it is)."""
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in NON_RESULT_KEYS}
    for path in NON_RESULT_PATHS:
        _drop(out, path)
    for path, neutral in NEUTRAL_DEFAULTS:
        _drop(out, path, only_if=neutral)
    return out


_ANY = object()


def _drop(cfg: dict, path: tuple[str, ...], only_if: Any = _ANY) -> None:
    node = cfg
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] in node and (only_if is _ANY or node[path[-1]] == only_if):
        del node[path[-1]]


def config_hash(cfg: dict) -> str:
    return stable_hash(result_config(cfg))


def pair_config(cfg: dict) -> dict:
    return {k: v for k, v in result_config(cfg).items() if k != "method"}


def pair_key(cfg: dict) -> str:
    return stable_hash(pair_config(cfg))


def setting_config(cfg: dict) -> dict:
    """What one report table shares: the pair config without the seed."""
    return {k: v for k, v in pair_config(cfg).items() if k != "seed"}


def setting_key(cfg: dict) -> str:
    return stable_hash(setting_config(cfg))


def base_key(cfg: dict) -> str:
    """The base model's evaluation, shared by all seeds and arms: the model (``model.dtype``
    included), eval settings, the held-out data, and what it runs on and in: the hardware (its
    name as planned: ``hardware=auto`` is resolved to the detected device's entry, or
    "unpriced (<device name>)", before this is asked) and ``train.precision``. A base evaluated
    on a CPU in fp32 is not the base of a GPU run in bf16."""
    result = result_config(cfg)
    hardware = result.get("hardware")
    return stable_hash({"model": result.get("model"), "eval": result.get("eval"), "data": result.get("data"),
                        "hardware": hardware.get("name") if isinstance(hardware, dict) else hardware,
                        "precision": (result.get("train") or {}).get("precision")})


def run_id(method: str, rank: int | None, cfg: dict) -> str:
    return run_id_for(method, rank, config_hash(cfg))


# ---------------------------------------------------------------- records


def _config(record: dict) -> dict:
    return record.get("config") or {}


def arm_config(record: dict) -> dict:
    """The method and all its settings that can change a result (the part of the config a pair's
    arms differ in; ``method.lr_grid``, which tune=lr reads, is not one)."""
    method = result_config(_config(record)).get("method")
    method = dict(method) if isinstance(method, dict) else {}
    method.setdefault("name", record.get("method"))
    return method


def arm_key(record: dict) -> str:
    return stable_hash(arm_config(record))


def group_key(record: dict) -> str:
    """One comparison group: every setting but the seed, arm included."""
    return stable_hash({"setting": setting_config(_config(record)), "arm": arm_config(record)})


def model_name(record: dict) -> str:
    model = _config(record).get("model")
    name = model.get("name") if isinstance(model, dict) else model
    return str(name or (record.get("model") or {}).get("name") or "?")


def data_name(record: dict) -> str:
    data = _config(record).get("data")
    name = data.get("name") if isinstance(data, dict) else data
    return str(name or "-")


def hardware_name(record: dict) -> str:
    hardware = _config(record).get("hardware")
    name = hardware.get("name") if isinstance(hardware, dict) else hardware
    return str(name or (record.get("metrics") or {}).get("hardware") or (record.get("env") or {}).get("device_name")
               or "-")


def seed(record: dict) -> Any:
    return _config(record).get("seed")


def table_key(record: dict) -> tuple[str, str, str, str]:
    """(model, data, hardware, setting_key): the runs of one report table, whose arms are compared
    there (equal pair identity but for the seed and the method)."""
    return (model_name(record), data_name(record), hardware_name(record), setting_key(_config(record)))


def arm_text(record: dict, fields: Iterable[str] | None = None) -> str:
    """``lora r16`` and, for ``fields`` (default: learning rate), their values: ``lora r16 lr 0.001``."""
    method = arm_config(record)
    text = str(record.get("method") or method.get("name"))
    if record.get("rank") is not None:
        text += f" r{record['rank']}"
    wanted = set(fields) if fields is not None else {"learning_rate"}
    for key, short in ARM_LABEL_FIELDS:
        if key in wanted and method.get(key) is not None:
            text += f" {short} {method[key]}"
    return text


def group_label(record: dict) -> str:
    """Readable and unique: ``smollm2-135m · demo · lora r16 lr 0.001 · 1a2b3c4d`` (no "|")."""
    return f"{model_name(record)} · {data_name(record)} · {arm_text(record)} · {group_key(record)[:8]}"


def differing_fields(configs: list[dict], prefix: str = "") -> list[str]:
    """Dotted names of the settings whose values are not the same in all ``configs``."""
    keys = sorted({k for c in configs for k in c})
    out = []
    for k in keys:
        values = [c.get(k) for c in configs]
        if all(isinstance(v, dict) for v in values):
            out += differing_fields(values, f"{prefix}{k}.")
        elif len({stable_hash(v) for v in values}) > 1:
            out.append(f"{prefix}{k}")
    return out


def lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def full_references(records: Iterable[dict], chosen: Iterable[str] = ()) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """The full fine-tuning reference of each pair_key, and the pair_keys where it is ambiguous.

    Returns ``(reference by pair_key, {pair_key: [run ids]} for pairs with several ok full runs
    of different settings)``. A run id in ``chosen`` settles its pair: the explicit choice.
    """
    chosen = set(chosen)
    by_pair: dict[str, dict[str, dict]] = {}
    for rec in records:
        if rec.get("status") == "ok" and rec.get("method") == "full" and rec.get("pair_key"):
            by_pair.setdefault(rec["pair_key"], {})[rec["config_hash"]] = rec
    refs, ambiguous = {}, {}
    for key, runs in by_pair.items():
        picked = [r for r in runs.values() if r["run_id"] in chosen]
        if len(picked) == 1:
            refs[key] = picked[0]
        elif len(runs) == 1:
            refs[key] = next(iter(runs.values()))
        else:
            ambiguous[key] = sorted(r["run_id"] for r in runs.values())
    return refs, ambiguous


def gap_key(peft: dict, full: dict) -> str:
    """The comparison group of a gap: the PEFT arm's group and the full reference's settings."""
    return stable_hash({"group": group_key(peft), "reference": arm_config(full)})


def gap_label(peft: dict, full: dict) -> str:
    """``smollm2-135m · demo · lora r16 lr 0.001 vs full lr 0.0001 · 1a2b3c4d`` (unique, no "|")."""
    return f"{model_name(peft)} · {data_name(peft)} · {arm_text(peft)} vs {arm_text(full)} · {gap_key(peft, full)[:8]}"


def provenance_changes(record: dict, repo: str | Path) -> list[str]:
    """How the code and stack now differ from what ``record`` was made with: the git commit of
    ``repo`` and the versions of the packages its ``env`` names ([] when nothing differs).

    The config_hash does not cover them (a rerun on a new commit is the same experiment), so a
    skip-on-rerun says so rather than pass an old result off as the current code's.
    """
    import importlib.metadata as md
    import subprocess

    env = record.get("env") or {}
    changes = []
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo, timeout=10)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if env.get("git_commit") and commit and env["git_commit"] != commit:
        changes.append(f"git commit {env['git_commit'][:10]} -> {commit[:10]}")
    for pkg, old in sorted((env.get("versions") or {}).items()):
        try:
            new = md.version(pkg)
        except md.PackageNotFoundError:
            new = None
        if old != new:
            changes.append(f"{pkg} {old} -> {new}")
    return changes
