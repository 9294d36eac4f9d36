"""Byte sizes: parse what users type (``24GiB``, ``80GB``, ``16000MiB``) and print GiB."""

from __future__ import annotations

import re

from autotune.util.errors import AutotuneError

GiB = 1024**3
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``24GiB`` (binary), ``80GB`` (decimal), a bare number is GiB."""
    found = _SIZE.match(str(text))
    if not found or found.group(2).lower() not in _UNITS:
        raise AutotuneError(f"cannot read {text!r} as a size (try 24GiB or 80GB)")
    value, unit = float(found.group(1)), found.group(2).lower()
    size = value * (_UNITS[unit] if unit else GiB)
    if not size < 2**64:  # also inf: "9999...9GB" overflows a float
        raise AutotuneError(f"size {text!r} is too large (at most 16 EiB)")
    size = int(size)
    if size <= 0:
        raise AutotuneError(f"size {text!r} must be positive")
    return size


def gib(n: float) -> str:
    """``n`` bytes as GiB with two decimals."""
    return f"{n / GiB:.2f} GiB"
