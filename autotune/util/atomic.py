"""Files written whole or not at all: a temporary file in the same folder, synced, renamed."""

from __future__ import annotations

import json
import os
import tempfile

from autotune.util.errors import AutotuneError
from autotune.util.files import new_file_mode


def write_text(path: str, text: str, replace: bool = True) -> str:
    """Write ``text`` to ``path`` atomically; a failure is one :class:`AutotuneError` line.
    ``replace=False``: only if ``path`` does not exist when the file lands (a hard link,
    which fails on an existing name: no other process's file between check and write is
    overwritten)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, new_file_mode(path))  # a replaced file keeps its mode
            if replace:
                os.replace(temporary, path)
            else:
                os.link(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    except FileExistsError:
        raise AutotuneError(f"{path} already exists (pass --force to overwrite it)") from None
    except OSError as exc:
        raise AutotuneError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def write_json(path: str, document, **options) -> str:
    """``document`` as indented JSON, atomically."""
    return write_text(path, json.dumps(document, indent=2, ensure_ascii=False, **options))
