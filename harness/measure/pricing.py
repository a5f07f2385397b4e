"""Hardware price table, device matching and dollar cost. Imports no torch: the parent process
prices runs without loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class PriceTableError(ValueError):
    """A hardware price file that is missing a field or has an invalid price."""


def _validate_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict):
        raise PriceTableError(f"{where}: expected a mapping with name, price_per_device_hour_usd, ...")
    price = entry.get("price_per_device_hour_usd")
    if price is None:
        raise PriceTableError(
            f"{where}: price_per_device_hour_usd is missing; set a positive USD price per device-hour"
        )
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not price > 0:
        raise PriceTableError(f"{where}: price_per_device_hour_usd {price!r} is not a positive number of USD")
    for field in ("name", "price_source", "price_date"):
        if not entry.get(field):
            raise PriceTableError(f"{where}: {field} is missing")
    match = entry.get("match", [])
    match = [match] if isinstance(match, str) else list(match or [])
    if not all(isinstance(m, str) and m for m in match):
        raise PriceTableError(f"{where}: match {entry.get('match')!r} must be a list of device-name substrings")
    return {**entry, "price_per_device_hour_usd": float(price), "price_date": str(entry["price_date"]), "match": match}


def load_price_table(conf_dir: str | Path) -> dict[str, dict]:
    """Hardware entries from ``<conf_dir>/hardware/*.yaml`` keyed by name (``auto.yaml`` skipped).

    Raises ``PriceTableError`` (one line naming the file) for a missing or non-positive price,
    or a missing name / price_source / price_date.
    """
    hw_dir = Path(conf_dir) / "hardware"
    if not hw_dir.is_dir():
        raise PriceTableError(f"{hw_dir}: no hardware price folder")
    table: dict[str, dict] = {}
    for path in sorted(hw_dir.glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise PriceTableError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if isinstance(raw, dict) and raw.get("name") == "auto":
            continue
        entry = _validate_entry(raw, str(path))
        table[entry["name"]] = entry
    return table


def device_name() -> str:
    """``torch.cuda.get_device_name(0)``, or "cpu" without CUDA (imports torch: call in the job)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def detect_hardware(table: dict[str, dict], name: str | None = None) -> dict | None:
    """The entry whose ``match`` substring (case-insensitive, longest wins) is in the device name.

    ``name`` defaults to ``device_name()``; None when no entry matches (an unknown GPU).
    """
    name = (name or device_name()).lower()
    best, best_len = None, 0
    for entry in table.values():
        for m in entry["match"]:
            if m.lower() in name and len(m) > best_len:
                best, best_len = entry, len(m)
    return best


def resolve_hardware(hardware_cfg: dict, table: dict[str, dict]) -> dict | None:
    """The price entry for a run's ``config["hardware"]``.

    ``name: auto`` detects the device (None for an unknown GPU: cost is then not measured); any
    other name uses the config's own fields (so shell overrides such as
    ``hardware.price_per_device_hour_usd=2.1`` apply), validated like a price file.
    """
    name = hardware_cfg.get("name")
    if name == "auto":
        return detect_hardware(table)
    if name not in table and "price_per_device_hour_usd" not in hardware_cfg:
        raise PriceTableError(f"hardware {name!r} is not in the price table; valid: auto, {', '.join(sorted(table))}")
    return _validate_entry({**table.get(name, {}), **hardware_cfg}, f"hardware {name!r}")


def cost_usd(seconds: float, price_per_hour: float, device_count: int = 1) -> float:
    """hours × price per device-hour × devices."""
    return seconds / 3600.0 * price_per_hour * device_count


def projected_cost(tokens: int, epochs: float, tokens_per_s: float, price: float, device_count: int = 1) -> dict:
    """Projected wall time and cost to train ``epochs`` passes over ``tokens`` at the measured rate."""
    projected_tokens = tokens * epochs
    wall_h = projected_tokens / tokens_per_s / 3600.0
    return {
        "projected_tokens": projected_tokens,
        "projected_wall_h": wall_h,
        "projected_cost_usd": wall_h * price * device_count,
    }


def cost_metrics(
    entry: dict | None,
    seconds: float | None,
    device_count: int = 1,
    dataset_tokens: int | None = None,
    epochs: float = 1.0,
    tokens_per_s: float | None = None,
) -> dict:
    """Cost fields of the record; all None when the hardware is unknown (entry None)."""
    out: dict[str, Any] = {
        "hardware": entry["name"] if entry else None,
        "price_per_device_hour_usd": entry["price_per_device_hour_usd"] if entry else None,
        "price_source": entry["price_source"] if entry else None,
        "price_date": entry["price_date"] if entry else None,
        "device_count": device_count,
        "cost_usd": cost_usd(seconds, entry["price_per_device_hour_usd"], device_count)
        if entry and seconds is not None
        else None,
        "projected_tokens": None,
        "projected_wall_h": None,
        "projected_cost_usd": None,
    }
    if entry and dataset_tokens and tokens_per_s:
        out.update(
            projected_cost(dataset_tokens, epochs, tokens_per_s, entry["price_per_device_hour_usd"], device_count)
        )
    return out


# Serving footprint
