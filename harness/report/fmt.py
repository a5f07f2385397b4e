"""Numbers as the report writes them: about three significant digits, binary units for bytes,
``mean ± sd`` over seeds (the sd left out when every seed gave the same value)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from harness.stats import mean_sd

DASH = "—"


def _num(v: float) -> tuple[str, int]:
    """About three significant digits, and the decimals used (so an sd can match them)."""
    decimals = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:.{decimals}f}", decimals


def _pm(values: Sequence[float], scale: float, unit: str) -> str:
    """``mean ± sd unit`` over seeds (just the value for one seed), in ``unit`` = 1/``scale``."""
    mean, sd = mean_sd(values)
    text, decimals = _num(mean / scale)
    if sd:
        text += f" ± {sd / scale:.{decimals}f}"
    return f"{text}{unit}"


def _mean(values: Sequence[float]) -> float:
    return mean_sd(values)[0]


def _bytes_scale(v: float) -> tuple[float, str]:
    scale, unit = 1.0, " B"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 * scale:
            break
        scale, unit = scale * 1024, f" {name}"
    return scale, unit


def fmt_bytes(values: Sequence[float]) -> str:
    return _pm(values, *_bytes_scale(_mean(values)))


def fmt_count(values: Sequence[float]) -> str:
    mean = _mean(values)
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(mean) >= scale:
            return _pm(values, scale, unit)
    return _pm(values, 1.0, "")


def fmt_duration(values: Sequence[float]) -> str:
    mean = _mean(values)
    if mean < 120:
        return _pm(values, 1.0, " s")
    if mean < 7200:
        return _pm(values, 60.0, " min")
    return _pm(values, 3600.0, " h")


def fmt_usd(values: Sequence[float]) -> str:
    mean, sd = mean_sd(values)
    if mean < 1e-4:
        return "<$0.0001"
    if mean >= 1:
        return f"${mean:,.2f}" + (f" ± {sd:,.2f}" if sd else "")
    # small costs: three significant digits, sd to the same decimal place
    decimals = max(2, 2 - math.floor(math.log10(mean)))
    return f"${mean:.{decimals}f}" + (f" ± {sd:.{decimals}f}" if sd else "")


def fmt_money(value: float) -> str:
    """One amount as a person reads it (an axis tick): dollars from $1 (``$1.5``, ``$12``,
    ``$1,234``), cents below (``0.5¢``, ``0.002¢``: three significant digits, no exponent)."""
    if value == 0:
        return "$0"
    sign = "-" if value < 0 else ""
    value = abs(value)
    cents = value * 100
    text = f"{cents:.{max(0, 2 - math.floor(math.log10(cents)))}f}"
    if float(text) >= 100:  # a dollar or more, after rounding
        return f"{sign}${value:,.0f}" if value >= 999.5 else f"{sign}${value:.3g}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{sign}{text}¢"


def fmt_percent(values: Sequence[float], signed: bool = False, decimals: int = 1) -> str:
    mean, sd = mean_sd([v * 100 for v in values])
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    return text + (f" ± {sd:.{decimals}f}" if sd else "") + "%"


def fmt_accuracy(interval: dict) -> str:
    """``acc 80.0% [72.2, 87.8]``: an ``stats.accuracy_interval`` with its 95% interval."""
    text = f"acc {interval['mean'] * 100:.1f}%"
    if interval["ci_low"] is not None:
        text += f" [{interval['ci_low'] * 100:.1f}, {interval['ci_high'] * 100:.1f}]"
    return text


def fmt_share(share: float) -> str:
    pct = share * 100
    return "100%" if abs(pct - 100) < 1e-9 else f"{pct:.3g}%"
