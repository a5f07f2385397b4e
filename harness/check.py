"""harness-check: fail CI when the PEFT-vs-full accuracy gap regresses against a baseline.

    harness-check --baseline results/baselines/ci-smoke.json [--results results]
                  [--metrics mmlu,indomain] [--floor-pp 1.0] [--z 2.0] [--reference RUN_ID]
                  [--update-baseline]

Groups are identity.gap_key: every setting but the seed (model, data, training, eval, hardware,
distributed, the PEFT arm's settings and the full reference's); seeds of a group are pooled. The
baseline keeps, per group and metric, the hash and number of its questions, whether it was
paired, and, in ``<baseline>.answers.json`` beside it, every seed's per-question answers of both
arms. The current run is compared with it question by question on the same questions:

    x_i        = dbar_cur_i - dbar_base_i     (d = correct_peft - correct_full, averaged over seeds)
    change     = mean_i x_i  = current gap - baseline gap
    var change = (1/k + 1/K) * v_seed          k current seeds, K baseline seeds
    regression <=> change < -max(floor_pp / 100, z * sqrt(var change))

Question noise cancels (the same questions on both sides); what is left is how far a rerun moves
on its own: ``v_seed`` (harness/stats.py) from the baseline's K seeds, never below the per-question
flip noise; from the current seeds when the baseline has one; with one seed on each side, from the
paired differences themselves, ``var_i(x_i) / n`` (training noise then not estimated: said so).

Exit codes: 0 no regression; 1 a regression; 2 cannot judge, which wins over 1: the baseline is
missing or invalid; a baseline group has no current result; the current run answered other or
fewer questions, or is unpaired where the baseline is paired; settings or the lm-eval version
differ; several full fine-tuning runs share a pair and none was named with ``--reference``.
A group that is new (no baseline) is shown and does not fail.

``--update-baseline`` writes the baseline and its answers file from the current results (only when
asked), naming the package versions, constraints file and commit they were made with. The markdown
table goes to stdout and, when set, to $GITHUB_STEP_SUMMARY.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import identity
from harness.records import _atomic_write_bytes, load_records
from harness.stats import TASKS, pair_gaps, record_tasks, seed_noise, seed_summary

BASELINE_SCHEMA = 2
BASELINE_KIND = "harness-peft-gap-baseline"
GROUP_FIELDS = ("key", "group", "model", "data", "method", "rank", "metric", "settings", "gap", "sd", "v_seed",
                "n_seeds", "seeds", "paired", "n", "questions", "lm_eval")
CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"


class CannotJudge(Exception):
    """The gate cannot compare (exit 2); the message is the one line saying why."""


# ---------------------------------------------------------------- current results


def current_groups(results_dir: Path, metrics: list[str], references: list[str],
                   tuned: bool = False) -> tuple[list[dict], list[dict]]:
    """(seed-averaged gap rows in baseline form, the ok records they came from). ``tuned``: only
    each grid's validation-chosen arm (harness.report.tuned), so a tuned sweep is judged best
    against best."""
    if not results_dir.is_dir():
        raise CannotJudge(f"results dir {results_dir} does not exist")
    records = load_records(results_dir)
    if tuned:
        from harness.report.tuned import chosen_records

        records = chosen_records(records, results_dir)
    _, ambiguous = identity.full_references([r for r in records if r["status"] == "ok"], references)
    if ambiguous:
        run_ids = next(iter(sorted(ambiguous.values())))
        raise CannotJudge(
            f"several full fine-tuning runs share one pair ({', '.join(run_ids)}): name the reference with --reference"
        )
    rows = []
    for row in seed_summary(pair_gaps(records, results_dir, references)):
        if row["task"] not in metrics:
            continue
        rows.append(
            {
                **{k: row[k] for k in GROUP_FIELDS if k not in ("metric", "seeds")},
                "metric": row["task"],
                # JSON object keys are strings; keep current rows in the same form as a loaded baseline
                "seeds": {str(s): g for s, g in row["seeds"].items()},
                "answers": {str(s): a for s, a in (row["answers"] or {}).items()},
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


def answers_path(baseline: Path) -> Path:
    return baseline.with_name(baseline.name.removesuffix(".json") + ".answers.json")


def _bits(values: list[bool]) -> str:
    return "".join("1" if v else "0" for v in values)


def build_baseline(rows: list[dict], records: list[dict], results_dir: Path, baseline: Path) -> tuple[dict, dict]:
    """(baseline, answers file): the answers as one "0101…" string per arm and seed."""
    unpaired = [r for r in rows if not r["paired"]]
    if unpaired:
        raise CannotJudge(f"{unpaired[0]['key']} {unpaired[0]['metric']} has no per-question answers; "
                          "a baseline needs them (the items files beside the records)")
    envs = [r.get("env") or {} for r in records]
    packages = sorted({pkg for e in envs for pkg in (e.get("versions") or {})})
    constraints = CONSTRAINTS.read_bytes() if CONSTRAINTS.exists() else None
    base = {
        "schema": BASELINE_SCHEMA,
        "kind": BASELINE_KIND,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "answers_file": answers_path(baseline).name,
        "made_from": {
            "results_dir": str(results_dir),
            "git_commit": _git_commit(),  # the checkout that wrote the baseline
            "record_git_commits": _distinct([e.get("git_commit") for e in envs]),
            "versions": {p: _distinct([(e.get("versions") or {}).get(p) for e in envs]) for p in packages},
            "constraints_sha256": hashlib.sha256(constraints).hexdigest() if constraints else None,
            "device": _distinct([e.get("device") for e in envs]),
            "device_name": _distinct([e.get("device_name") for e in envs]),
            "run_ids": sorted(r["run_id"] for r in records),
        },
        "groups": [{k: row[k] for k in GROUP_FIELDS} for row in rows],
    }
    answers = {
        "schema": BASELINE_SCHEMA,
        "groups": {
            f"{row['group']}/{row['metric']}": {
                "ids": next(iter(row["answers"].values()))["ids"],
                "targets": next(iter(row["answers"].values()))["targets"],
                "seeds": {s: {"peft": _bits(a["peft"]), "full": _bits(a["full"])} for s, a in row["answers"].items()},
            }
            for row in rows
        },
    }
    return base, answers


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def load_baseline(path: Path) -> dict:
    """The parsed baseline with each group's ``answers`` ({seed: {peft, full}}) attached, or
    CannotJudge naming what is wrong with it."""
    baseline = _read_json(path, "baseline", hint=" (create it with --update-baseline)")
    if baseline.get("schema") != BASELINE_SCHEMA:
        raise CannotJudge(f"baseline {path} has schema {baseline.get('schema')!r}; expected {BASELINE_SCHEMA} "
                          "(remake it with --update-baseline)")
    groups = baseline.get("groups")
    if not isinstance(groups, list):
        raise CannotJudge(f"baseline {path} has no 'groups' list")
    for i, g in enumerate(groups):
        missing = [f for f in GROUP_FIELDS if not isinstance(g, dict) or f not in g]
        if missing:
            raise CannotJudge(f"baseline {path} group {i} lacks {', '.join(missing)}")
        if not _is_number(g["gap"]) or not isinstance(g["seeds"], dict) or not g["seeds"]:
            raise CannotJudge(f"baseline {path} group {i} ({g['key']}): gap is not a number or seeds are missing")
        if not isinstance(g["metric"], str) or not g["metric"]:
            raise CannotJudge(f"baseline {path} group {i}: metric {g['metric']!r} is not a task name")
    apath = path.parent / str(baseline.get("answers_file") or answers_path(path).name)
    answers = _read_json(apath, "baseline answers file").get("groups")
    for i, g in enumerate(groups):
        a = (answers or {}).get(f"{g['group']}/{g['metric']}")
        if not isinstance(a, dict) or set(a.get("seeds") or {}) != set(g["seeds"]):
            raise CannotJudge(f"baseline answers {apath} lack the per-question answers of group {i} ({g['key']})")
        try:
            g["answers"] = {
                s: {"ids": a["ids"], "targets": a["targets"], "peft": [c == "1" for c in v["peft"]],
                    "full": [c == "1" for c in v["full"]]}
                for s, v in a["seeds"].items()
            }
        except (KeyError, TypeError) as exc:
            raise CannotJudge(f"baseline answers {apath} group {i} ({g['key']}) is malformed: {exc}") from exc
        if any(len(v["peft"]) != g["n"] or len(v["full"]) != g["n"] for v in g["answers"].values()):
            raise CannotJudge(f"baseline answers {apath} group {i} ({g['key']}): not {g['n']} answers per arm")
    return baseline


def _read_json(path: Path, what: str, hint: str = "") -> dict:
    if not path.exists():
        raise CannotJudge(f"{what} {path} does not exist{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CannotJudge(f"{what} {path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise CannotJudge(f"{what} {path} is not a JSON object")
    return data


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------- comparison


def _diffs(answers: dict[str, dict]) -> list[list[int]]:
    return [[int(p) - int(f) for p, f in zip(a["peft"], a["full"])] for _, a in sorted(answers.items())]


def change_and_variance(base: dict, cur: dict) -> tuple[float, float, bool]:
    """(current gap - baseline gap over the same questions, its variance, training noise estimated?).

    See the module docstring for the formula.
    """
    d_base, d_cur = _diffs(base["answers"]), _diffs(cur["answers"])
    K, k, n = len(d_base), len(d_cur), len(d_base[0])
    x = [sum(d[i] for d in d_cur) / k - sum(d[i] for d in d_base) / K for i in range(n)]
    change = sum(x) / n
    if K > 1:
        v_seed = seed_noise(d_base)["v_seed"]
    elif k > 1:
        v_seed = seed_noise(d_cur)["v_seed"]
    else:  # one seed each side: the paired differences of the two runs alone
        return change, sum((xi - change) ** 2 for xi in x) / (n - 1) / n if n > 1 else 0.0, False
    return change, (1 / k + 1 / K) * v_seed, True


def tolerance(variance: float, floor_pp: float, z: float) -> float:
    return max(floor_pp / 100, z * math.sqrt(variance))


def _label(row: dict) -> tuple:
    """Same model, data, arm and metric: a group whose other settings may differ."""
    return (row["model"], row["data"], row["method"], row["rank"], row["metric"])


def _settings_diff(a: dict, b: dict) -> str:
    fields = identity.differing_fields([a, b])
    return ", ".join(
        f"{f}: baseline {identity.lookup(a, f)!r} vs current {identity.lookup(b, f)!r}" for f in fields[:4]
    ) + (f" (+{len(fields) - 4} more)" if len(fields) > 4 else "")


def _mismatch(b: dict, cur: dict) -> str | None:
    """Why ``cur`` cannot be compared with baseline group ``b`` question by question, or None."""
    what = f"{b['key']} {b['metric']}"
    if b["paired"] and not cur["paired"]:
        return f"{what}: current results are unpaired (no per-question answers) where the baseline is paired"
    if cur["n"] is not None and b["n"] is not None and cur["n"] < b["n"]:
        return f"{what}: current results answered fewer questions ({cur['n']}) than the baseline ({b['n']})"
    if cur["questions"] != b["questions"]:
        return f"{what}: current results answered other questions ({cur['n']}, hash {str(cur['questions'])[:8]}) " \
               f"than the baseline ({b['n']}, hash {str(b['questions'])[:8]})"
    return None


def compare(base_rows: list[dict], cur_rows: list[dict], floor_pp: float, z: float) -> tuple[list[dict], list[str]]:
    """(table rows with verdicts, reasons the gate cannot judge)."""
    current = {(r["group"], r["metric"]): r for r in cur_rows}
    by_label: dict[tuple, list[dict]] = {}
    for r in cur_rows:
        by_label.setdefault(_label(r), []).append(r)

    table, problems, matched = [], [], set()
    for b in base_rows:
        row = {"group": b["key"], "metric": b["metric"], "baseline": b["gap"], "base_seeds": b["n_seeds"],
               "current": None, "cur_seeds": None, "change": None, "tolerance": None}
        table.append(row)
        cur = current.get((b["group"], b["metric"]))
        if cur is None:
            others = by_label.get(_label(b), [])
            if others:
                matched.update((o["group"], o["metric"]) for o in others)
                reason = _mismatch(b, others[0])
                if reason is None:
                    reason = f"{b['key']} {b['metric']}: settings differ: {_settings_diff(b['settings'], others[0]['settings'])}"
                row["verdict"] = "settings or questions differ"
            else:
                reason = f"no ok paired PEFT/full result for baseline group {b['key']} {b['metric']}"
                row["verdict"] = "no current result"
            problems.append(reason)
            continue
        matched.add((cur["group"], b["metric"]))
        row.update(current=cur["gap"], cur_seeds=cur["n_seeds"])
        reason = _mismatch(b, cur)
        if reason is None and cur["n"] != b["n"]:
            reason = f"{b['key']} {b['metric']}: current results answered {cur['n']} questions, the baseline {b['n']}"
        if reason is None and sorted(b["lm_eval"]) != sorted(cur["lm_eval"]):
            reason = f"lm-eval version differs for {b['key']} {b['metric']}: baseline {b['lm_eval']} vs current {cur['lm_eval']}"
        if reason is not None:
            row["verdict"] = "cannot compare"
            problems.append(reason)
            continue
        change, variance, trained = change_and_variance(b, cur)
        tol = tolerance(variance, floor_pp, z)
        row.update(change=change, tolerance=tol)
        if change < -tol:
            row["verdict"] = "REGRESSION"
        elif change > 0:
            row["verdict"] = "ok (narrower)"
        else:
            row["verdict"] = "ok"
        if not trained:
            row["verdict"] += " (1 seed each side: training noise not estimated)"

    for (group, metric), cur in sorted(current.items()):
        if (group, metric) not in matched:
            table.append({"group": cur["key"], "metric": metric, "baseline": None, "base_seeds": None,
                          "current": cur["gap"], "cur_seeds": cur["n_seeds"], "change": None, "tolerance": None,
                          "verdict": "new (no baseline)"})
    if not base_rows:
        problems.insert(0, "nothing comparable: the baseline has no group for these metrics")
    return table, problems


def _pp(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f} pp" if signed else f"{100 * x:.2f} pp"


def _with_seeds(x: float | None, k: int | None) -> str:
    return _pp(x) if x is None or k is None else f"{_pp(x)} ({k} seed{'s' if k != 1 else ''})"


def markdown(table: list[dict], verdict: str) -> str:
    lines = [
        "### PEFT vs full fine-tuning: accuracy gap check",
        "",
        "Gap = acc(PEFT) − acc(full), seeds averaged; change = current − baseline gap on the same questions; "
        "a regression is a change below −tolerance.",
        "",
        "| group | metric | baseline gap | current gap | change | tolerance | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['group'].replace('|', '/')} | {r['metric']} | {_with_seeds(r['baseline'], r['base_seeds'])} | "
            f"{_with_seeds(r['current'], r['cur_seeds'])} | {_pp(r['change'])} | {_pp(r['tolerance'], signed=False)} | "
            f"{r['verdict']} |"
        )
    return "\n".join([*lines, "", f"**{verdict}**", ""])


def _publish(text: str) -> None:
    print(text)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as fh:
            fh.write(text + "\n")


def _version_note(baseline: dict, records: list[dict]) -> str | None:
    """Package versions of the current records that differ from the baseline's (a warning, not a failure)."""
    made = (baseline.get("made_from") or {}).get("versions") or {}
    diffs = []
    for pkg, ver in sorted(made.items()):
        cur = _distinct([((r.get("env") or {}).get("versions") or {}).get(pkg) for r in records]) if records else ver
        if cur != ver:
            diffs.append(f"{pkg} {ver} -> {cur}")
    return "package versions differ from the baseline's: " + ", ".join(diffs) if diffs else None


# ---------------------------------------------------------------- command line


def _metrics(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r}: metrics must be a comma list of tasks "
                                         f"({', '.join(TASKS)}, or lm-eval tasks of eval.tasks)")
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
        prog="harness-check", description="Fail when the PEFT-vs-full accuracy gap regresses against a baseline.",
        epilog="exit codes: 0 no regression; 1 a regression beyond the noise; 2 cannot judge (no baseline, missing arms, bad records). Docs: docs/gate.md",
    )
    p.add_argument("--baseline", required=True, type=Path, help="baseline JSON (written by --update-baseline)")
    p.add_argument("--results", default=Path("results"), type=Path, help="folder of run records (default: results)")
    p.add_argument("--metrics", default=list(TASKS), type=_metrics, help="comma list of tasks: mmlu, indomain, or lm-eval tasks of eval.tasks (default: mmlu,indomain)")
    p.add_argument(
        "--floor-pp", default=1.0, type=_non_negative, help="smallest tolerance, in percentage points (default 1.0)"
    )
    p.add_argument(
        "--z", default=2.0, type=_non_negative, help="tolerance in standard deviations of the change (default 2.0)"
    )
    p.add_argument("--reference", action="append", default=[], metavar="RUN_ID",
                   help="the full fine-tuning run to compare with where several share one pair (repeatable)")
    p.add_argument(
        "--update-baseline", action="store_true", help="write the baseline from the current results instead of checking"
    )
    p.add_argument("--tuned", action="store_true",
                   help="judge a tune=lr sweep best against best: each method at the rate its validation chose "
                        "(docs/tuning.md); make its baseline with --tuned too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cur_rows, records = current_groups(args.results, args.metrics, args.reference, args.tuned)
        scored = set(record_tasks(records))
        unknown = [m for m in args.metrics if m not in scored]
        if unknown:  # a name no run scored: a typo, or an lm-eval task the runs did not evaluate
            print(f"harness-check: error: --metrics {unknown[0]!r}: no run in {args.results} scored it; "
                  f"scored: {', '.join(sorted(scored))}", file=sys.stderr)
            return 2
        if args.update_baseline:
            if not cur_rows:
                raise CannotJudge(f"no paired PEFT/full results in {args.results} to make a baseline from")
            baseline, answers = build_baseline(cur_rows, records, args.results, args.baseline)
            _write_json(answers_path(args.baseline), answers)
            _write_json(args.baseline, baseline)
            table = [
                {"group": r["key"], "metric": r["metric"], "baseline": r["gap"], "base_seeds": r["n_seeds"],
                 "current": None, "cur_seeds": None, "change": None, "tolerance": None,
                 "verdict": f"baselined ({r['n_seeds']} seed(s), sd {_pp(r['sd'], signed=False)})"}
                for r in cur_rows
            ]
            _publish(markdown(table, f"baseline written to {args.baseline} and {answers_path(args.baseline)}"))
            return 0
        baseline = load_baseline(args.baseline)
        base_rows = [g for g in baseline["groups"] if g["metric"] in args.metrics]
        table, problems = compare(base_rows, cur_rows, args.floor_pp, args.z)
    except CannotJudge as exc:
        print(f"harness-check: cannot judge: {exc}", file=sys.stderr)
        return 2

    regressions = [r for r in table if r["verdict"].startswith("REGRESSION")]
    if problems:
        verdict = f"cannot judge: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
    elif regressions:
        verdict = f"{len(regressions)} regression(s)"
    else:
        verdict = "no regression"
    _publish(markdown(table, verdict))
    note = _version_note(baseline, records)
    if note:
        print(f"harness-check: note: {note}", file=sys.stderr)
    for r in regressions:
        print(
            f"regression: {r['group']} {r['metric']}: gap {_pp(r['current'])} vs baseline {_pp(r['baseline'])} "
            f"(change {_pp(r['change'])}, tolerance {_pp(r['tolerance'], signed=False)})",
            file=sys.stderr,
        )
    if problems:
        print(f"harness-check: {verdict}", file=sys.stderr)
        return 2
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
