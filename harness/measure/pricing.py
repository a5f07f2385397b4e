"""Hardware price table and dollar cost (device matching: ``measure.environment``). Imports no torch: the parent process
prices runs without loading it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from harness.measure import environment


class PriceTableError(ValueError):
    """A hardware price file that is missing a field or has an invalid price."""


# The two ways a preset prices a run: per device (GPU instances, one device per process) or per
# CPU core (a CPU run pays for the cores its processes used, not for a whole instance).
PRICE_FIELDS = {"price_per_device_hour_usd": "device", "price_per_core_hour_usd": "cpu core"}
GIB = environment.GIB


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _strings(entry: dict, field: str, where: str) -> list[str]:
    value = entry.get(field) or []
    value = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(m, str) and m for m in value):
        raise PriceTableError(f"{where}: {field} {entry.get(field)!r} must be a list of device-name substrings")
    return value


def _validate_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict):
        raise PriceTableError(f"{where}: expected a mapping with name, price_per_device_hour_usd, ...")
    given = [f for f in PRICE_FIELDS if entry.get(f) is not None]
    if not given:
        raise PriceTableError(
            f"{where}: price_per_device_hour_usd is missing; set a positive USD price per device-hour "
            "(or price_per_core_hour_usd for a CPU)"
        )
    if len(given) > 1:
        raise PriceTableError(f"{where}: both {' and '.join(given)} are set; a preset prices devices or CPU cores")
    price = entry[given[0]]
    if not _positive(price):
        raise PriceTableError(f"{where}: {given[0]} {price!r} is not a positive number of USD")
    for field in ("name", "price_source", "price_date"):
        if not entry.get(field):
            raise PriceTableError(f"{where}: {field} is missing")
    memory = entry.get("memory_gib")
    if memory is not None and not (
        isinstance(memory, (list, tuple))
        and len(memory) == 2
        and all(_positive(m) for m in memory)
        and memory[0] <= memory[1]
    ):
        raise PriceTableError(f"{where}: memory_gib {memory!r} must be [min, max] GiB of device memory")
    peak = entry.get("datasheet_bf16_dense_tflops")
    if peak is not None and not (_positive(peak) and entry.get("datasheet_source")):
        raise PriceTableError(
            f"{where}: datasheet_bf16_dense_tflops {peak!r} needs a positive value and a datasheet_source"
        )
    return {
        **entry,
        given[0]: float(price),
        "price_date": str(entry["price_date"]),
        "match": _strings(entry, "match", where),
        "exclude": _strings(entry, "exclude", where),
    }


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


def unpriced_warning(table: dict[str, dict], name: str, memory_bytes: int | None = None) -> str:
    """Why ``name`` got no price: which presets name it but were left out (memory, excluded
    variant, a tie), and how to price it."""
    memory = f", {memory_bytes / GIB:.1f} GiB" if memory_bytes else ""
    near = [e for e in table.values() if any(m.lower() in name.lower() for m in e["match"])]
    why = "; ".join(
        f"{e['name']} is for {e['memory_gib'][0]}-{e['memory_gib'][1]} GiB"
        if e.get("memory_gib") and environment.fits({**e, "memory_gib": None}, name, memory_bytes)
        else f"{e['name']} excludes {', '.join(x for x in e['exclude'] if x.lower() in name.lower()) or 'it'}"
        for e in near
    )
    return (
        f"no price for device {name!r}{memory}"
        + (f" ({why})" if why else "")
        + ": cost fields are null; add conf/hardware/<name>.yaml for it (docs/measurements.md: Adding hardware)"
    )


def resolve_hardware(hardware_cfg: dict, table: dict[str, dict]) -> dict | None:
    """The price entry for a run's ``config["hardware"]``.

    ``name: auto`` detects the device (None for an unknown device: cost is then not measured); any
    other name uses the config's own fields (so shell overrides such as
    ``hardware.price_per_device_hour_usd=2.1`` apply), validated like a price file.
    """
    name = hardware_cfg.get("name")
    if name == "auto":
        return environment.detect_hardware(table)
    if name not in table and not any(f in hardware_cfg for f in PRICE_FIELDS):
        raise PriceTableError(f"hardware {name!r} is not in the price table; valid: auto, {', '.join(sorted(table))}")
    return _validate_entry({**table.get(name, {}), **hardware_cfg}, f"hardware {name!r}")


def hardware_mismatch(entry: dict | None, name: str, memory_bytes: int | None = None) -> str | None:
    """Why the hardware preset a job is priced as does not describe the device it runs on (its
    ``match``/``exclude``/``memory_gib`` do not fit ``name``), or None when it does. An explicit
    ``hardware=<preset>`` is taken as given, so a wrong one would silently give another device's
    price and datasheet MFU; a preset without a ``match`` list (one made on the command line) and
    an unpriced run are not checked."""
    if not entry or not entry.get("match") or price_of(entry) is None:
        return None
    if environment.fits(entry, name, memory_bytes):
        return None
    memory = f", {memory_bytes / GIB:.1f} GiB" if memory_bytes else ""
    return (f"hardware={entry['name']} does not match the device this job runs on ({name!r}{memory}): its "
            f"price and datasheet peak (mfu_datasheet) are {entry['name']}'s; use hardware=auto or the "
            "preset of this device")


def unpriced_hardware(table: dict[str, dict]) -> dict:
    """The hardware config of a run on an unknown device: its name, no price, the warning
    (printed here, and recorded as ``price_warning``)."""
    name, memory = environment.device_identity()
    warning = unpriced_warning(table, name, memory)
    print(f"harness: warning: {warning}", file=sys.stderr, flush=True)
    return {"name": f"unpriced ({name})", "price_per_device_hour_usd": None, "price_warning": warning}


def price_of(entry: dict | None) -> tuple[float, str] | None:
    """(USD per unit-hour, unit) of a hardware entry, unit "device" or "cpu core"; None unpriced."""
    for field, unit in PRICE_FIELDS.items():
        if entry and entry.get(field):
            return float(entry[field]), unit
    return None


def cpu_cores_used(threads_per_process: int, processes: int = 1, available: int | None = None) -> int:
    """CPU cores a job used: its processes' torch threads, at most the cores it may run on."""
    if available is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(threads_per_process) * int(processes), available))


def cost_usd(seconds: float, price_per_hour: float, device_count: int = 1) -> float:
    """hours × price per unit-hour × units (devices, or CPU cores)."""
    return seconds / 3600.0 * price_per_hour * device_count


def projected_cost(tokens: int, epochs: float, tokens_per_s: float, price: float, device_count: int = 1) -> dict:
    """Projected wall time and cost to train ``epochs`` passes over ``tokens`` at the measured rate
    (``tokens_per_s``: real, non-padding tokens, as ``tokens`` counts a data set's tokens)."""
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
    cpu_cores: int | None = None,
    run_seconds: float | None = None,
) -> dict:
    """Cost fields of the record; all None when the hardware is unknown (entry None or unpriced).

    A per-device price is charged for ``device_count`` devices (those used, one per process); a
    per-core price for ``cpu_cores`` (``cpu_cores_used``). ``tokens_per_s``: the real-token rate
    the projection divides by. ``run_seconds``: the whole run, priced as ``run_cost_usd``.
    """
    price = price_of(entry)
    per_hour, unit = price if price else (None, None)
    units = (cpu_cores if unit == "cpu core" else device_count) if price else None
    if unit == "cpu core" and not cpu_cores:
        raise ValueError("a per-core price needs cpu_cores (the cores the job used)")
    out: dict[str, Any] = {
        "hardware": entry["name"] if price else None,
        "price_per_device_hour_usd": per_hour if unit == "device" else None,
        "price_per_core_hour_usd": per_hour if unit == "cpu core" else None,
        "price_source": entry["price_source"] if price else None,
        "price_date": entry["price_date"] if price else None,
        "price_warning": None if price else (entry or {}).get("price_warning") or "no price for this hardware",
        "device_count": device_count,
        "priced_unit": unit,
        "priced_units": units,
        "cost_usd": cost_usd(seconds, per_hour, units) if price and seconds is not None else None,
        "run_cost_usd": cost_usd(run_seconds, per_hour, units) if price and run_seconds is not None else None,
        "projected_tokens": None,
        "projected_wall_h": None,
        "projected_cost_usd": None,
    }
    if price and dataset_tokens and tokens_per_s:
        out.update(projected_cost(dataset_tokens, epochs, tokens_per_s, per_hour, units))
    return out
