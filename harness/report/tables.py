"""The at-a-glance table: runs grouped into tables and arms (by harness.identity), one cell per
row and arm, and the markdown and CSV files.

A row is one line in ROWS: its label, the function that fills an arm's cell, and what the row
means on this table's devices (the memory measure, the devices and how many), which goes into
the label. Every statistic comes from harness.stats.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from harness import identity
from harness.records import read_items
from harness.report.fmt import (
    DASH,
    fmt_accuracy,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_percent,
    fmt_share,
    fmt_usd,
)
from harness.stats import (
    TASKS,
    accuracy_interval,
    forgetting_deltas,
    loss_gaps,
    mean_sd,
    pair_gaps,
    record_tasks,
    seed_summary,
)

METHOD_ORDER = {"base": 0, "full": 1, "lora": 2, "qlora": 3}
TASK_LABEL = {"mmlu": "MMLU", "indomain": "in-domain"}  # lm-eval tasks go by their own names
# what a record's peak memory measures, for records written before `memory_measure` existed
MEMORY_MEASURE = {"cuda": "CUDA allocated", "cpu": "CPU RSS growth"}
NOT_TRAINED = "n/a (not trained)"


# ---------------------------------------------------------------- grouping


def _arm_sort(arm: tuple) -> tuple:
    """(method, rank[, arm key]) in table order: base, full, LoRA by rank, QLoRA by rank, others."""
    method, rank, *key = arm
    return (METHOD_ORDER.get(method, len(METHOD_ORDER)), method, -1 if rank is None else rank, *key)


def status_of(record: dict) -> str:
    """The status to show: ``killed`` for an older ``oom`` record of a SIGKILL (failure.was_killed)."""
    from harness.failure import was_killed

    return "killed" if was_killed(record) else record["status"]


def _seed_sort(record: dict) -> tuple:
    seed = identity.seed(record)
    # ints sort numerically, anything else after them by text; run_id breaks ties
    return (0, seed, "", record["run_id"]) if isinstance(seed, int) else (1, 0, str(seed), record["run_id"])


class Items:
    """Per-question answers of a run (records.read_items reads each file once)."""

    def __init__(self, results_dir: Path):
        self.results_dir = results_dir

    def __call__(self, record: dict) -> list[dict]:
        return read_items(self.results_dir, record)


@dataclass
class Arm:
    method: str
    rank: int | None
    runs: list[dict]  # sorted by seed
    key: str = ""  # identity.arm_key
    settings: str = ""  # what tells it from another arm of the same method and rank, e.g. "lr 0.001"
    accuracy: dict[str, dict | None] = field(default_factory=dict)  # task -> stats.accuracy_interval

    @property
    def label(self) -> str:
        return identity.arm_label(self.method, self.rank) + (f" {self.settings}" if self.settings else "")

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "ok"]

    def values(self, metric: str) -> list[float]:
        """Non-null values of ``metric`` over the ok runs (one per seed)."""
        values = [r["metrics"].get(metric) for r in self.ok]
        return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


@dataclass
class Table:
    key: tuple[str, str, str, str]  # identity.table_key
    arms: list[Arm]
    items: Items
    gaps: dict[tuple[str, str], dict] = field(default_factory=dict)  # (arm key, task) -> stats.seed_summary row
    loss_gaps: dict[str, dict] = field(default_factory=dict)  # arm key -> stats.loss_gaps row
    # every rate grid's validation choice (harness.report.tuned.choices), computed once in group()
    choices: list = field(default_factory=list)
    forgetting: dict[str, dict] = field(default_factory=dict)  # arm key -> stats.forgetting_deltas row
    title: str = ""

    @property
    def runs(self) -> list[dict]:
        return [r for arm in self.arms for r in arm.runs]

    @property
    def reference_ids(self) -> list[str]:
        """The run ids of the full FT arm its validation chose, where full FT ran over a rate grid."""
        full = next((c for c in self.choices if c.method == "full"), None)
        return [r["run_id"] for r in full.chosen.ok] if full else []


def group(records: list[dict], results_dir: Path) -> list[Table]:
    """Tables (sorted), their arms (base, full, LoRA by rank, QLoRA by rank, others), gaps and
    accuracy intervals."""
    items = Items(results_dir)
    members: dict[tuple, list[dict]] = defaultdict(list)
    trained = [r for r in records if r["method"] != "base"]
    for rec in trained:
        members[identity.table_key(rec)].append(rec)
    # a base-model record joins every table whose arms were compared with it
    for base in (r for r in records if r["method"] == "base"):
        homes = sorted({identity.table_key(r) for r in trained if r.get("base_run_id") == base["run_id"]})
        for key in homes or [identity.table_key(base)]:
            members[key].append(base)

    def size_first(key: tuple) -> tuple:
        sizes = [(r.get("model") or {}).get("total_params") or 0 for r in members[key]]
        return (max(sizes), key)

    tables = []
    for key in sorted(members, key=size_first):
        by_arm: dict[tuple, list[dict]] = defaultdict(list)
        for rec in members[key]:
            by_arm[(rec["method"], rec.get("rank"), identity.arm_key(rec))].append(rec)
        arms = [Arm(m, r, sorted(by_arm[(m, r, k)], key=_seed_sort), k) for m, r, k in sorted(by_arm, key=_arm_sort)]
        for arm in arms:
            siblings = [a for a in arms if (a.method, a.rank) == (arm.method, arm.rank)]
            if len(siblings) > 1:
                fields = identity.differing_fields([identity.arm_config(a.runs[0]) for a in siblings])
                mine = identity.arm_config(arm.runs[0])
                arm.settings = ", ".join(f"{f.replace('learning_rate', 'lr')} {identity.lookup(mine, f)}" for f in fields)
            arm.accuracy = {task: accuracy_interval(arm.ok, task, items) for task in record_tasks(members[key])}
        from harness.report.tuned import choices

        # Gaps are paired within the table, so a full run on other hardware is never the reference;
        # where full FT ran at several rates, the one its validation chose is (harness.report.tuned)
        table = Table(key, arms, items, choices=choices(arms, items))
        for row in seed_summary(pair_gaps(table.runs, results_dir, table.reference_ids)):
            table.gaps[(row["arm"], row["task"])] = row
        table.loss_gaps = loss_gaps(table.runs, results_dir, table.reference_ids)
        table.forgetting = forgetting_deltas(table.runs, results_dir)
        tables.append(table)

    # the title names the settings that differ only where one model/data/hardware has several tables
    siblings: dict[tuple, list[Table]] = defaultdict(list)
    for t in tables:
        siblings[t.key[:3]].append(t)
    for t in tables:
        model, data, hardware, _ = t.key
        t.title = f"{model} on {data} ({hardware})"
        if len(siblings[t.key[:3]]) > 1:
            settings = [identity.setting_config(s.runs[0].get("config") or {}) for s in siblings[t.key[:3]]]
            mine = identity.setting_config(t.runs[0].get("config") or {})
            fields = identity.differing_fields(settings)
            t.title += ", " + (", ".join(f"{f} {identity.lookup(mine, f)}" for f in fields[:3])
                               or f"settings {t.key[3][:8]}")
    return tables


# ---------------------------------------------------------------- what a row means on these devices


def _trained_ok(table: Table) -> list[dict]:
    return [r for a in table.arms if a.method != "base" for r in a.ok]


def devices_text(runs: list[dict]) -> str:
    """``1x NVIDIA H200`` (devices used: env.device_count, else metrics.world_size), several joined."""
    seen = set()
    for r in runs:
        env = r.get("env") or {}
        count = env.get("device_count") or r["metrics"].get("world_size") or 1
        seen.add(f"{count}x {env.get('device_name') or env.get('device') or '?'}")
    return " / ".join(sorted(seen))


def memory_measure(record: dict) -> str | None:
    """What ``peak_memory_bytes`` measured: ``metrics.memory_measure``, else named from memory_device."""
    m = record["metrics"]
    return m.get("memory_measure") or MEMORY_MEASURE.get(m.get("memory_device"), m.get("memory_device"))


def _memory_qualifier(table: Table) -> str:
    runs = [r for r in _trained_ok(table) if r["metrics"].get("peak_memory_bytes") is not None]
    measures = sorted({m for r in runs if (m := memory_measure(r))})
    parts = [" / ".join(measures)] if measures else []
    if any((r["metrics"].get("world_size") or 1) > 1 for r in runs):
        parts.append("largest rank")
    return "; ".join(parts + ([devices_text(runs)] if runs else []))


def _devices_qualifier(table: Table, metrics: tuple[str, ...]) -> str:
    return devices_text([r for r in _trained_ok(table) if any(r["metrics"].get(m) is not None for m in metrics)])


# ---------------------------------------------------------------- cells


def failure_text(record: dict, short: bool = False) -> str:
    """How a run that did not finish shows in its column."""
    from harness.failure import KILLED_CAUSE, was_killed

    env = record.get("env") or {}
    phase = f" (in {record['failed_phase']})" if record.get("failed_phase") else ""  # where it failed, if recorded
    if was_killed(record):  # a SIGKILL says nothing about the GPU (an older record's oom included)
        return f"killed{phase}" if short else f"{KILLED_CAUSE}{phase}"
    if record["status"] == "oom":
        device = env.get("device_name") or identity.hardware_name(record)
        return f"did not fit on {env.get('device_count') or 1}x {device}{phase}"
    if short:
        return f"failed{phase}"
    error = " ".join(str(record.get("error") or "unknown error").split())
    # the phase leads (a long error would cut it off the end, where the record's error names it)
    error = error.removesuffix(f" (in phase {record.get('failed_phase')})")
    return f"failed{phase}: {error[:60] + '…' if len(error) > 60 else error}"


def arm_header(arm: Arm) -> str:
    n, ok = len(arm.runs), len(arm.ok)
    if ok in (0, n):  # all ok, or all failed (then every cell says how)
        # "runs", not "seeds", when a seed was run more than once (e.g. with other settings)
        unit = "seeds" if len({str(identity.seed(r)) for r in arm.runs}) == n else "runs"
        return f"{arm.label} ({n} {unit})" if n > 1 else arm.label
    counts: dict[str, int] = defaultdict(int)
    for r in arm.runs:
        counts[status_of(r)] += 1
    others = ", ".join(f"{counts[s]} {s}" for s in ("failed", "oom", "killed") if counts[s])
    return f"{arm.label} ({ok} of {n} ok; {others})"


def _accuracy_cell(arm: Arm, task: str) -> str:
    interval = arm.accuracy.get(task)
    return fmt_accuracy(interval) if interval else DASH


def reference_arm(table: Table) -> Arm | None:
    """The full fine-tuning arm the table's gaps are taken against: validation's choice where full
    FT ran at several rates, else the one at the default settings, else the first."""
    full = [a for a in table.arms if a.method == "full"]
    chosen = set(table.reference_ids)
    return (next((a for a in full if chosen & {r["run_id"] for r in a.runs}), None)
            or next((a for a in full if not a.settings), None) or next(iter(full), None))


def _reference_text(table: Table, arm: Arm) -> str:
    """"reference" for the arm gaps are taken against; another full FT arm says it is not."""
    return "reference" if not table.reference_ids or arm is reference_arm(table) else "not the reference"


def _gap_cell(table: Table, arm: Arm, task: str) -> str:
    if arm.method == "full":
        return f"{_reference_text(table, arm)}: {_accuracy_cell(arm, task)}"
    if arm.method == "base":
        return _accuracy_cell(arm, task)
    row = table.gaps.get((arm.key, task))
    if row is None:
        return "no full FT pair" if arm.accuracy.get(task) else DASH
    text = f"{row['gap'] * 100:+.2f}"
    if row["sd"] is not None and len(set(row["seeds"].values())) > 1:
        text += f" ± {row['sd'] * 100:.2f}"
    text += " pp"
    low, high = row["ci_low"], row["ci_high"]
    if low is not None:
        text += f" [{low * 100:+.2f}, {high * 100:+.2f}]"
    if not row["paired"]:
        text += " unpaired"
    if row["n_seeds"] == 1:
        text += " (1 seed: training noise not estimated)"
    if row["n_seeds"] < len(arm.values(f"{task}_acc")):
        # seeds whose full fine-tuning run is missing or failed have no gap
        text += f" ({row['n_seeds']} of {len(arm.values(f'{task}_acc'))} seeds have a full FT pair)"
    return text


def _loss_text(arm: Arm, metric: str = "heldout_loss") -> str:
    losses = arm.values(metric)
    if not losses:
        return DASH
    mean, sd = mean_sd(losses)
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None and len(losses) > 1 else "") + " nats/token"


def _loss_gap_cell(table: Table, arm: Arm) -> str:
    if arm.method == "full":
        return f"{_reference_text(table, arm)}: " + _loss_text(arm) if arm.values("heldout_loss") else DASH
    if arm.method == "base":
        return _loss_text(arm)
    row = table.loss_gaps.get(arm.key)
    if row is None:
        return "no full FT pair" if arm.values("heldout_loss") else DASH
    return _paired_loss_text(row)


def _forgetting_cell(table: Table, arm: Arm) -> str:
    if arm.method == "base":
        return "reference: " + _loss_text(arm, "forgetting_loss") if arm.values("forgetting_loss") else DASH
    row = table.forgetting.get(arm.key)
    if row is None:
        return "no base-model record" if arm.values("forgetting_loss") else DASH
    return _paired_loss_text(row)


def _paired_loss_text(row: dict) -> str:
    text = f"{row['gap']:+.3f}"
    if row["sd"] is not None:
        text += f" ± {row['sd']:.3f}"
    text += " nats/token"
    if row["ci_low"] is not None:
        text += f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
    if row["n_seeds"] == 1:
        text += " (1 seed: training noise not estimated)"
    return text


def _footprint_cell(table: Table, arm: Arm) -> str:
    full_bytes = arm.values("full_checkpoint_bytes")
    estimated = any(r["metrics"].get("full_checkpoint_bytes_estimated") for r in arm.ok)
    dtypes = sorted({r["metrics"]["serving_dtype"] for r in arm.ok if r["metrics"].get("serving_dtype")})
    dtype = f" ({', '.join(dtypes)})" if dtypes else ""
    full_text = (
        (f"full {'~' if estimated else ''}{fmt_bytes(full_bytes)}" + (" (estimated)" if estimated else dtype))
        if full_bytes
        else ""
    )
    # the adapter at the serving dtype, like the checkpoint (older records: the saved file)
    adapter = arm.values("adapter_serving_bytes") or arm.values("adapter_bytes")
    if adapter and arm.method not in ("full", "base"):
        text = f"adapter {fmt_bytes(adapter)}"
        if full_bytes:
            text += f" ({fmt_share(mean_sd(adapter)[0] / mean_sd(full_bytes)[0])}) vs {full_text}"
        return text
    return full_text or DASH


def _overhead_text(arm: Arm, key: str) -> str | None:
    values = arm.values(key)
    if not values:
        return None
    low, high = arm.values(f"{key}_ci_low"), arm.values(f"{key}_ci_high")
    if len(values) == 1 and low and high:  # one run: its 95% interval over the probe's repetitions
        return f"{values[0] * 100:+.1f}% [{low[0] * 100:+.1f}, {high[0] * 100:+.1f}]"
    return fmt_percent(values, signed=True)


LATENCY_PHASES = (("prefill", "prefill"), ("decode", "decode/token"))


def _latency_cell(table: Table, arm: Arm) -> str:
    if arm.method == "full":  # the fine-tuned model is its own base: no adapter to merge or keep apart
        return DASH
    phases = []
    for phase, label in LATENCY_PHASES:
        parts = [f"{kind} {text}" for kind in ("merged", "dynamic")
                 if (text := _overhead_text(arm, f"latency_{phase}_{kind}_overhead"))]
        if parts:
            phases.append(f"{label}: {', '.join(parts)}")
    if not phases:  # records from before prefill and decode were timed apart: one overhead per kind
        phases = [f"{kind} {text}" for kind in ("merged", "dynamic")
                  if (text := _overhead_text(arm, f"latency_{kind}_overhead"))]
        return ", ".join(phases) or DASH
    return "; ".join(phases)


def variant_entries(arm: Arm) -> list[dict]:
    """The serving-N-variants entries of the arm's first ok run that has them (one per N)."""
    return next((r["metrics"]["variants"] for r in arm.ok if r["metrics"].get("variants")), [])


def _ratio_text(r: dict | None) -> str | None:
    if not r or r.get("ratio") is None:
        return None
    lo, hi = r["ci"]
    return f"×{r['ratio']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def _largest_n(table: Table) -> int | None:
    """The largest N a PEFT arm of the table served (full FT's row is computed at the same N)."""
    return max((e["n"] for a in table.arms if a.method not in ("full", "base") for e in variant_entries(a)
                if e.get("resident_bytes") is not None), default=None)


def _variants_cell(table: Table, arm: Arm) -> str:
    entries = variant_entries(arm)
    if not entries:
        reasons = [why for r in arm.ok if (why := (r["metrics"].get("skipped_measurements") or {}).get("variants"))]
        return f"not measured: {reasons[0]}" if reasons else DASH
    e = entries[-1]
    n, merged = e["n"], e.get("merged_bytes")
    merged_text = f"{n} merged {fmt_bytes([merged])} (computed)" if merged else ""
    if e.get("resident_bytes") is None:  # full fine-tuning: a checkpoint per variant, N x its measured bytes
        checkpoint = arm.values("full_checkpoint_bytes")
        n = _largest_n(table) or n
        merged = n * checkpoint[0] if checkpoint else merged
        return f"N={n}: {n} checkpoints {fmt_bytes([merged])} in memory and on disk (computed)" if merged else DASH
    measure = (arm.ok[0]["metrics"].get("variants_settings") or {}).get("memory_measure", "")
    parts = [f"N={n}: base + {n} adapters {fmt_bytes([e['resident_bytes']])}" + (f" ({measure})" if measure else "")
             + (f" vs {merged_text}" if merged_text else "")]
    ratios = [f"{phase} {text}" for phase in ("prefill", "decode")
              if (text := _ratio_text(e.get(f"mixed_vs_merged_{phase}")))]
    if ratios:
        batch = (arm.ok[0]["metrics"].get("variants_settings") or {}).get("batch")
        parts.append(f"mixed batch{f' of {batch}' if batch else ''} vs merged: {', '.join(ratios)}")
    switching = e.get("switching") or {}
    switch = [f"{label} {_ms(switching[key]['median_s'])}" for key, label in
              (("set_adapter", "switch"), ("load_adapter", "load"), ("hotswap_adapter", "hotswap"))
              if key in switching]
    if switch:
        parts.append(", ".join(switch))
    return "; ".join(parts)


def _cost_cell(table: Table, arm: Arm) -> str:
    wall = arm.values("train_wall_s") or arm.values("run_wall_s")  # cost_usd prices the training phase
    cost = arm.values("cost_usd")
    projected = arm.values("projected_cost_usd")
    # one run is one measurement, not a mean: say so (a time varies from run to run)
    once = " (1 run)" if len(wall) == 1 else ""
    parts = [fmt_duration(wall) + once if wall else DASH, fmt_usd(cost) if cost else "cost n/a"]
    if projected:
        tokens = arm.values("projected_tokens")
        parts.append(f"projected {fmt_usd(projected)}" + (f" for {fmt_count(tokens)} tokens" if tokens else ""))
    text = "; ".join(parts)
    return DASH if text == f"{DASH}; cost n/a" else text


def _memory_cell(table: Table, arm: Arm) -> str:
    memory = arm.values("peak_memory_bytes")
    if not memory:
        return DASH
    devices = max(arm.values("world_size"), default=1)  # the largest rank's peak, on each of N devices
    text = fmt_bytes(memory) + (f" per GPU × {devices}" if devices > 1 else "")
    growth = arm.values("peak_memory_growth_bytes")
    if arm.ok and memory_measure(arm.ok[0]) == "CPU RSS" and len(growth) == len(memory):
        # at small sizes the process itself (interpreter, libraries, the loaded model) dominates the
        # RSS: show it beside what training added and what the tracked tensors take
        start = [m - g for m, g in zip(memory, growth)]
        text += f" = {fmt_bytes(start)} at train start + {fmt_bytes(growth)} training growth"
        tracked = [p for r in arm.ok if (p := r["metrics"].get("memory_breakdown_peak_bytes"))]
        if tracked:
            text += f" (tracked tensors {fmt_bytes(tracked)})"
    return text


def _trainable_cell(table: Table, arm: Arm) -> str:
    counts = arm.values("trainable_params")
    if not counts:
        return DASH
    shares = arm.values("trainable_share") or [
        r["metrics"]["trainable_params"] / r["metrics"]["total_params"]
        for r in arm.ok
        if r["metrics"].get("trainable_params") is not None and r["metrics"].get("total_params")
    ]
    return fmt_count(counts) + (f" ({fmt_share(mean_sd(shares)[0])})" if shares else "")


@dataclass(frozen=True)
class Row:
    label: str
    cell: Callable[[Table, Arm], str]
    qualifier: Callable[[Table], str] | None = None  # what the row means on this table's devices
    training: bool = False  # a training figure: the base model has none
    optional: bool = False  # shown only where some arm has a figure (held-out loss: generative data)

    def label_for(self, table: Table) -> str:
        what = self.qualifier(table) if self.qualifier else ""
        return f"{self.label} ({what})" if what else self.label


LATENCY_KEYS = tuple(f"latency_{p}{k}_overhead" for p in ("", "prefill_", "decode_") for k in ("merged", "dynamic"))

# The at-a-glance rows, in order; a row is one line (the gap is split by task, one cell each).
ROWS = (
    Row("trainable parameters (share of all)", _trainable_cell, training=True),
    Row("peak training memory", _memory_cell, _memory_qualifier, training=True),
    Row("training wall-clock; cost per run", _cost_cell, partial(_devices_qualifier, metrics=("train_wall_s", "run_wall_s", "cost_usd")),
        training=True),
    Row("gap vs full FT, MMLU (95% CI)", partial(_gap_cell, task="mmlu")),
    Row("gap vs full FT, in-domain (95% CI)", partial(_gap_cell, task="indomain")),
    Row("serving footprint: adapter vs full checkpoint", _footprint_cell),
    Row("inference latency overhead vs base", _latency_cell,
        partial(_devices_qualifier, metrics=LATENCY_KEYS)),
    Row("serving N variants: one base + N adapters vs N merged", _variants_cell,
        partial(_devices_qualifier, metrics=("variants",)), optional=True),
    Row("held-out loss gap vs full FT (95% CI)", _loss_gap_cell, optional=True),
    Row("forgetting: general-text loss rise vs base (95% CI)", _forgetting_cell, optional=True),
)
ROW_LABELS = tuple(row.label for row in ROWS)


def _column(table: Table, arm: Arm) -> list[str]:
    """The cells of ``arm``'s column, in ROWS order."""
    if not arm.ok:
        # every run of the arm failed: say so in each row rather than leave blanks
        first = arm.runs[0]
        return [failure_text(first)] + [failure_text(first, short=True)] * (len(ROWS) - 1)
    return [NOT_TRAINED if row.training and arm.method == "base" else row.cell(table, arm) for row in ROWS]


def _date(iso: str | None) -> str | None:
    return iso[:10] if isinstance(iso, str) and len(iso) >= 10 else None


def _provenance(table: Table) -> str:
    runs = table.runs
    envs = [r.get("env") or {} for r in runs]
    devices = sorted({f"{e.get('device_count') or 1}x {e.get('device_name') or e.get('device') or '?'}" for e in envs})
    dates = sorted(d for e in envs for d in (_date(e.get("started_at")), _date(e.get("ended_at"))) if d)
    date_text = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "dates unknown"

    mmlu = set()
    for r in runs:
        m = r["metrics"]
        if r["status"] == "ok" and m.get("mmlu_n"):
            shots = f", {m['mmlu_num_fewshot']}-shot" if m.get("mmlu_num_fewshot") is not None else ""
            kind = {True: "MMLU subset", False: "full MMLU"}.get(m.get("mmlu_subset"), "MMLU")
            mmlu.add(f"{kind} ({m['mmlu_n']} questions{shots})")
    mmlu_text = "; ".join(sorted(mmlu)) or "no MMLU results"

    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        counts[status_of(r)] += 1
    status_text = ", ".join(f"{counts[s]} {s}" for s in ("ok", "failed", "oom", "killed") if counts[s])
    text = (
        f"Provenance: {', '.join(devices)}; runs {date_text}; {mmlu_text}; "
        f"{len(runs)} run{'s' if len(runs) != 1 else ''} ({status_text})."
    )
    if any((r.get("model") or {}).get("random_weights") for r in runs):
        text += " Random weights (architecture only): accuracies are not meaningful."
    return text


def _footnotes(table: Table) -> list[str]:
    """Runs left out of an arm's aggregates because they did not finish."""
    notes = []
    for arm in table.arms:
        if arm.ok:
            for r in arm.runs:
                if r["status"] != "ok":
                    notes.append(f"{arm.label}, seed {identity.seed(r)} ({r['run_id']}): {failure_text(r)}")
    return notes


@dataclass
class RenderedTable:
    title: str
    header: list[str]
    rows: list[list[str]]  # first cell is the row label
    provenance: str
    notes: list[str]
    tuned: dict | None = None  # harness.report.tuned.section: best against best, where rates were tuned


def _task_rows(table: Table) -> list[Row]:
    """One gap row per lm-eval task (eval.tasks) the table's runs scored, after MMLU's and in-domain's."""
    return [Row(f"gap vs full FT, {task} (95% CI)", partial(_gap_cell, task=task))
            for task in record_tasks(table.runs) if task not in TASKS]


def render(table: Table) -> RenderedTable:
    columns = [_column(table, arm) for arm in table.arms]
    rows = [[row.label_for(table)] + [col[i] for col in columns] for i, row in enumerate(ROWS)
            if not row.optional or any(a.ok and row.cell(table, a) != DASH for a in table.arms)]
    for row in _task_rows(table):  # below the at-a-glance rows
        rows.append([row.label] + [row.cell(table, a) if a.ok else failure_text(a.runs[0], short=True)
                                   for a in table.arms])
    from harness.report.tuned import section

    return RenderedTable(
        table.title, [""] + [arm_header(a) for a in table.arms], rows, _provenance(table), _footnotes(table),
        section(table),
    )


# ---------------------------------------------------------------- markdown and CSV

AT_A_GLANCE = "at-a-glance.md"
GAP_NOTE = (
    "Gap = accuracy(PEFT) - accuracy(full FT) on the same questions, in percentage points "
    "(negative: PEFT is worse); mean ± sd over seeds, [95% interval: question noise, plus seed noise where seeds "
    "disagree beyond it]. Accuracies: mean over seeds [95% interval, the same two noises]. Held-out loss gap = "
    "loss(PEFT) - loss(full FT) in nats per target token on the same held-out examples (positive: PEFT is worse), "
    "with the same two noises. Forgetting = loss(arm) - loss(base model) on a general-text sample, the same way "
    "(positive: the arm got worse at general text)."
)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(tables: list[RenderedTable], skipped: list[str], verdict: list[str] | None = None) -> str:
    """The at-a-glance file: the verdict's lines (harness.report.verdict) first, then the tables."""
    lines = ["# PEFT vs full fine-tuning: at a glance", "", *(verdict or [])]
    if not tables:
        lines += ["No run records found.", ""]
    for t in tables:
        lines += [f"## {_md_cell(t.title)}", ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
        lines.append("|" + "|".join(["---"] * len(t.header)) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        lines += ["", t.provenance]
        if t.tuned:
            lines += ["", f"### {t.tuned['title']}", "", "| " + " | ".join(_md_cell(h) for h in t.tuned["header"]) + " |",
                      "|" + "|".join(["---"] * len(t.tuned["header"])) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.tuned["rows"]]
            lines += [""] + [f"- {_md_cell(n)}" for n in t.tuned["notes"]]
        if t.notes:
            lines += ["", "Not in the aggregates:", ""] + [f"- {_md_cell(n)}" for n in t.notes]
        lines.append("")
    if tables:
        lines += [GAP_NOTE, ""]
    if skipped:
        lines += ["## Skipped records", ""] + [f"- {_md_cell(s)}" for s in skipped] + [""]
    return "\n".join(lines)


def _flatten(prefix: str, value, out: dict) -> None:
    """Scalars under dotted names; lists (loss curve, step times) stay in the records."""
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    elif not isinstance(value, list):
        out[prefix] = value


RUN_LEAD = (
    "model", "data", "hardware_name", "eval_key", "method", "rank", "seed", "run_id", "status", "error", "pair_key",
    "base_run_id", "model_source", "random_weights",
)


def _run_row(table: Table, rec: dict) -> dict:
    env = rec.get("env") or {}
    model, data, hardware, eval_key = table.key
    row = {
        "model": model,
        "data": data,
        "hardware_name": hardware,  # metrics has its own "hardware" column
        "eval_key": eval_key,
        "method": rec["method"],
        "rank": rec.get("rank"),
        "seed": identity.seed(rec),
        "run_id": rec["run_id"],
        "status": rec["status"],
        "error": rec.get("error"),
        "pair_key": rec["pair_key"],
        "base_run_id": rec.get("base_run_id"),
        "model_source": (rec.get("model") or {}).get("source"),
        "random_weights": (rec.get("model") or {}).get("random_weights"),
    }
    for k in ("device", "device_name", "device_count", "host", "git_commit", "started_at", "ended_at"):
        row[f"env_{k}"] = env.get(k)
    for pkg, version in sorted((env.get("versions") or {}).items()):
        row[f"version_{pkg}"] = version
    metrics: dict = {}
    _flatten("", rec["metrics"], metrics)
    return row | metrics


def runs_frame(tables: list[Table]) -> pd.DataFrame:
    rows = [_run_row(t, r) for t in tables for r in t.runs]
    if not rows:
        return pd.DataFrame(columns=["run_id"])
    # object dtype keeps ints as ints (rank 8, not 8.0) next to missing values
    frame = pd.DataFrame(rows, dtype=object)
    # a metric that is a list or an object in some record (null in others) has no column of its own
    nested = {k for t in tables for r in t.runs for k, v in r["metrics"].items() if isinstance(v, (list, dict))}
    frame = frame.drop(columns=[c for c in frame.columns if c in nested])
    lead = [c for c in rows[0] if c.startswith(("env_",)) or c in RUN_LEAD]
    versions = sorted(c for c in frame.columns if c.startswith("version_"))
    rest = sorted(c for c in frame.columns if c not in lead and c not in versions)
    return frame[lead + versions + rest]


def arms_frame(tables: list[Table]) -> pd.DataFrame:
    rows = []
    for t in tables:
        for arm in t.arms:
            model, data, hardware, eval_key = t.key
            row = {
                "model": model,
                "data": data,
                "hardware_name": hardware,
                "eval_key": eval_key,
                "method": arm.method,
                "rank": arm.rank,
                "arm": arm.label,
                "n_runs": len(arm.runs),
                "n_ok": len(arm.ok),
                "n_failed": sum(r["status"] == "failed" for r in arm.runs),
                "n_oom": sum(status_of(r) == "oom" for r in arm.runs),
                "n_killed": sum(status_of(r) == "killed" for r in arm.runs),
            }
            flat = []
            for r in arm.ok:
                m: dict = {}
                _flatten("", r["metrics"], m)
                flat.append(m)
            for name in sorted({k for m in flat for k in m}):
                values = [
                    m[name] for m in flat if isinstance(m.get(name), (int, float)) and not isinstance(m.get(name), bool)
                ]
                if values:
                    row[f"{name}_mean"], row[f"{name}_sd"] = mean_sd(values)
            for task in TASKS:
                if (acc := arm.accuracy.get(task)) is not None:
                    row[f"{task}_acc_se"], row[f"{task}_acc_ci_low"], row[f"{task}_acc_ci_high"] = (
                        acc["se"], acc["ci_low"], acc["ci_high"])
                g = t.gaps.get((arm.key, task))
                if g is not None:
                    row[f"gap_{task}_mean"] = g["gap"]
                    row[f"gap_{task}_sd"] = g["sd"]
                    row[f"gap_{task}_se"] = g["se"]
                    row[f"gap_{task}_ci_low"], row[f"gap_{task}_ci_high"] = g["ci_low"], g["ci_high"]
                    row[f"gap_{task}_n_seeds"] = g["n_seeds"]
                    row[f"gap_{task}_paired"] = g["paired"]
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["arm"])
    frame = pd.DataFrame(rows, dtype=object)
    lead = list(rows[0])[:11]  # identity and run counts, in the order above
    return frame[lead + sorted(c for c in frame.columns if c not in lead)]
