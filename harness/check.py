"""harness-check: fail CI when the PEFT-vs-full accuracy gap regresses against a baseline.

    harness-check --baseline results/baselines/peft-gap.json [--results results]
                  [--metrics mmlu,indomain] [--floor-pp 1.0] [--z 2.0] [--update-baseline]

Per comparable group (same model, data, eval settings, method, rank; seeds averaged) and metric:

    regression  <=>  current_gap < baseline_gap - tolerance
    tolerance    =   max(floor_pp / 100, z * sqrt(se_baseline^2 + se_current^2))

A gap is ``acc(peft) - acc(full)`` (see harness/stats.py), so a narrowing gap is never a regression.
Exit codes: 0 no regression; 1 one or more regressions; 2 cannot judge (baseline missing or
invalid, nothing comparable, a baseline group without current results, eval settings or lm-eval
version differ). The gate fails closed: when in doubt it does not pass.

``--update-baseline`` writes the baseline from the current results (only when asked) and records
what it was made from. The markdown table goes to stdout and, when set, to $GITHUB_STEP_SUMMARY.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.records import _atomic_write_bytes, load_records
from harness.stats import TASKS, group_label, pair_gaps, seed_summary

BASELINE_SCHEMA = 1
BASELINE_KIND = "harness-peft-gap-baseline"
GROUP_FIELDS = ("key", "model", "data", "eval", "method", "rank", "metric", "gap", "se", "n_seeds", "seeds", "lm_eval")


class CannotJudge(Exception):
    """The gate cannot compare (exit 2); the message is the one line saying why."""


# ---------------------------------------------------------------- current results


def current_groups(results_dir: Path, metrics: list[str]) -> tuple[list[dict], list[dict]]:
    """(seed-averaged gap rows in baseline form, the ok records they came from)."""
    if not results_dir.is_dir():
        raise CannotJudge(f"results dir {results_dir} does not exist")
    records = load_records(results_dir)
    rows = []
    for row in seed_summary(pair_gaps(records, results_dir)):
        if row["task"] not in metrics:
            continue
        rows.append(
            {
                "key": row["key"],
                "model": row["model"],
                "data": row["data"],
                "eval": row["eval"],
                "method": row["method"],
                "rank": row["rank"],
                "metric": row["task"],
                "gap": row["gap"],
                "se": row["se"],
                "sd": row["sd"],
                "n_seeds": row["n_seeds"],
                # JSON object keys are strings; keep current rows in the same form as a loaded baseline
                "seeds": {str(s): g for s, g in row["seeds"].items()},
                "paired": row["paired"],
                "lm_eval": row["lm_eval"],
                "run_ids": row["run_ids"],
            }
        )
    used = {rid for row in rows for rid in row["run_ids"]}
    return rows, [r for r in records if r["run_id"] in used]


# ---------------------------------------------------------------- baseline file


def _distinct(values: list[Any]) -> Any:
    """One value when all agree, else the sorted distinct values (so disagreement is visible)."""
    uniq = sorted({json.dumps(v, sort_keys=True) for v in values})
    out = [json.loads(v) for v in uniq]
    return out[0] if len(out) == 1 else out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_baseline(rows: list[dict], records: list[dict], results_dir: Path) -> dict:
    envs = [r.get("env") or {} for r in records]
    packages = sorted({pkg for e in envs for pkg in (e.get("versions") or {})})
    return {
        "schema": BASELINE_SCHEMA,
        "kind": BASELINE_KIND,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "made_from": {
            "results_dir": str(results_dir),
            "git_commit": _git_commit(),  # the checkout that wrote the baseline
            "record_git_commits": _distinct([e.get("git_commit") for e in envs]),
            "versions": {p: _distinct([(e.get("versions") or {}).get(p) for e in envs]) for p in packages},
            "device": _distinct([e.get("device") for e in envs]),
            "device_name": _distinct([e.get("device_name") for e in envs]),
            "eval": _distinct([row["eval"] for row in rows]),
            "run_ids": sorted(r["run_id"] for r in records),
        },
        "groups": [{k: row[k] for k in (*GROUP_FIELDS, "sd", "paired")} for row in rows],
    }


def write_baseline(path: Path, baseline: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(baseline, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def load_baseline(path: Path) -> dict:
    """The parsed baseline, or CannotJudge naming what is wrong with it."""
    if not path.exists():
        raise CannotJudge(f"baseline {path} does not exist (create it with --update-baseline)")
    try:
        baseline = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CannotJudge(f"baseline {path} is unreadable: {exc}") from exc
    if not isinstance(baseline, dict):
        raise CannotJudge(f"baseline {path} is not a JSON object")
    if baseline.get("schema") != BASELINE_SCHEMA:
        raise CannotJudge(f"baseline {path} has schema {baseline.get('schema')!r}; expected {BASELINE_SCHEMA}")
    groups = baseline.get("groups")
    if not isinstance(groups, list):
        raise CannotJudge(f"baseline {path} has no 'groups' list")
    for i, g in enumerate(groups):
        missing = [f for f in GROUP_FIELDS if not isinstance(g, dict) or f not in g]
        if missing:
            raise CannotJudge(f"baseline {path} group {i} lacks {', '.join(missing)}")
        if not _is_number(g["gap"]) or not (g["se"] is None or _is_number(g["se"])):
            raise CannotJudge(f"baseline {path} group {i} ({g['key']}): gap/se are not numbers")
        if not isinstance(g["eval"], dict) or not isinstance(g["lm_eval"], list) or not isinstance(g["method"], str):
            raise CannotJudge(f"baseline {path} group {i}: eval must be an object, lm_eval a list, method a string")
        if g["metric"] not in TASKS:
            raise CannotJudge(f"baseline {path} group {i}: metric {g['metric']!r} is not one of {', '.join(TASKS)}")
    return baseline


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------- comparison


def tolerance(se_base: float | None, se_cur: float | None, floor_pp: float, z: float) -> float:
    """max(floor, z * combined se); an unknown se leaves only the floor (stricter, not looser)."""
    floor = floor_pp / 100
    if se_base is None or se_cur is None:
        return floor
    return max(floor, z * math.sqrt(se_base**2 + se_cur**2))


def _loose(row: dict) -> tuple[str, str]:
    return group_label(row, with_eval=False), row["metric"]


def _eval_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: baseline {a.get(k)!r} vs current {b.get(k)!r}" for k in keys)


def compare(base_rows: list[dict], cur_rows: list[dict], floor_pp: float, z: float) -> tuple[list[dict], list[str]]:
    """(table rows with verdicts, reasons the gate cannot judge)."""
    current = {(r["key"], r["metric"]): r for r in cur_rows}
    current_loose: dict[tuple[str, str], list[dict]] = {}
    for r in cur_rows:
        current_loose.setdefault(_loose(r), []).append(r)

    table, problems, matched = [], [], set()
    for b in base_rows:
        label, metric = _loose(b)
        row = {"group": b["key"], "metric": metric, "baseline": b["gap"], "current": None, "tolerance": None}
        cur = current.get((b["key"], metric))
        if cur is None:
            others = current_loose.get((label, metric), [])
            if others:
                row["verdict"] = "eval settings differ"
                problems.append(
                    f"eval settings differ for {label} {metric}: {_eval_diff(b['eval'], others[0]['eval'])}"
                )
                matched.update((o["key"], o["metric"]) for o in others)
            else:
                row["verdict"] = "no current result"
                problems.append(f"no ok paired PEFT/full result for baseline group {b['key']} {metric}")
            table.append(row)
            continue
        matched.add((cur["key"], metric))
        row["current"] = cur["gap"]
        if sorted(b["lm_eval"]) != sorted(cur["lm_eval"]):
            row["verdict"] = "lm-eval version differs"
            problems.append(
                f"lm-eval version differs for {b['key']} {metric}: baseline {b['lm_eval']} vs current {cur['lm_eval']}"
            )
            table.append(row)
            continue
        tol = tolerance(b["se"], cur["se"], floor_pp, z)
        row["tolerance"] = tol
        if cur["gap"] < b["gap"] - tol:
            row["verdict"] = "REGRESSION"
        elif cur["gap"] > b["gap"]:
            row["verdict"] = "ok (narrower)"
        else:
            row["verdict"] = "ok"
        table.append(row)

    for (key, metric), cur in sorted(current.items()):
        if (key, metric) not in matched:
            table.append(
                {
                    "group": key,
                    "metric": metric,
                    "baseline": None,
                    "current": cur["gap"],
                    "tolerance": None,
                    "verdict": "new (no baseline)",
                }
            )
    settings_differ = any(r["verdict"] in ("eval settings differ", "lm-eval version differs") for r in table)
    if not any(r["tolerance"] is not None for r in table) and not settings_differ:
        # the specific reasons follow; this one says why nothing at all was judged
        problems.insert(0, "nothing comparable: no group is in both the baseline and the current results")
    return table, problems


def _pp(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f} pp" if signed else f"{100 * x:.2f} pp"


def markdown(table: list[dict], verdict: str) -> str:
    lines = [
        "### PEFT vs full fine-tuning: accuracy gap check",
        "",
        "Gap = acc(PEFT) − acc(full); a regression is a gap more negative than baseline − tolerance.",
        "",
        "| group | metric | baseline gap | current gap | tolerance | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['group'].replace('|', '/')} | {r['metric']} | {_pp(r['baseline'])} | {_pp(r['current'])} | "
            f"{_pp(r['tolerance'], signed=False)} | {r['verdict']} |"
        )
    return "\n".join([*lines, "", f"**{verdict}**", ""])


def _publish(text: str) -> None:
    print(text)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as fh:
            fh.write(text + "\n")


# ---------------------------------------------------------------- command line


def _metrics(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in TASKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: metrics must be a comma list of {', '.join(TASKS)}")
    return names


def _non_negative(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"{value!r} is not a non-negative number")
    return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="harness-check", description="Fail when the PEFT-vs-full accuracy gap regresses against a baseline."
    )
    p.add_argument("--baseline", required=True, type=Path, help="baseline JSON (written by --update-baseline)")
    p.add_argument("--results", default=Path("results"), type=Path, help="folder of run records (default: results)")
    p.add_argument("--metrics", default=list(TASKS), type=_metrics, help="comma list of mmlu,indomain (default: both)")
    p.add_argument(
        "--floor-pp", default=1.0, type=_non_negative, help="smallest tolerance, in percentage points (default 1.0)"
    )
    p.add_argument(
        "--z", default=2.0, type=_non_negative, help="tolerance in standard errors of the gap difference (default 2.0)"
    )
    p.add_argument(
        "--update-baseline", action="store_true", help="write the baseline from the current results instead of checking"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cur_rows, records = current_groups(args.results, args.metrics)
        if args.update_baseline:
            if not cur_rows:
                raise CannotJudge(f"no paired PEFT/full results in {args.results} to make a baseline from")
            write_baseline(args.baseline, build_baseline(cur_rows, records, args.results))
            table = [
                {
                    "group": r["key"],
                    "metric": r["metric"],
                    "baseline": r["gap"],
                    "current": r["gap"],
                    "tolerance": None,
                    "verdict": f"baselined ({r['n_seeds']} seed(s))",
                }
                for r in cur_rows
            ]
            _publish(markdown(table, f"baseline written to {args.baseline}"))
            return 0
        baseline = load_baseline(args.baseline)
        base_rows = [g for g in baseline["groups"] if g["metric"] in args.metrics]
        table, problems = compare(base_rows, cur_rows, args.floor_pp, args.z)
    except CannotJudge as exc:
        print(f"harness-check: cannot judge: {exc}", file=sys.stderr)
        return 2

    regressions = [r for r in table if r["verdict"] == "REGRESSION"]
    if problems:
        verdict = f"cannot judge: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
    elif regressions:
        verdict = f"{len(regressions)} regression(s)"
    else:
        verdict = "no regression"
    _publish(markdown(table, verdict))
    for r in regressions:
        print(
            f"regression: {r['group']} {r['metric']}: gap {_pp(r['current'])} vs baseline {_pp(r['baseline'])} "
            f"(tolerance {_pp(r['tolerance'], signed=False)})",
            file=sys.stderr,
        )
    if problems:
        print(f"harness-check: {verdict}", file=sys.stderr)
        return 2
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
