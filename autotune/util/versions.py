"""The versions of the training libraries a prediction assumes, read without importing them.

A *stack* maps each of :data:`LIBRARIES` to a version string (``None``: not installed):
the installed one (:func:`library_versions`), or another machine's given with ``--stack``
(:func:`parse_stack`, :func:`resolve_stack`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

from autotune.util.errors import AutotuneError

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl")
"""The libraries whose versions change what a training step allocates."""
TRAINERS = ("llamafactory",)
"""Training programs a stack may name (``--stack llamafactory=0.9``), which prepare and
train the model their own way. Never read from the installation: ``autotune run`` trains
with its own loop, whatever else is installed."""
STACK_NAMES = LIBRARIES + TRAINERS
"""What a stack may name."""
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,3}((a|b|rc|\.?dev|\.?post)[0-9]*)?"
                      r"(\+[A-Za-z0-9.]+)?$", re.ASCII)
"""A release as pip names it: up to four numbers, a pre-, dev- or post-release tag, a
local label (``2.5.1+cu124``, ``1.15.0rc1``)."""


def library_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`LIBRARIES` (``None`` when it is not installed).

    Reads package metadata only: importing torch to ask would cost seconds.
    """
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def parse_stack(text: str) -> dict[str, str]:
    """``transformers=4.46,peft=0.13`` as a mapping, each library known and each version
    numeric (``4.46``, ``2.5.1+cu124``)."""
    found: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not name or not value:
            raise AutotuneError(f"--stack: {item!r} is not LIBRARY=VERSION "
                                "(e.g. transformers=4.46,peft=0.13)")
        if name in found:
            raise AutotuneError(f"--stack: {name} is given twice")
        if name not in STACK_NAMES:
            raise AutotuneError(f"--stack: unknown library {name!r} (one of "
                                f"{', '.join(STACK_NAMES)})")
        if not is_version(value):
            raise AutotuneError(f"--stack: {name} version {value!r} is not a version number "
                                "(e.g. 4.46 or 4.46.3)")
        found[name] = value
    if not found:
        raise AutotuneError("--stack: give LIBRARY=VERSION pairs (e.g. transformers=4.46)")
    return found


def is_version(text: str) -> bool:
    """Whether ``text`` is a release as pip names it (see :data:`_VERSION`)."""
    return bool(_VERSION.match(text))


def resolve_stack(stack: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    """Every library's version: those in ``stack``, the installed ones for the rest (and
    a trainer of :data:`TRAINERS` where ``stack`` names one)."""
    given = dict(stack or {})
    unknown = [name for name in given if name not in STACK_NAMES]
    if unknown:
        raise AutotuneError(f"unknown library {unknown[0]!r} in the stack (one of "
                            f"{', '.join(STACK_NAMES)})")
    return {**library_versions(), **given}


def at_least(found: str | None, wanted: str) -> bool:
    """Whether version ``found`` is ``wanted`` or later, by its leading numbers
    (``2.5.1+cu124`` >= ``2.5``); ``None`` (not installed) is never."""
    if found is None:
        return False
    return _numbers(found) >= _numbers(wanted)


def _numbers(text: str) -> tuple[int, ...]:
    found = [int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3]]
    return tuple(found + [0] * (3 - len(found)))
