"""The report's estimated sections (harness-estimate's figures, labelled as estimates).

- "Estimated at scale": the at-a-glance rows for larger models on chosen hardware, before anyone
  rents it (``harness-report --estimate-models llama-2-13b-arch --estimate-hardware a100-80gb``).
  Accuracy is left to measurements: no formula predicts it.
- "Estimate vs measured (GPU runs)": for every ok record whose memory was measured on CUDA, the
  estimate of the same resolved config beside the measured peaks, with the error.

harness/report/__init__.py calls ``write_estimates`` once; everything else lives here.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SCALE_METHODS = (("full FT", ["method=full"]), ("LoRA r=16", ["method=lora", "method.r=16"]),
                 ("QLoRA r=16", ["method=qlora", "method.r=16"]))
DEFAULT_TOKENS = 100_000_000


def _bytes(b: float | None) -> str:
    from harness.estimate import _gib

    return _gib(b)


def _count(n: int) -> str:
    from harness.estimate import _count as count

    return count(n)


def _column(row: dict) -> list[str]:
    where = "1 device" if row["world_size"] == 1 else f"{row['world_size']} devices ({row['strategy']})"
    fit = f"fits on {where}" if row["fits"] else f"does not fit on {where}"
    cost = "n/a" if row["cost_usd"] is None else f"${row['cost_usd']:,.0f}"
    hours = "n/a" if row["train_hours"] is None else f"{row['train_hours']:.3g} h on {where}"
    adapter = "" if row["adapter_bytes"] is None else f"adapter {_bytes(row['adapter_bytes'])} vs "
    latency = "merged +0% (same shapes)" if row["method"] == "full" or row["adapter_bytes"] is None else \
        "merged +0% (same shapes); dynamic: measure it"
    return [
        f"{_count(row['trainable_params'])} ({100 * row['trainable_share']:.3g}%)",
        f"{_bytes(row['peak_memory_bytes'])} + CUDA context and allocator reserve = "
        f"{_bytes(row['device_total_bytes'])}; {fit}",
        f"{hours}; {cost}",
        "left to measurements",
        f"{adapter}full {_bytes(row['checkpoint_bytes'])} ({row['checkpoint_dtype']})",
        latency,
    ]


ROWS = ("trainable parameters (share of all)", "peak training memory per device", "training wall-clock; cost",
        "gap vs full FT (MMLU, in-domain)", "serving footprint: adapter vs full checkpoint",
        "inference latency overhead vs base")


def estimate_on_fewest_devices(config: dict, model: str | None, hardware: str | None, tokens: int,
                               results_dir: str | Path | None) -> dict:
    """harness-estimate of a resolved run ``config`` moved to ``model`` and ``hardware`` (conf
    presets; None keeps the config's own) for ``tokens`` training tokens, shown on the fewest
    devices it fits (as configured when it fits there)."""
    from harness.estimate import compose, estimate_job, resolved

    cfg = {k: v for k, v in config.items() if k != "hydra"}
    if model:
        cfg["model"] = compose([f"model={model}"])["model"]
    if hardware:
        cfg["hardware"] = compose([f"hardware={hardware}"])["hardware"]
    cfg["projected_tokens"] = tokens
    if results_dir:  # measured rates on this hardware come from these records
        cfg["results_dir"] = str(results_dir)
    row = estimate_job(resolved(cfg))
    if not row["fits"] and row["devices_needed"]:
        cfg["distributed"] = compose([f"distributed={row['devices_needed_strategy']}",
                                      f"distributed.num_processes={row['devices_needed']}"])["distributed"]
        row = estimate_job(resolved(cfg))
    return row


def scale_tables(models: list[str], hardware: str, tokens: int, results_dir: str | Path) -> str:
    from harness.estimate import ALLOCATOR_RESERVE, CUDA_CONTEXT_BYTES, compose

    parts = ["## Estimated at scale (not measured)", "",
             f"Computed by harness-estimate from the architecture alone (no weights, no GPU): "
             f"{hardware}, harness-run's defaults (batch and sequence length of conf/train), "
             f"{tokens:,} training tokens. Peak memory adds a CUDA context of {_bytes(CUDA_CONTEXT_BYTES)} and "
             f"an allocator reserve of {ALLOCATOR_RESERVE:.0%}. Accuracy cannot be estimated: run the sweep.", ""]
    for model in models:
        rows = [estimate_on_fewest_devices(compose([f"results_dir={results_dir}", *ov]), model, hardware, tokens,
                                           results_dir) for _, ov in SCALE_METHODS]
        cols = [_column(r) for r in rows]
        parts += [f"**{model} on {hardware} (estimated)**", "",
                  "| | " + " | ".join(label for label, _ in SCALE_METHODS) + " |",
                  "|---|" + "---|" * len(SCALE_METHODS)]
        parts += [f"| {label} | " + " | ".join(c[i] for c in cols) + " |" for i, label in enumerate(ROWS)]
        parts += ["", f"Time: {rows[0]['rate_source']}.", ""]
    return "\n".join(parts)


def gpu_checks(records: list[dict]) -> str | None:
    """Estimate beside measurement for every ok record measured on CUDA; None when there are none."""
    from harness.config import UsageError
    from harness.estimate import estimate_job, resolved

    lines = []
    for rec in sorted(records, key=lambda r: r["run_id"]):
        m = rec.get("metrics") or {}
        if rec.get("status") != "ok" or m.get("memory_device") != "cuda" or not m.get("peak_memory_bytes"):
            continue
        try:
            est = estimate_job(resolved(dict(rec["config"])))
        except (UsageError, KeyError, ValueError) as exc:
            lines.append(f"| {rec['run_id']} | not estimated: {exc} | | | |")
            continue
        reserved = m.get("peak_memory_reserved_bytes")
        est_reserved = est["peak_memory_bytes"] + est["allocator_reserve_bytes"]
        lines.append(
            f"| {rec['run_id']} | {_bytes(est['peak_memory_bytes'])} vs {_bytes(m['peak_memory_bytes'])} "
            f"({est['peak_memory_bytes'] / m['peak_memory_bytes'] - 1:+.1%}) | "
            + (f"{_bytes(est_reserved)} vs {_bytes(reserved)} ({est_reserved / reserved - 1:+.1%})" if reserved else "—")
            + f" | {est['peak_phase']} | {(rec.get('env') or {}).get('device_name') or '?'} |")
    if not lines:
        return None
    return "\n".join(["## Estimate vs measured (GPU runs)", "",
                      "harness-estimate on each run's own resolved config, beside the CUDA peaks it measured "
                      "(max_memory_allocated, max_memory_reserved).", "",
                      "| run | peak allocated: estimated vs measured | peak reserved: estimated vs measured "
                      "| estimated peak phase | device |", "|---|---|---|---|---|", *lines, ""])


def check_args(models: list[str], hardware: str) -> str | None:
    """One line naming a model or hardware that conf/ does not have, else None."""
    from harness.estimate import check_target

    flags = ("--estimate-models", "--estimate-hardware")
    return next((p for m in models if (p := check_target(m, hardware, flags))), None)


def write_estimates(records: list[dict], reports_dir: Path, results_dir: str | Path, models: list[str] | None,
                    hardware: str | None, tokens: int | None = None) -> dict[str, Path]:
    """Append the estimated sections to at-a-glance.md and index.html; write estimated.md."""
    sections = []
    if models:
        sections.append(scale_tables(models, hardware or "a100-80gb", tokens or DEFAULT_TOKENS, results_dir))
    if any((r.get("metrics") or {}).get("memory_device") == "cuda" for r in records):
        checks = gpu_checks(records)
        if checks:
            sections.append(checks)
    if not sections:
        return {}
    text = "\n".join(sections)
    out = Path(reports_dir) / "estimated.md"
    out.write_text(text)
    md = Path(reports_dir) / "at-a-glance.md"
    if md.exists():
        md.write_text(md.read_text().rstrip("\n") + "\n\n" + text)
    page = Path(reports_dir) / "index.html"
    if page.exists():
        block = f'<section id="estimated"><pre>{html.escape(text)}</pre></section>\n'
        body = page.read_text()
        page.write_text(body.replace("</body>", block + "</body>") if "</body>" in body else body + block)
    return {"estimated.md": out}
