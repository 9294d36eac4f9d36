"""Files written whole or not at all: a temporary file in the same folder, synced, renamed."""

from __future__ import annotations

import errno
import json
import os
import tempfile

from autotune.util.errors import AutotuneError
from autotune.util.files import file_on_the_way, new_file_mode


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
            elif not _land_new(temporary, path):
                raise AutotuneError(f"{path} already exists (pass --force to overwrite it)")
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    except OSError as exc:
        parent = file_on_the_way(folder)
        if parent:
            raise AutotuneError(f"cannot write {path}: {parent} is a file, not a folder") \
                from None
        raise AutotuneError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _land_new(temporary: str, path: str) -> bool:
    """Move ``temporary`` to ``path`` only where no file is (whether it did): a hard link
    (atomic, fails on an existing name); on a file system without hard links, a rename
    after a last check."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(path):
            return False
        os.rename(temporary, path)
    return True


def write_json(path: str, document, **options) -> str:
    """``document`` as indented JSON, atomically."""
    return write_text(path, json.dumps(document, indent=2, ensure_ascii=False, **options))
