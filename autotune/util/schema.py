"""Strict checks for the data files autotune ships and reads (profiles, the GPU catalogue)."""

from __future__ import annotations

from typing import Any

from autotune.util.errors import AutotuneError


def check_keys(data: Any, fields: dict[str, tuple[Any, bool]], where: str, what: str) -> None:
    """``data`` is a mapping with no unknown and no missing keys of ``fields``.

    ``fields`` maps each key to ``(type, required)``; errors name ``where``.
    """
    if not isinstance(data, dict):
        raise AutotuneError(f"{where}: expected a mapping of {what} fields, "
                            f"got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise AutotuneError(f"{where}: unknown key(s) {', '.join(unknown)} "
                            f"(allowed: {', '.join(fields)})")
    missing = [k for k, (_, required) in fields.items() if required and k not in data]
    if missing:
        raise AutotuneError(f"{where}: missing key(s) {', '.join(missing)}")
