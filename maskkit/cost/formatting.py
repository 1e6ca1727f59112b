"""Numbers as the tables show them: bytes, SI prefixes, seconds, ratios, percentages."""

from __future__ import annotations

import math

MISSING = "–"


def format_bytes(value: float | None) -> str:
    """``1536`` → ``1.50 KiB``; ``None`` → ``–``."""
    if value is None:
        return MISSING
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_si(value: float | None, unit: str = "") -> str:
    """``1.97e11, "FLOP"`` → ``197 GFLOP`` (three significant digits); ``0`` or ``None`` → ``–``."""
    if value is None or value == 0:
        return MISSING
    exponent = min(max(math.floor(math.log10(abs(value)) / 3), 0), 5)
    prefix = ("", "k", "M", "G", "T", "P")[exponent]
    scaled = value / 1000**exponent
    digits = 0 if abs(scaled) >= 100 else 1 if abs(scaled) >= 10 else 2
    return f"{scaled:.{digits}f} {prefix}{unit}".rstrip()


def format_seconds(value: float | None) -> str:
    """Below a second in ms (``37.1 ms``), else in s (``2.32 s``)."""
    if value is None:
        return MISSING
    if abs(value) < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def format_count(value: int | None) -> str:
    """A parameter count with an SI prefix; ``0`` for none."""
    return format_si(value) if value else "0"


def format_ratio(value: float | None, digits: int = 2) -> str:
    """``2.264`` → ``2.26×``."""
    return MISSING if value is None else f"{value:.{digits}f}×"


def format_percent(fraction: float | None) -> str:
    """``0.397`` → ``39.7 %``."""
    return MISSING if fraction is None else f"{100 * fraction:.1f} %"


def format_share(part: float | None, total: float | None) -> str:
    """``part`` as a percentage of ``total`` (``–`` when either is missing or the total is 0)."""
    return format_percent(part / total) if part is not None and total else MISSING
