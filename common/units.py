"""Byte sizes as people write them ("6GB", "512 MiB") and as moestream prints them."""

from __future__ import annotations

import re

from .errors import OptionsError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(value: int | float | str | None) -> int | None:
    """Bytes from an int or a string like "6GB", "6 GiB", "512MB", "1.5e9"; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OptionsError(f"a memory size must be a number of bytes or a string like 6GB, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise OptionsError(f"a memory size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise OptionsError(f"cannot read {value!r} as a memory size; use e.g. 6GB, 800MB, 4GiB or a byte count")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise OptionsError(f"a memory size must be positive, got {value!r}")
    return n


def fmt_bytes(n: int | float | None, none: str = "unlimited") -> str:
    """"6.47 GB", "512.00 KB", "12 B" (decimal units, as disks and the Hub count); `none` for None."""
    if n is None:
        return none
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
