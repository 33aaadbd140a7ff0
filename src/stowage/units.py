"""Human-readable sizes (pure)."""

from __future__ import annotations

import re
from typing import Any


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'; bytes below 1 KiB are shown whole."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float:
    """``30d``, ``12h``, ``15m``, ``90s`` or plain seconds → seconds."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (e.g. 30d, 12h, 15m, 90s, or seconds)")
    return float(m[1]) * _UNIT[m[2]]
