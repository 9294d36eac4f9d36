"""The versions of the training libraries a prediction assumes, read without importing them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl")
"""The libraries whose versions change what a training step allocates."""


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
