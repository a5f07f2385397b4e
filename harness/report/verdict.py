"""The verdict: "which should we pick?" from the measured figures and the team's limits.

    harness-report --max-gap 1.0 --variants 20 --target-tokens 1e9 \\
                   --target-model llama-2-13b-arch --target-hardware a100-80gb --budget-usd 500
    harness-report --limits limits.yaml        # the same limits in a file (flags override it)

Per table (one model x data x hardware x settings) and one accuracy (``task``: in-domain where it
was measured, else MMLU, else the first task the records scored):

- each PEFT arm's gap against full fine-tuning with its 95% interval, judged against
  ``-max_gap`` (harness.stats.judge): *within*, *beyond* or *undecided*; for undecided, how many
  questions or seeds would decide it if the gap stayed where it is (harness.stats.to_decide);
- the training cost of every arm: at the measured rate (cost per real training token of the run,
  times ``target_tokens``) or, with a target model or hardware, harness-estimate's figure on the
  fewest devices the job fits (labelled estimated); judged against ``budget_usd``;
- serving ``variants`` variants: N full checkpoints against one base plus N adapters, computed
  from the footprint rows (labelled computed), with the latency overheads the probe measured;
- one recommendation in plain words, or *no verdict* saying why: random weights, failed reference,
  no accuracy, or too few questions to resolve ``max_gap`` at all (harness.stats.resolution).

Everything statistical comes from harness.stats; costs from the records or harness-estimate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from harness.report.fmt import DASH, fmt_bytes, fmt_usd
from harness.report.tables import TASK_LABEL, Arm, Table, failure_text, reference_arm, status_of, variant_entries
from harness.stats import BEYOND, UNDECIDED, WITHIN, judge, mean_sd, resolution, task_metric, to_decide

VERDICT_JSON = "verdict.json"
NO_VERDICT = "no verdict"
NOT_CHOSEN = "not chosen"  # an arm of a rate grid whose validation chose another rate
DEFAULT_ESTIMATE_TOKENS = 100_000_000


class LimitsError(ValueError):
    """A limits file or flag that cannot be used (one line, for a usage error)."""


@dataclass(frozen=True)
class Limits:
    max_gap: float = 1.0  # pp: the largest accuracy loss against full FT the team accepts
    variants: int = 1  # customer variants to serve
    target_tokens: float | None = None  # training tokens to price (default: each run's own)
    target_model: str | None = None  # a conf/model preset: estimate the cost there
    target_hardware: str | None = None  # a conf/hardware preset with a datasheet entry
    budget_usd: float | None = None  # the most one training run may cost
    task: str | None = None  # the accuracy judged (default: in-domain, else MMLU)

    def check(self) -> None:
        if not (isinstance(self.max_gap, (int, float)) and 0 < self.max_gap <= 100):
            raise LimitsError(f"max_gap={self.max_gap!r}: give the largest accepted loss in pp, above 0 (e.g. 1.0)")
        if not (isinstance(self.variants, int) and self.variants >= 1):
            raise LimitsError(f"variants={self.variants!r}: give a whole number of variants, at least 1")
        for name in ("target_tokens", "budget_usd"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise LimitsError(f"{name}={v!r}: give a positive number")

    @property
    def estimated(self) -> bool:
        return bool(self.target_model or self.target_hardware)


LIMIT_KEYS = tuple(f.name for f in fields(Limits))


def check_targets(limits: Limits, flags: tuple[str, str] = ("--target-model", "--target-hardware")) -> str | None:
    """One line naming a target model or hardware that conf/ (or the datasheet table) lacks, else None."""
    from harness.estimate import check_target

    return check_target(limits.target_model, limits.target_hardware, flags)


def load_limits(path: str | Path | None, overrides: dict | None = None) -> Limits:
    """Limits from a YAML file (keys: LIMIT_KEYS), then the flags that were given."""
    values: dict = {}
    if path:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LimitsError(f"--limits {path}: {exc}".splitlines()[0]) from exc
        if not isinstance(values, dict):
            raise LimitsError(f"--limits {path}: expected a mapping of {', '.join(LIMIT_KEYS)}")
        if unknown := sorted(set(values) - set(LIMIT_KEYS)):
            raise LimitsError(f"--limits {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(LIMIT_KEYS)}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(values.get("variants"), float) and values["variants"].is_integer():
        values["variants"] = int(values["variants"])
    limits = Limits(**values)
    limits.check()
    return limits


# ---------------------------------------------------------------- the pieces


def judged_task(table: Table, task: str | None) -> str | None:
    tasks = sorted({t for (_, t) in table.gaps})
    if task:
        return task
    for preferred in ("indomain", "mmlu"):
        if preferred in tasks:
            return preferred
    return (tasks or [None])[0]


def _task_label(task: str) -> str:
    return TASK_LABEL.get(task, task)


def _mean(values: list[float]) -> float | None:
    return mean_sd(values)[0] if values else None


def _estimate(arm: Arm, limits: Limits, results_dir: Path) -> dict:
    """harness-estimate at the target model and hardware, on the fewest devices the job fits."""
    from harness.config import UsageError
    from harness.report.estimate_report import estimate_on_fewest_devices

    rec = (arm.ok or arm.runs)[0]
    tokens = int(limits.target_tokens or DEFAULT_ESTIMATE_TOKENS)
    try:
        row = estimate_on_fewest_devices(rec["config"], limits.target_model, limits.target_hardware, tokens,
                                         results_dir)
    except (UsageError, KeyError, ValueError) as exc:
        return {"usd": None, "estimated": True, "label": f"not estimated: {str(exc).splitlines()[0]}"}
    where = f"{row['world_size']}x {row['hardware']}" + (f" ({row['strategy']})" if row["world_size"] > 1 else "")
    fit = "" if row["fits"] is not False else ", does not fit even there"
    return {"usd": row["cost_usd"], "estimated": True, "tokens": tokens, "devices": row["world_size"],
            "hardware": row["hardware"], "strategy": row["strategy"], "fits": row["fits"],
            "label": f"estimated by harness-estimate: {row['model']} on {where}{fit}, {tokens:.3g} tokens; "
                     f"{row['rate_source']}" + ("" if row["cost_usd"] is not None else "; no price for this hardware")}


def _measured(arm: Arm, limits: Limits) -> dict:
    costs = arm.values("cost_usd")
    if not costs:
        return {"usd": None, "estimated": False, "label": "no cost measured"}
    runs = [r for r in arm.ok if r["metrics"].get("cost_usd") is not None]
    devices = sorted({f"{(r.get('env') or {}).get('device_count') or 1}x "
                      f"{(r.get('env') or {}).get('device_name') or '?'}" for r in runs})
    where = " / ".join(devices)
    seeds = f"mean of {len(costs)} seeds" if len(costs) > 1 else "1 run"
    if not limits.target_tokens:
        return {"usd": _mean(costs), "estimated": False,
                "label": f"measured on {where} ({seeds}), for the run's own tokens"}
    real = [(r["metrics"]["cost_usd"], r["metrics"].get("train_tokens_real")) for r in runs]
    if all(t for _, t in real):
        per_token, kind = _mean([c / t for c, t in real]), "real"
    else:
        padded = [(r["metrics"]["cost_usd"], r["metrics"].get("train_tokens")) for r in runs]
        if not all(t for _, t in padded):
            return {"usd": None, "estimated": False, "label": "no token count to scale the cost by"}
        per_token, kind = _mean([c / t for c, t in padded]), "padded"
    return {"usd": per_token * limits.target_tokens, "estimated": False, "tokens": limits.target_tokens,
            "label": f"measured rate on {where} ({seeds}): ${per_token * 1e6:.3g} per 1M {kind} training tokens, "
                     f"x {limits.target_tokens:.3g} tokens (linear in tokens)"}


def training_cost(arm: Arm, limits: Limits, results_dir: Path) -> dict:
    cost = _estimate(arm, limits, results_dir) if limits.estimated else _measured(arm, limits)
    cost["within_budget"] = (None if limits.budget_usd is None or cost["usd"] is None
                             else cost["usd"] <= limits.budget_usd)
    return cost


def _latency(arm: Arm, kind: str) -> float | None:
    return _mean(arm.values(f"latency_prefill_{kind}_overhead"))


def serving(arm: Arm, full: Arm | None, n: int) -> dict:
    """N variants: measured where the arm's record served exactly N (harness.measure.variants: one
    base with N adapters resident, a mixed batch's prefill ratio to one merged model), else
    computed from the footprint rows (N checkpoints, or one base plus N adapters)."""
    checkpoint = _mean(arm.values("full_checkpoint_bytes")) or (
        _mean(full.values("full_checkpoint_bytes")) if full else None)
    adapter = _mean(arm.values("adapter_serving_bytes") or arm.values("adapter_bytes"))
    out = {"n": n, "computed": True, "merged_bytes": checkpoint * n if checkpoint else None,
           "adapters_bytes": checkpoint + n * adapter if checkpoint and adapter else None,
           "merged_prefill_overhead": _latency(arm, "merged"), "dynamic_prefill_overhead": _latency(arm, "dynamic")}
    measured = next((e for e in variant_entries(arm) if e["n"] == n and e.get("resident_bytes") is not None), None)
    if arm.method == "full":
        out["label"] = f"{n} full checkpoints (computed: {n} x the footprint row)"
    elif measured is not None:
        ratio = (measured.get("mixed_vs_merged_prefill") or {}).get("ratio")
        settings = next((r["metrics"].get("variants_settings") for r in arm.ok
                         if r["metrics"].get("variants_settings")), None) or {}
        out.update(computed=False, adapters_bytes=measured["resident_bytes"],
                   mixed_prefill_overhead=None if ratio is None else ratio - 1.0, mixed_batch=settings.get("batch"),
                   label=f"one base + {n} adapters resident (measured); merged: {n} checkpoints (computed)")
    else:
        out["label"] = (f"one base + {n} adapters (computed: checkpoint + {n} x adapter, footprint rows); "
                        f"merged: {n} checkpoints")
    return out


def gap_pp_of(row: dict) -> dict:
    """A stats.seed_summary row's gap and interval in pp, as verdict.json keeps them."""
    return {"gap_pp": row["gap"] * 100,
            "ci_pp": [None if row["ci_low"] is None else row["ci_low"] * 100,
                      None if row["ci_high"] is None else row["ci_high"] * 100]}


def _decide_text(need: dict, row: dict) -> str:
    parts = []
    if need["questions"]:
        parts.append(f"~{need['questions']:,} questions (now {row['n']:,})")
    if need["seeds"]:
        parts.append(f"~{need['seeds']} seeds (now {row['n_seeds']})")
    text = " or ".join(parts)
    # what cannot decide it, said once: "more seeds alone cannot: ..." beside the questions that can
    return "; ".join([text, *sorted(set(need["why"].values()))] if text else sorted(set(need["why"].values())))


# ---------------------------------------------------------------- one table's verdict


def table_verdict(table: Table, limits: Limits, results_dir: Path) -> dict:
    task = judged_task(table, limits.task)
    m = limits.max_gap / 100
    full = reference_arm(table)
    peft = [a for a in table.arms if a.method not in ("full", "base")]
    why: list[str] = []
    if any((r.get("model") or {}).get("random_weights") for r in table.runs):
        why.append("the model had random weights (architecture-only profiling): its accuracies mean nothing")
    if full is None:
        why.append("no full fine-tuning arm to compare with")
    elif not full.ok:
        why.append(f"full fine-tuning did not finish ({failure_text(full.runs[0], short=True)})")
    if task is None:
        why.append("no accuracy was measured on both sides of a pair (MMLU, in-domain or an lm-eval task)")
    if peft and not any(a.ok for a in peft):
        why.append("every PEFT arm failed")
    if not peft:
        why.append("no PEFT arm to judge")

    # where a method ran over a rate grid, only the rate its validation chose is judged: picking
    # another on these (test) gaps would tune on the test questions
    passed_over = {id(arm): c for c in table.choices for _, arm, _ in c.candidates if arm is not c.chosen}
    arms = []
    for a in peft:
        entry: dict = {"label": a.label, "method": a.method, "rank": a.rank, "run_ids": [r["run_id"] for r in a.runs]}
        row = table.gaps.get((a.key, task)) if task else None
        if id(a) in passed_over:
            entry["judgement"] = NOT_CHOSEN
            entry["note"] = f"not judged: validation chose lr {passed_over[id(a)].rate:g} (docs/tuning.md)"
            arms.append(entry)
            continue
        if not a.ok:
            status = {status_of(r) for r in a.runs}
            entry["judgement"] = "did not fit" if "oom" in status else "killed" if "killed" in status else "failed"
            entry["note"] = failure_text(a.runs[0], short=True)
            arms.append(entry)
            continue
        elif row is None:
            entry["judgement"] = "no pair"
            entry["note"] = f"no {_task_label(task) if task else 'accuracy'} gap: no full FT run with its pair_key"
        else:
            entry.update({**gap_pp_of(row), "n": row["n"], "n_seeds": row["n_seeds"], "paired": row["paired"],
                          "judgement": judge(row["ci_low"], row["ci_high"], m) or "no interval"})
            if entry["judgement"] == UNDECIDED:
                if row["answers"]:
                    need = to_decide([row["answers"][s] for s in sorted(row["answers"], key=str)], m)
                    entry["to_decide"] = need
                    entry["note"] = f"to decide: {_decide_text(need, row)}"
                else:
                    entry["note"] = "unpaired (no per-question answers): not projected"
        # the other accuracies, judged against the same limit: a pick that loses elsewhere says so
        entry["other_tasks"] = {
            t: {**gap_pp_of(g), "judgement": judge(g["ci_low"], g["ci_high"], m), "text": gap_text(gap_pp_of(g))}
            for (key, t), g in sorted(table.gaps.items()) if key == a.key and t != task}
        entry["cost"] = training_cost(a, limits, results_dir)
        entry["serving"] = serving(a, full, limits.variants)
        arms.append(entry)

    # too few questions to resolve the limit at all: even arms that agree on every question straddle it
    res = None
    if task and full is not None and full.ok and (acc := full.accuracy.get(task)):
        rows = [table.gaps[(a.key, task)] for a in peft if (a.key, task) in table.gaps]
        n = max([r["n"] for r in rows if r["n"]] or [task_metric(full.ok[0]["metrics"], task, "n") or 0])
        if n:
            res = resolution(int(n), acc["mean"], m)
            if not res["ok"]:
                need = f"; evaluate on at least {res['questions_needed']:,}" if res["questions_needed"] else ""
                why.append(f"{int(n)} {_task_label(task)} questions cannot resolve {limits.max_gap:g} pp: arms that "
                           f"agree on every question get ±{res['tie_half_width'] * 100:.2f} pp and one question moves "
                           f"an accuracy {res['step'] * 100:.2f} pp{need}")

    out = {"title": table.title, "setting_key": table.key[3], "task": task, "max_gap_pp": limits.max_gap,
           "variants": limits.variants, "resolution": res, "arms": arms, "why": why,
           "full": None if full is None else {"label": full.label, "run_ids": [r["run_id"] for r in full.runs],
                                              "ok": bool(full.ok),
                                              "cost": training_cost(full, limits, results_dir) if full.ok else None,
                                              "serving": serving(full, full, limits.variants) if full.ok else None}}
    out["state"] = NO_VERDICT if why else "verdict"
    out["pick"], out["recommendation"] = _recommend(out, limits)
    return out


def _usd(x: float | None) -> str:
    return "n/a" if x is None else fmt_usd([x])


def _mixed_batch_text(batch: int | None, n: int) -> str:
    """What a mixed batch held: request i asks for variant i mod N, so a batch smaller than N holds
    ``batch`` of the N variants."""
    if not batch:
        return f"a mixed batch of the {n} variants"
    if batch <= n:
        return f"a mixed batch of {batch} requests, each for another of the {n} variants,"
    return f"a mixed batch of {batch} requests across the {n} variants"


def _recommend(v: dict, limits: Limits) -> tuple[str | None, str]:
    """(the pick's label or None, the recommendation in plain words)."""
    if v["state"] == NO_VERDICT:
        return None, "No verdict: " + "; ".join(v["why"]) + "."
    task, m, n = _task_label(v["task"]), limits.max_gap, limits.variants
    full = v["full"]
    budget = limits.budget_usd
    by_state = {s: [a for a in v["arms"] if a["judgement"] == s] for s in (WITHIN, BEYOND, UNDECIDED)}
    full_cost = full["cost"]["usd"]
    full_over = budget is not None and full_cost is not None and full_cost > budget

    def cost_key(a: dict) -> tuple:
        return (a["cost"]["usd"] is None, a["cost"]["usd"] or 0.0, a["label"])

    fits = [a for a in by_state[WITHIN] if a["cost"]["within_budget"] is not False]
    undecided = "; ".join(f"{a['label']} is undecided ({a['note']})"
                          for a in by_state[UNDECIDED])
    if fits:
        pick = min(fits, key=cost_key)
        s, fs = pick["serving"], full["serving"]
        words = [f"Pick {pick['label']}: its {task} gap vs full FT, {gap_text(pick)}, is within the {m:g} pp "
                 f"limit"]
        if pick["cost"]["usd"] is not None and full_cost is not None:
            words.append(f"training costs {_usd(pick['cost']['usd'])} against {_usd(full_cost)} for full FT "
                         f"({'estimated' if pick['cost']['estimated'] else 'measured'})")
        if s["adapters_bytes"] and fs["merged_bytes"]:
            dyn, merged = s["dynamic_prefill_overhead"], s["merged_prefill_overhead"]
            latency = "" if dyn is None else (
                f", at {dyn * 100:+.0f}% prefill latency with the adapters applied dynamically"
                + ("" if merged is None else f" (merged: {merged * 100:+.0f}%)"))  # as the probe measured, not assumed
            if s.get("mixed_prefill_overhead") is not None:
                latency += (f"; {_mixed_batch_text(s.get('mixed_batch'), n)} prefills at "
                            f"{s['mixed_prefill_overhead'] * 100:+.0f}% against one merged model")
            words.append(f"serving {n} variant{'s' if n > 1 else ''} takes {fmt_bytes([s['adapters_bytes']])} "
                         f"(one base + adapters, {'computed' if s['computed'] else 'measured'}) against "
                         f"{fmt_bytes([fs['merged_bytes']])} of full checkpoints{latency}")
        if full_over:
            words.append(f"full FT would cost {_usd(full_cost)}, over the {_usd(budget)} budget")
        elsewhere = [f"{_task_label(t)} {o['text']}" for t, o in pick["other_tasks"].items() if o["judgement"] == BEYOND]
        if elsewhere:
            words.append(f"but it loses more than {m:g} pp elsewhere: {', '.join(elsewhere)}")
        others = [a["label"] for a in by_state[WITHIN] if a is not pick]
        if others:
            words.append(f"also within the limit: {', '.join(others)}")
        if undecided:
            words.append(undecided)
        return pick["label"], "; ".join(words) + "."
    if by_state[WITHIN]:  # within the gap limit, but over the budget
        cheapest = min(by_state[WITHIN], key=cost_key)
        return None, (f"No arm meets both limits: {cheapest['label']} is within {m:g} pp but costs "
                      f"{_usd(cheapest['cost']['usd'])}, over the {_usd(budget)} budget"
                      + (f"; full FT costs {_usd(full_cost)}" if full_cost is not None else "") + ".")
    if by_state[UNDECIDED]:
        tail = ("" if full_over else " Until then, full FT is the arm known to meet the accuracy limit"
                + (f" ({_usd(full_cost)})" if full_cost is not None else "") + ".")
        return None, f"No pick yet: {undecided}.{tail}"
    lost = ", ".join(f"{a['label']} {gap_text(a)}" for a in by_state[BEYOND])
    if full_over:
        return None, (f"No arm meets both limits: every judged PEFT arm loses more than {m:g} pp on {task} ({lost}), "
                      f"and full FT costs {_usd(full_cost)}, over the {_usd(budget)} budget.")
    if not by_state[BEYOND]:
        return None, "No verdict: no PEFT arm has a judged gap."
    return full["label"], (f"Pick full fine-tuning: every judged PEFT arm loses more than {m:g} pp on {task} "
                           f"({lost})" + (f"; it costs {_usd(full_cost)}" if full_cost is not None else "") + ".")


def gap_text(entry: dict) -> str:
    """``-1.56 pp [-5.52, +1.56]`` from an entry's gap_pp and ci_pp."""
    low, high = entry["ci_pp"]
    text = f"{entry['gap_pp']:+.2f} pp"
    return text + (f" [{low:+.2f}, {high:+.2f}]" if low is not None else "")


# ---------------------------------------------------------------- output


def verdicts(tables: list[Table], limits: Limits, results_dir: Path) -> dict:
    return {"limits": asdict(limits), "tables": [table_verdict(t, limits, results_dir) for t in tables]}


def limits_text(limits: Limits | dict) -> str:
    limits = Limits(**limits) if isinstance(limits, dict) else limits
    parts = [f"max gap {limits.max_gap:g} pp vs full FT", f"{limits.variants} variant{'s' if limits.variants > 1 else ''}"
             " to serve"]
    if limits.target_tokens:
        parts.append(f"{limits.target_tokens:.3g} training tokens")
    if limits.estimated:
        parts.append(f"costs estimated for {limits.target_model or 'the measured model'} on "
                     f"{limits.target_hardware or 'the measured hardware'}")
    if limits.budget_usd is not None:
        parts.append(f"budget {_usd(limits.budget_usd)} per training run")
    return "; ".join(parts)


def _cell_cost(c: dict | None) -> str:
    if not c:
        return DASH
    text = _usd(c["usd"]) + (" (estimated)" if c["estimated"] and c["usd"] is not None else "")
    if c.get("within_budget") is False:
        text += " over budget"
    return text


def _cell_serving(s: dict | None, method: str) -> str:
    if not s:
        return DASH
    if method == "full":
        return fmt_bytes([s["merged_bytes"]]) if s["merged_bytes"] else DASH
    parts = []
    if s["adapters_bytes"]:
        dyn = s["dynamic_prefill_overhead"]
        parts.append(f"{fmt_bytes([s['adapters_bytes']])} base + adapters"
                     + ("" if s["computed"] else ", measured")
                     + (f" ({dyn * 100:+.0f}% prefill)" if dyn is not None else ""))
    if s["merged_bytes"]:
        parts.append(f"{fmt_bytes([s['merged_bytes']])} merged")
    return "; ".join(parts) or DASH


def verdict_rows(v: dict) -> tuple[list[str], list[list[str]]]:
    """The verdict table of one table verdict: header and rows (markdown and HTML share them)."""
    task = _task_label(v["task"]) if v["task"] else "accuracy"
    header = ["arm", f"gap vs full FT, {task} (95% CI)", f"against -{v['max_gap_pp']:g} pp", "to decide",
              "training cost", f"serving {v['variants']} variant{'s' if v['variants'] > 1 else ''}"]
    rows = []
    if v["full"]:
        f = v["full"]
        rows.append([f["label"], "reference", DASH, DASH, _cell_cost(f["cost"]), _cell_serving(f["serving"], "full")])
    for a in v["arms"]:
        gap = gap_text(a) if "gap_pp" in a else a.get("note", DASH)
        decide = a["note"].removeprefix("to decide: ") if a["judgement"] == UNDECIDED and a.get("note") else DASH
        rows.append([a["label"], gap, a["judgement"], decide, _cell_cost(a.get("cost")),
                     _cell_serving(a.get("serving"), a["method"])])
    return header, rows


def cost_note(v: dict) -> str:
    """Where each arm's cost comes from, one clause per arm."""
    arms = [v["full"]] if v["full"] and v["full"]["cost"] else []
    arms += [a for a in v["arms"] if a.get("cost")]
    return "Training cost: " + "; ".join(f"{a['label']}: {a['cost']['label']}" for a in arms) + "." if arms else ""


def markdown_section(result: dict) -> list[str]:
    lines = ["## Verdict", "", f"Limits: {limits_text(result['limits'])}.", ""]
    if not result["tables"]:
        lines += ["No run records: no verdict.", ""]
    for v in result["tables"]:
        header, rows = verdict_rows(v)
        lines += [f"**{v['title']}**: {v['recommendation']}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * len(header)) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += ["", cost_note(v), ""]
    lines += [VERDICT_NOTE, ""]
    return lines


VERDICT_NOTE = (
    "Within: the gap's 95% interval lies above -max gap; beyond: below it; undecided: it straddles it "
    "(the questions or seeds that would decide it assume the gap stays where it is: harness.stats.to_decide). "
    "Serving figures are measured with N adapters loaded where a record served that N (eval.variants.counts), "
    "else computed from the footprint row (checkpoint and adapter bytes x variants); latency is the probe's prefill "
    "overhead with one adapter. Rebuild with other limits: "
    "harness-report --max-gap PP --variants N --target-tokens T --target-model M --target-hardware H --budget-usd B "
    "(docs/verdict.md)."
)


def write_json(result: dict, reports_dir: Path) -> Path:
    path = reports_dir / VERDICT_JSON
    path.write_text(json.dumps(result, indent=1, sort_keys=True, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


__all__ = ["LIMIT_KEYS", "Limits", "LimitsError", "VERDICT_JSON", "check_targets", "load_limits", "markdown_section",
           "table_verdict", "verdict_rows", "verdicts", "write_json"]
