"""harness-report: turn run records into tables, plots and one static page.

    harness-report [--results results] [--reports reports]

Reads ``results/*.json`` (and the per-question answers beside them) only; it never loads a model.
Writes into the reports folder:

    at-a-glance.md   one table per model x data x hardware (x eval settings), one column per arm
    runs.csv         one row per run, metrics flattened
    arms.csv         one row per arm: mean and sd over seeds, gap vs full fine-tuning
    *.png            plots (each skipped, with a log line, when its data is absent)
    index.html       the same tables and the plots on one page; no server, no external assets

Same results in, byte-identical markdown and CSV out: everything is sorted and no report timestamp
is written. A broken record is skipped with a warning naming the file, and listed in the report.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# The object-oriented Figure API renders with Agg and leaves pyplot's global backend alone, so the
# run stage can call build_report in its own process without side effects.
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from harness import identity
from harness.records import RecordError, iter_records, load_record
from harness.stats import Z95, pair_gaps, seed_summary

log = logging.getLogger(__name__)

AT_A_GLANCE = "at-a-glance.md"
METHOD_ORDER = {"base": 0, "full": 1, "lora": 2, "qlora": 3}
METHOD_LABEL = {"base": "base model", "full": "full FT", "lora": "LoRA", "qlora": "QLoRA"}
TASK_LABEL = {"mmlu": "MMLU", "indomain": "in-domain"}
BREAKDOWN = ("parameters", "gradients", "optimizer_state", "activations", "other")
DASH = "—"

# Row labels of the at-a-glance table, in order (row 4 is split by task so each gap has its own cell)
ROWS = (
    "trainable parameters (share of all)",
    "peak training memory",
    "training wall-clock; cost per run",
    "gap vs full FT, MMLU (95% CI)",
    "gap vs full FT, in-domain (95% CI)",
    "serving footprint: adapter vs full checkpoint",
    "inference latency overhead vs base",
)


# ---------------------------------------------------------------- grouping


def _config_name(record: dict, group: str) -> str | None:
    value = (record.get("config") or {}).get(group)
    if isinstance(value, dict):
        value = value.get("name")
    return None if value is None else str(value)


def _table_key(record: dict) -> tuple[str, str, str, str]:
    """(model, data, hardware, identity.setting_key): runs that belong in one at-a-glance table
    (equal pair identity but for the seed and the method)."""
    model = _config_name(record, "model") or (record.get("model") or {}).get("name") or "?"
    data = _config_name(record, "data") or "-"
    hardware = (
        _config_name(record, "hardware")
        or record["metrics"].get("hardware")
        or (record.get("env") or {}).get("device_name")
        or "-"
    )
    return (str(model), data, str(hardware), identity.setting_key(record.get("config") or {}))


def _arm_key(record: dict) -> tuple[str, int | None, str]:
    """(method, rank, identity.arm_key): a learning-rate or alpha sweep of one method is several arms."""
    return (record["method"], record.get("rank"), identity.arm_key(record))


def _arm_sort(arm: tuple) -> tuple:
    """(method, rank[, arm key]) in table order: base, full, LoRA by rank, QLoRA by rank, others."""
    method, rank, *key = arm
    return (METHOD_ORDER.get(method, len(METHOD_ORDER)), method, -1 if rank is None else rank, *key)


def arm_label(method: str, rank: int | None) -> str:
    label = METHOD_LABEL.get(method, method)
    return f"{label} r={rank}" if rank is not None else label


def _seed(record: dict):
    return (record.get("config") or {}).get("seed")


def _seed_sort(record: dict) -> tuple:
    seed = _seed(record)
    # ints sort numerically, anything else after them by text; run_id breaks ties
    return (0, seed, "", record["run_id"]) if isinstance(seed, int) else (1, 0, str(seed), record["run_id"])


@dataclass
class Arm:
    method: str
    rank: int | None
    runs: list[dict]  # sorted by seed
    key: str = ""  # identity.arm_key
    settings: str = ""  # what tells it from another arm of the same method and rank, e.g. "lr 0.001"

    @property
    def label(self) -> str:
        return arm_label(self.method, self.rank) + (f" {self.settings}" if self.settings else "")

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "ok"]

    def values(self, metric: str) -> list[float]:
        """Non-null values of ``metric`` over the ok runs (one per seed)."""
        values = [r["metrics"].get(metric) for r in self.ok]
        return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


@dataclass
class Table:
    key: tuple[str, str, str, str]
    arms: list[Arm]
    gaps: dict[tuple[str, str], dict] = field(default_factory=dict)  # (arm key, task)
    title: str = ""

    @property
    def runs(self) -> list[dict]:
        return [r for arm in self.arms for r in arm.runs]


def _group(records: list[dict], results_dir: Path) -> list[Table]:
    """Tables (sorted), their arms (base, full, LoRA by rank, QLoRA by rank, others) and gaps."""
    members: dict[tuple, list[dict]] = defaultdict(list)
    trained = [r for r in records if r["method"] != "base"]
    for rec in trained:
        members[_table_key(rec)].append(rec)
    # a base-model record joins every table whose arms were compared with it
    for base in (r for r in records if r["method"] == "base"):
        homes = sorted({_table_key(r) for r in trained if r.get("base_run_id") == base["run_id"]})
        for key in homes or [_table_key(base)]:
            members[key].append(base)

    def size_first(key: tuple) -> tuple:
        sizes = [(r.get("model") or {}).get("total_params") or 0 for r in members[key]]
        return (max(sizes), key)

    tables = []
    for key in sorted(members, key=size_first):
        by_arm: dict[tuple, list[dict]] = defaultdict(list)
        for rec in members[key]:
            by_arm[_arm_key(rec)].append(rec)
        arms = [Arm(m, r, sorted(by_arm[(m, r, k)], key=_seed_sort), k) for m, r, k in sorted(by_arm, key=_arm_sort)]
        for arm in arms:
            siblings = [a for a in arms if (a.method, a.rank) == (arm.method, arm.rank)]
            if len(siblings) > 1:
                configs = [identity.arm_config(a.runs[0]) for a in siblings]
                fields = identity.differing_fields(configs)
                mine = identity.arm_config(arm.runs[0])
                arm.settings = ", ".join(f"{f.replace('learning_rate', 'lr')} {identity.lookup(mine, f)}" for f in fields)
        table = Table(key, arms)
        # Gaps are paired within the table, so a full run on other hardware is never the reference
        for row in seed_summary(pair_gaps(table.runs, results_dir)):
            table.gaps[(row["arm"], row["task"])] = row
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


# ---------------------------------------------------------------- number formatting


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample sd (None for one value). Cells leave out an sd of exactly 0: identical
    values over seeds (the header says how many seeds there were)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _num(v: float) -> tuple[str, int]:
    """About three significant digits, and the decimals used (so an sd can match them)."""
    decimals = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:.{decimals}f}", decimals


def _pm(values: Sequence[float], scale: float, unit: str) -> str:
    """``mean ± sd unit`` over seeds (just the value for one seed), in ``unit`` = 1/``scale``."""
    mean, sd = _mean_sd(values)
    text, decimals = _num(mean / scale)
    if sd:
        text += f" ± {sd / scale:.{decimals}f}"
    return f"{text}{unit}"


def _bytes_scale(v: float) -> tuple[float, str]:
    scale, unit = 1.0, " B"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 * scale:
            break
        scale, unit = scale * 1024, f" {name}"
    return scale, unit


def fmt_bytes(values: Sequence[float]) -> str:
    return _pm(values, *_bytes_scale(statistics.fmean(values)))


def fmt_count(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(mean) >= scale:
            return _pm(values, scale, unit)
    return _pm(values, 1.0, "")


def fmt_duration(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    if mean < 120:
        return _pm(values, 1.0, " s")
    if mean < 7200:
        return _pm(values, 60.0, " min")
    return _pm(values, 3600.0, " h")


def fmt_usd(values: Sequence[float]) -> str:
    mean, sd = _mean_sd(values)
    if mean < 1e-4:
        return "<$0.0001"
    if mean >= 1:
        return f"${mean:,.2f}" + (f" ± {sd:,.2f}" if sd else "")
    # small costs: three significant digits, sd to the same decimal place
    decimals = max(2, 2 - math.floor(math.log10(mean)))
    return f"${mean:.{decimals}f}" + (f" ± {sd:.{decimals}f}" if sd else "")


def fmt_percent(values: Sequence[float], signed: bool = False, decimals: int = 1) -> str:
    mean, sd = _mean_sd([v * 100 for v in values])
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    return text + (f" ± {sd:.{decimals}f}" if sd else "") + "%"


def fmt_share(share: float) -> str:
    pct = share * 100
    return "100%" if abs(pct - 100) < 1e-9 else f"{pct:.3g}%"


# ---------------------------------------------------------------- table cells


def failure_text(record: dict, short: bool = False) -> str:
    """How a run that did not finish shows in its column."""
    env = record.get("env") or {}
    if record["status"] == "oom":
        device = env.get("device_name") or _table_key(record)[2]
        return f"did not fit on {env.get('device_count') or 1}x {device}"
    if short:
        return "failed"
    error = " ".join(str(record.get("error") or "unknown error").split())
    return f"failed: {error[:60] + '…' if len(error) > 60 else error}"


def _arm_header(arm: Arm) -> str:
    n, ok = len(arm.runs), len(arm.ok)
    if ok in (0, n):  # all ok, or all failed (then every cell says how)
        # "runs", not "seeds", when a seed was run more than once (e.g. with other settings)
        unit = "seeds" if len({str(_seed(r)) for r in arm.runs}) == n else "runs"
        return f"{arm.label} ({n} {unit})" if n > 1 else arm.label
    counts = defaultdict(int)
    for r in arm.runs:
        counts[r["status"]] += 1
    others = ", ".join(f"{counts[s]} {s}" for s in ("failed", "oom") if counts[s])
    return f"{arm.label} ({ok} of {n} ok; {others})"


def _accuracy_cell(arm: Arm, task: str) -> str:
    values = arm.values(f"{task}_acc")
    return f"acc {fmt_percent(values)}" if values else DASH


def _gap_cell(table: Table, arm: Arm, task: str) -> str:
    if arm.method == "full":
        return f"reference: {_accuracy_cell(arm, task)}"
    if arm.method == "base":
        return _accuracy_cell(arm, task)
    row = table.gaps.get((arm.key, task))
    if row is None:
        return "no full FT pair" if arm.values(f"{task}_acc") else DASH
    text = f"{row['gap'] * 100:+.2f}"
    if row["sd"] is not None and len(set(row["seeds"].values())) > 1:
        text += f" ± {row['sd'] * 100:.2f}"
    text += " pp"
    if row["se"] is not None:
        lo, hi = row["gap"] - Z95 * row["se"], row["gap"] + Z95 * row["se"]
        text += f" [{lo * 100:+.2f}, {hi * 100:+.2f}]"
    if not row["paired"]:
        text += " unpaired"
    if row["n_seeds"] == 1:
        text += " (1 seed: training noise not estimated)"
    if row["n_seeds"] < len(arm.values(f"{task}_acc")):
        # seeds whose full fine-tuning run is missing or failed have no gap
        text += f" ({row['n_seeds']} of {len(arm.values(f'{task}_acc'))} seeds have a full FT pair)"
    return text


def _footprint_cell(arm: Arm) -> str:
    full_bytes = arm.values("full_checkpoint_bytes")
    estimated = any(r["metrics"].get("full_checkpoint_bytes_estimated") for r in arm.ok)
    full_text = (
        (f"full {'~' if estimated else ''}{fmt_bytes(full_bytes)}" + (" (estimated)" if estimated else ""))
        if full_bytes
        else ""
    )
    adapter = arm.values("adapter_bytes")
    if adapter and arm.method not in ("full", "base"):
        text = f"adapter {fmt_bytes(adapter)}"
        if full_bytes:
            text += f" ({fmt_share(statistics.fmean(adapter) / statistics.fmean(full_bytes))}) vs {full_text}"
        return text
    return full_text or DASH


def _latency_cell(arm: Arm) -> str:
    parts = []
    for kind in ("merged", "dynamic"):
        values = arm.values(f"latency_{kind}_overhead")
        if values:
            parts.append(f"{kind} {fmt_percent(values, signed=True)}")
    return ", ".join(parts) or DASH


def _cost_cell(arm: Arm) -> str:
    wall = arm.values("train_wall_s") or arm.values("run_wall_s")  # cost_usd prices the training phase
    cost = arm.values("cost_usd")
    projected = arm.values("projected_cost_usd")
    parts = [fmt_duration(wall) if wall else DASH, fmt_usd(cost) if cost else "cost n/a"]
    if projected:
        tokens = arm.values("projected_tokens")
        parts.append(f"projected {fmt_usd(projected)}" + (f" for {fmt_count(tokens)} tokens" if tokens else ""))
    text = "; ".join(parts)
    return DASH if text == f"{DASH}; cost n/a" else text


def _trainable_cell(arm: Arm) -> str:
    counts = arm.values("trainable_params")
    if not counts:
        return DASH
    shares = arm.values("trainable_share")
    if not shares:
        shares = [
            r["metrics"]["trainable_params"] / r["metrics"]["total_params"]
            for r in arm.ok
            if r["metrics"].get("trainable_params") is not None and r["metrics"].get("total_params")
        ]
    return fmt_count(counts) + (f" ({fmt_share(statistics.fmean(shares))})" if shares else "")


def _column(table: Table, arm: Arm) -> list[str]:
    """The seven cells of ``arm``'s column, in ROWS order."""
    if not arm.ok:
        # every run of the arm failed: say so in each row rather than leave blanks
        first = arm.runs[0]
        return [failure_text(first)] + [failure_text(first, short=True)] * (len(ROWS) - 1)
    memory = arm.values("peak_memory_bytes")
    devices = max(arm.values("world_size"), default=1)  # the largest rank's peak, on each of N devices
    return [
        _trainable_cell(arm),
        (fmt_bytes(memory) + (f" per GPU × {devices}" if devices > 1 else "")) if memory else DASH,
        _cost_cell(arm),
        _gap_cell(table, arm, "mmlu"),
        _gap_cell(table, arm, "indomain"),
        _footprint_cell(arm),
        _latency_cell(arm),
    ]


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

    counts = defaultdict(int)
    for r in runs:
        counts[r["status"]] += 1
    status_text = ", ".join(f"{counts[s]} {s}" for s in ("ok", "failed", "oom") if counts[s])
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
                    notes.append(f"{arm.label}, seed {_seed(r)} ({r['run_id']}): {failure_text(r)}")
    return notes


@dataclass
class RenderedTable:
    title: str
    header: list[str]
    rows: list[list[str]]  # first cell is the row label
    provenance: str
    notes: list[str]


def _render(table: Table) -> RenderedTable:
    columns = [_column(table, arm) for arm in table.arms]
    rows = [[label] + [col[i] for col in columns] for i, label in enumerate(ROWS)]
    return RenderedTable(
        table.title, [""] + [_arm_header(a) for a in table.arms], rows, _provenance(table), _footnotes(table)
    )


# ---------------------------------------------------------------- markdown and CSV


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


GAP_NOTE = (
    "Gap = accuracy(PEFT) - accuracy(full FT) on the same questions, in percentage points "
    "(negative: PEFT is worse); mean ± sd over seeds, [95% interval: question noise, plus seed noise where seeds disagree beyond it]."
)


def _markdown(tables: list[RenderedTable], skipped: list[str]) -> str:
    lines = ["# PEFT vs full fine-tuning: at a glance", ""]
    if not tables:
        lines += ["No run records found.", ""]
    for t in tables:
        lines += [f"## {_md_cell(t.title)}", ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
        lines.append("|" + "|".join(["---"] * len(t.header)) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        lines += ["", t.provenance]
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
    "model",
    "data",
    "hardware_name",
    "eval_key",
    "method",
    "rank",
    "seed",
    "run_id",
    "status",
    "error",
    "pair_key",
    "base_run_id",
    "model_source",
    "random_weights",
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
        "seed": _seed(rec),
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


def _runs_frame(tables: list[Table]) -> pd.DataFrame:
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


def _arms_frame(tables: list[Table]) -> pd.DataFrame:
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
                "n_oom": sum(r["status"] == "oom" for r in arm.runs),
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
                    row[f"{name}_mean"], row[f"{name}_sd"] = _mean_sd(values)
            for task in TASK_LABEL:
                g = t.gaps.get((arm.key, task))
                if g is not None:
                    row[f"gap_{task}_mean"] = g["gap"]
                    row[f"gap_{task}_sd"] = g["sd"]
                    row[f"gap_{task}_se"] = g["se"]
                    row[f"gap_{task}_ci_low"] = g["gap"] - Z95 * g["se"] if g["se"] is not None else None
                    row[f"gap_{task}_ci_high"] = g["gap"] + Z95 * g["se"] if g["se"] is not None else None
                    row[f"gap_{task}_n_seeds"] = g["n_seeds"]
                    row[f"gap_{task}_paired"] = g["paired"]
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["arm"])
    frame = pd.DataFrame(rows, dtype=object)
    lead = list(rows[0])[:11]  # identity and run counts, in the order above
    return frame[lead + sorted(c for c in frame.columns if c not in lead)]


# ---------------------------------------------------------------- plots


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats: cheaper-or-equal and at least
    as accurate, better in one. Lower cost and higher accuracy are better. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in order:
        cost, acc = points[i]
        if not front or acc > points[front[-1]][1]:
            front.append(i)
        elif (cost, acc) == tuple(points[front[-1]]):
            front.append(i)  # an exact duplicate of a front point is not dominated either
    return front


METHOD_COLOR = {"full": "tab:red", "lora": "tab:blue", "qlora": "tab:green", "base": "tab:gray"}
OTHER_COLORS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _method_colors(tables: list[Table]) -> dict[str, str]:
    others = sorted({a.method for t in tables for a in t.arms if a.method not in METHOD_COLOR})
    return METHOD_COLOR | {m: OTHER_COLORS[i % len(OTHER_COLORS)] for i, m in enumerate(others)}


def _arm_colors(tables: list[Table]) -> dict[str, tuple]:
    """One color per arm label, the same in every panel."""
    arms = sorted({(a.method, a.rank) for t in tables for a in t.arms}, key=_arm_sort)
    palette = colormaps["tab10"].colors + colormaps["tab20"].colors[1::2]  # strong colors first
    return {arm_label(*arm): palette[i % len(palette)] for i, arm in enumerate(arms)}


def _grid(n: int, cols: int = 3, ax_w: float = 4.2, ax_h: float = 2.6, gap_h: float = 1.5) -> tuple[Figure, list]:
    """Up to ``cols`` panels a row, margins fixed in inches (the legend column is added by _finish).

    A fixed layout: constrained layout measured every text box and took most of the report's time.
    ``gap_h`` is the room under a panel for its tick labels (rotated arm names need ~1.5 in)."""
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    left, top, right, gap_w = 0.9, 0.9, 0.3, 0.9
    w = left + cols * ax_w + (cols - 1) * gap_w + right
    h = top + rows * ax_h + (rows - 1) * gap_h + gap_h
    fig = Figure(figsize=(w, h))
    grid = {
        "left": left / w,
        "right": 1 - right / w,
        "top": 1 - top / h,
        "bottom": gap_h / h,
        "wspace": gap_w / ax_w,
        "hspace": gap_h / ax_h,
    }
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=grid).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(ax, text: str) -> None:
    # an explicit y skips matplotlib's search for a free spot above the axes (slow, and not needed)
    ax.set_title(text, fontsize=9, y=1.0, pad=4)


def _finish(fig: Figure, axes: list, title: str, path: Path) -> Path:
    """One legend for the figure (entries merged over panels) in a column widened to fit, the
    title, then save."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        grid = axes[0].get_subplotspec().get_gridspec()
        w, h = fig.get_size_inches()
        # about 0.07 in a character at 8 pt, plus the legend handle: widen the figure to fit
        legend_w = 0.9 + 0.07 * max(len(label) for label in entries)
        new_w = w - (1 - grid.right) * w + legend_w
        fig.set_size_inches(new_w, h)
        grid.update(left=grid.left * w / new_w, right=1 - legend_w / new_w)
        for ax in fig.axes:  # GridSpec.update moves only pyplot-managed axes; place ours
            ax.set_position(ax.get_subplotspec().get_position(fig))
        fig.legend(
            list(entries.values()),
            list(entries),
            loc="upper left",
            bbox_to_anchor=(grid.right + 0.1 / new_w, grid.top),
            fontsize=8,
            frameon=False,
        )
    fig.suptitle(title)
    # no Software/date metadata: the same results give the same file
    fig.savefig(path, dpi=90, metadata={"Software": None})
    return path


def plot_peak_memory(tables: list[Table], path: Path) -> Path | None:
    panels = [t for t in tables if any(a.values("peak_memory_bytes") for a in t.arms)]
    if not panels:
        return None
    colors = _method_colors(tables)
    fig, axes = _grid(len(panels))
    for ax, t in zip(axes, panels):
        arms = [a for a in t.arms if a.method != "base"]
        stats = [
            _mean_sd([v / 2**30 for v in a.values("peak_memory_bytes")]) if a.values("peak_memory_bytes") else None
            for a in arms
        ]
        top = max(s[0] for s in stats if s)
        done = [x for x, s in enumerate(stats) if s]
        ax.bar(
            done,
            [stats[x][0] for x in done],
            yerr=[stats[x][1] or 0 for x in done],
            capsize=3,
            color=[colors[arms[x].method] for x in done],
        )
        for x, a in enumerate(arms):
            if stats[x] is None:
                # nothing measured: a hatched placeholder says why instead of a silent gap
                oom = any(r["status"] == "oom" for r in a.runs)
                ax.bar(x, top, color="none", edgecolor=colors[a.method], hatch="//", label="did not finish")
                ax.text(x, top / 2, "OOM" if oom else "failed", ha="center", va="center", rotation=90, fontsize=8)
        for method in dict.fromkeys(arms[x].method for x in done):  # legend: one patch per method
            ax.bar(0, 0, color=colors[method], label=METHOD_LABEL.get(method, method))
        ax.set_xticks(range(len(arms)), [a.label for a in arms], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("peak training memory (GiB)")
        _title(ax, t.title)
    return _finish(fig, axes, "Peak training memory by arm and rank (mean ± sd over seeds)", path)


def _acc_interval(arm: Arm, task: str = "mmlu") -> tuple[float, float]:
    """Mean accuracy over seeds and a 95% half-width. Every seed answers the same questions, so
    the per-question noise (mean stderr^2) does not shrink with seeds; seed spread adds sd^2/k."""
    accs = arm.values(f"{task}_acc")
    mean, sd = _mean_sd(accs)
    ses = arm.values(f"{task}_stderr")
    var = (statistics.fmean([s**2 for s in ses]) if ses else 0.0) + (sd**2 / len(accs) if sd else 0.0)
    return mean, Z95 * math.sqrt(var)


def plot_mmlu_by_rank(tables: list[Table], path: Path) -> Path | None:
    panels = [t for t in tables if any(a.rank is not None and a.values("mmlu_acc") for a in t.arms)]
    if not panels:
        return None
    colors = _method_colors(tables)
    fig, axes = _grid(len(panels), gap_h=0.9)
    for ax, t in zip(axes, panels):
        ranked = [a for a in t.arms if a.rank is not None and a.values("mmlu_acc")]
        methods = list(dict.fromkeys(a.method for a in ranked))  # arms are already in method order
        for i, method in enumerate(methods):
            pts = [(a.rank, *_acc_interval(a)) for a in ranked if a.method == method]
            # nudge each method sideways a little so error bars at the same rank do not hide each other
            nudge = 2 ** (0.05 * (i - (len(methods) - 1) / 2))
            ax.errorbar(
                [p[0] * nudge for p in pts],
                [p[1] * 100 for p in pts],
                yerr=[p[2] * 100 for p in pts],
                marker="o",
                capsize=3,
                color=colors[method],
                label=METHOD_LABEL.get(method, method),
            )
        for a in t.arms:
            if a.method in ("full", "base") and a.values("mmlu_acc"):
                mean, half = _acc_interval(a)
                ax.axhline(
                    mean * 100, color=colors[a.method], linestyle="-" if a.method == "full" else "--", label=a.label
                )
                ax.axhspan((mean - half) * 100, (mean + half) * 100, color=colors[a.method], alpha=0.12)
        ranks = sorted({a.rank for a in ranked})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("rank")
        ax.set_ylabel("MMLU accuracy (%)")
        _title(ax, t.title)
    return _finish(fig, axes, "MMLU accuracy by rank (mean over seeds; bars and bands: 95% interval)", path)


def plot_cost_vs_accuracy(tables: list[Table], path: Path) -> Path | None:
    points, labels, methods = [], [], []
    several = len(tables) > 1
    for t in tables:
        for a in t.arms:
            cost, acc = a.values("cost_usd"), a.values("mmlu_acc")
            if cost and acc:
                points.append((statistics.fmean(cost), statistics.fmean(acc) * 100))
                labels.append(f"{t.key[0]} ({t.key[2]}): {a.label}" if several else a.label)
                methods.append(a.method)
    if not points:
        return None
    colors = _method_colors(tables)
    fig, (ax,) = _grid(1, ax_w=8.0, ax_h=5.0, gap_h=0.8)
    for (cost, acc), method in zip(points, methods):
        ax.scatter(cost, acc, color=colors[method], label=METHOD_LABEL.get(method, method), zorder=3)
    front = pareto_front(points)
    xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
    ax.plot(xs, ys, color="black", drawstyle="steps-post", linewidth=1, zorder=2)
    ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", label="Pareto front", zorder=4)
    mid = (min(xs) + max(xs)) / 2
    for i in front:  # labels point away from the nearer edge so they stay inside the axes
        left = points[i][0] > mid
        ax.annotate(
            labels[i],
            points[i],
            textcoords="offset points",
            xytext=(-8 if left else 8, -12),
            ha="right" if left else "left",
            fontsize=7,
        )
    costs = [p[0] for p in points]
    if min(costs) > 0 and max(costs) / min(costs) > 100:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:g}"))
    ax.set_xlabel("cost per run (USD)")
    ax.set_ylabel("MMLU accuracy (%)")
    return _finish(fig, [ax], "Cost vs MMLU accuracy per arm (mean over seeds); circled: Pareto front", path)


def plot_memory_breakdown(tables: list[Table], path: Path) -> Path | None:
    def breakdown(a: Arm) -> dict[str, float] | None:
        parts = [r["metrics"].get("memory_breakdown_bytes") for r in a.ok]
        parts = [p for p in parts if isinstance(p, dict)]
        if not parts:
            return None
        return {k: statistics.fmean([p.get(k) or 0 for p in parts]) / 2**30 for k in BREAKDOWN}

    panels = [(t, [(a, b) for a in t.arms if (b := breakdown(a))]) for t in tables]
    panels = [(t, arms) for t, arms in panels if arms]
    if not panels:
        return None
    colors = dict(zip(BREAKDOWN, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:gray")))
    fig, axes = _grid(len(panels))
    for ax, (t, arms) in zip(axes, panels):
        bottoms = [0.0] * len(arms)
        for part in BREAKDOWN:
            heights = [b[part] for _, b in arms]
            ax.bar(range(len(arms)), heights, bottom=bottoms, color=colors[part], label=part.replace("_", " "))
            bottoms = [x + h for x, h in zip(bottoms, heights)]
        ax.set_xticks(range(len(arms)), [a.label for a, _ in arms], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("training memory (GiB)")
        _title(ax, t.title)
    return _finish(fig, axes, "Training memory breakdown (mean over seeds)", path)


def plot_loss_curves(tables: list[Table], path: Path) -> Path | None:
    panels = [t for t in tables if any(r["metrics"].get("loss_curve") for a in t.arms for r in a.ok)]
    if not panels:
        return None
    colors = _arm_colors(tables)
    fig, axes = _grid(len(panels), gap_h=0.9)
    for ax, t in zip(axes, panels):
        for a in t.arms:
            for r in a.ok:  # one line per seed, one legend entry per arm
                curve = r["metrics"].get("loss_curve") or []
                if curve:
                    ax.plot(
                        [p[0] for p in curve],
                        [p[1] for p in curve],
                        color=colors[a.label],
                        linewidth=1,
                        alpha=0.8,
                        label=a.label,
                    )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        _title(ax, t.title)
    return _finish(fig, axes, "Training loss curves (one line per seed)", path)


def _model_size(t: Table) -> float | None:
    sizes = [(r.get("model") or {}).get("total_params") or r["metrics"].get("total_params") for r in t.runs]
    sizes = [s for s in sizes if s]
    return max(sizes) if sizes else None


def plot_scaling(tables: list[Table], path: Path) -> Path | None:
    """Peak memory and MMLU gap against model size, one line per arm; a pair of panels per
    data set and hardware (only those that ran more than one model size)."""
    by_setting: dict[tuple[str, str], list[tuple[float, Table]]] = defaultdict(list)
    for t in tables:
        size = _model_size(t)
        if size:
            by_setting[(t.key[1], t.key[2])].append((size, t))
    settings = [k for k in sorted(by_setting) if len({s for s, _ in by_setting[k]}) > 1]
    if not settings:
        return None
    colors = _arm_colors(tables)
    fig, axes = _grid(2 * len(settings), cols=2, ax_w=5.0, ax_h=3.2, gap_h=0.9)
    for (data, hardware), ax_mem, ax_gap in zip(settings, axes[::2], axes[1::2]):
        memory: dict[str, list] = defaultdict(list)
        gap: dict[str, list] = defaultdict(list)
        sizes = set()
        for size, t in sorted(by_setting[(data, hardware)], key=lambda st: (st[0], st[1].key)):
            sizes.add(size)
            for a in t.arms:
                if a.values("peak_memory_bytes"):
                    memory[a.label].append((size, statistics.fmean(a.values("peak_memory_bytes")) / 2**30))
                if (g := t.gaps.get((a.key, "mmlu"))) is not None:
                    gap[a.label].append((size, g["gap"] * 100))
        for ax, series, ylabel in (
            (ax_mem, memory, "peak training memory (GiB)"),
            (ax_gap, gap, "MMLU gap vs full FT (pp)"),
        ):
            for label, pts in series.items():
                ax.plot(*zip(*pts), marker="o", color=colors[label], label=label)
            ax.set_xscale("log")
            ax.set_xticks(sorted(sizes), [fmt_count([s]) for s in sorted(sizes)])
            ax.minorticks_off()
            ax.set_xlabel("model size (total parameters)")
            ax.set_ylabel(ylabel)
        ax_gap.axhline(0, color="black", linewidth=0.8)
        _title(ax_mem, f"Peak memory, {data} ({hardware})")
        _title(ax_gap, f"MMLU gap (negative: PEFT worse), {data} ({hardware})")
    return _finish(fig, axes, "Scaling with model size", path)


PLOTS: tuple[tuple[str, str, Callable[[list[Table], Path], Path | None]], ...] = (
    ("peak_memory.png", "Peak training memory by arm and rank", plot_peak_memory),
    (
        "mmlu_by_rank.png",
        "MMLU accuracy by rank, with full fine-tuning and base model as references",
        plot_mmlu_by_rank,
    ),
    ("cost_vs_accuracy.png", "Cost vs accuracy, Pareto front circled", plot_cost_vs_accuracy),
    ("memory_breakdown.png", "Training memory breakdown", plot_memory_breakdown),
    ("loss_curves.png", "Training loss curves", plot_loss_curves),
    ("scaling.png", "Scaling with model size", plot_scaling),
)


# ---------------------------------------------------------------- HTML


STYLE = (
    "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}"
    "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .6em;"
    "text-align:left;vertical-align:top;font-size:.9em}th{background:#f3f3f3}"
    ".prov,.note{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #eee}</style>"
)


def _html(tables: list[RenderedTable], plots: list[tuple[str, str]], skipped: list[str]) -> str:
    e = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>PEFT vs full fine-tuning report</title>",
        STYLE,
        "</head><body>",
        "<h1>PEFT vs full fine-tuning: at a glance</h1>",
    ]
    if not tables:
        out.append("<p>No run records found.</p>")
    for t in tables:
        out.append(f"<h2>{e(t.title)}</h2>")
        out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr></thead><tbody>")
        for row in t.rows:
            out.append(f"<tr><th>{e(row[0])}</th>" + "".join(f"<td>{e(c)}</td>" for c in row[1:]) + "</tr>")
        out.append("</tbody></table>")
        out.append(f'<p class="prov">{e(t.provenance)}</p>')
        if t.notes:
            out.append('<p class="note">Not in the aggregates:</p><ul class="note">')
            out += [f"<li>{e(n)}</li>" for n in t.notes]
            out.append("</ul>")
    if tables:
        out.append(f'<p class="note">{e(GAP_NOTE)}</p>')
    if plots:
        out.append("<h2>Plots</h2>")
        for name, caption in plots:
            out.append(
                f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
            )
    out.append(
        '<h2>Tables</h2><p><a href="runs.csv">runs.csv</a> (one row per run), '
        '<a href="arms.csv">arms.csv</a> (one row per arm, mean and sd over seeds), '
        f'<a href="{AT_A_GLANCE}">{AT_A_GLANCE}</a></p>'
    )
    if skipped:
        out.append("<h2>Skipped records</h2><ul>" + "".join(f"<li>{e(s)}</li>" for s in skipped) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- entry points


def _load(results_dir: Path) -> tuple[list[dict], list[str]]:
    """Valid records, and the names of the files that were skipped (iter_records warned)."""
    records, seen = [], set()
    for path, rec in iter_records(results_dir):
        records.append(rec)
        seen.add(path.name)
    skipped = []
    for path in sorted(p for p in results_dir.glob("*.json") if p.name not in seen):
        try:
            load_record(path)
            continue  # a whole record written by a running job after the first pass: the next build has it
        except RecordError as exc:
            reason = str(exc).replace(f"{path}: ", "")  # no folder in the report: it moves with the results
        skipped.append(f"{path.name}: {reason}")
    return records, skipped


def build_report(results_dir: str | Path, reports_dir: str | Path, estimate_models: list[str] | None = None,
                 estimate_hardware: str | None = None, estimate_tokens: int | None = None) -> dict[str, Path]:
    """Write the report for the records in ``results_dir`` into ``reports_dir``.

    Returns the written files by name (``at-a-glance.md``, ``runs.csv``, ``arms.csv``,
    ``index.html`` and each plot that had data)."""
    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    records, skipped = _load(results_dir)
    if skipped:
        log.warning("%d record file(s) skipped; the report lists them", len(skipped))
    if not records:
        log.warning("no valid run records in %s", results_dir)
    tables = _group(records, results_dir)
    rendered = [_render(t) for t in tables]

    reports_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written[AT_A_GLANCE] = reports_dir / AT_A_GLANCE
    written[AT_A_GLANCE].write_text(_markdown(rendered, skipped))
    for name, frame in (("runs.csv", _runs_frame(tables)), ("arms.csv", _arms_frame(tables))):
        written[name] = reports_dir / name
        frame.to_csv(written[name], index=False, lineterminator="\n")

    plots = []
    for name, caption, plot in PLOTS:
        target = reports_dir / name
        if plot(tables, target) is None:
            # remove a stale plot from an earlier build, so index.html never shows old data
            target.unlink(missing_ok=True)
            log.info("skipping %s: no data for it in the records", name)
            continue
        written[name] = target
        plots.append((name, caption))
    written["index.html"] = reports_dir / "index.html"
    written["index.html"].write_text(_html(rendered, plots, skipped))
    from harness.estimate_report import write_estimates  # estimated sections, labelled as such

    written.update(write_estimates(records, reports_dir, results_dir, estimate_models, estimate_hardware,
                                   estimate_tokens))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="folder of run records (default: results)")
    parser.add_argument("--reports", default="reports", help="folder to write the report into (default: reports)")
    parser.add_argument("--estimate-models", default="", help="comma-separated models (e.g. llama-2-13b-arch) "
                        "for an 'estimated at scale' table from harness-estimate")
    parser.add_argument("--estimate-hardware", default="a100-80gb", help="hardware of that table (default: a100-80gb)")
    parser.add_argument("--estimate-tokens", type=int, default=None, help="training tokens it prices (default: 1e8)")
    args = parser.parse_args(argv)
    # warnings about skipped records must reach the user: log to stderr
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not Path(args.results).is_dir():
        parser.error(f"--results {args.results!r} is not a folder; pass the folder holding the run records")
    models = [m for m in args.estimate_models.split(",") if m]
    from harness.estimate_report import check_args

    if problem := check_args(models, args.estimate_hardware):
        parser.error(problem)
    written = build_report(args.results, args.reports, models, args.estimate_hardware, args.estimate_tokens)
    print(f"at-a-glance table: {written[AT_A_GLANCE]}")
    print(f"full report: {written['index.html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
