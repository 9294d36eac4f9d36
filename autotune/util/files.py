"""Files autotune reads and writes: one cache folder, bounded reads of regular files only,
and one rule for overwriting."""

from __future__ import annotations

import errno
import os
import stat

from autotune.util.errors import AutotuneError

MiB = 2**20


def cache_dir() -> str:
    """``$AUTOTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/autotune`` or ``~/.cache/autotune``
    (not created here: a missing or unwritable cache only means nothing is kept)."""
    return os.environ.get("AUTOTUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "autotune")


def regular_file(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """``path``'s status, or one error when it is missing or no regular file (a folder, a
    FIFO, a device such as ``/dev/zero``: reading those would block or never end)."""
    shown = os.fspath(path)
    try:
        info = os.stat(shown)
    except OSError as exc:
        raise AutotuneError(f"cannot read {what} {shown}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = ("a folder" if stat.S_ISDIR(info.st_mode) else
                "a FIFO" if stat.S_ISFIFO(info.st_mode) else
                "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        raise AutotuneError(f"{what} {shown} is {kind}, not a regular file")
    return info


def read_bytes(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refused when larger than ``limit``."""
    shown = os.fspath(path)
    info = regular_file(shown, what)
    if info.st_size > limit:
        raise AutotuneError(f"{what} {shown} is {info.st_size:,} bytes, more than the "
                            f"{limit:,} autotune reads")
    try:
        with open(shown, "rb") as handle:
            data = handle.read(limit + 1)  # it may have grown since
    except OSError as exc:
        raise AutotuneError(f"cannot read {what} {shown}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise AutotuneError(f"{what} {shown} is more than the {limit:,} bytes autotune reads")
    return data


def read_json(path: str | os.PathLike, what: str = "file", limit: int = 64 * MiB):
    """The JSON document in the regular file ``path`` (at most ``limit`` bytes), or one
    error naming it."""
    import json

    data = read_bytes(path, limit, what)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise AutotuneError(f"cannot read {what} {os.fspath(path)}: {exc}") from None


def file_on_the_way(folder: str) -> str | None:
    """The nearest of ``folder`` and its parents that exists, where it is no folder (a
    file a path runs through)."""
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder if folder and not os.path.isdir(folder) else None


def check_new_file(path: str | None, force: bool, option: str,
                   inputs: tuple[str | None, ...] = ()) -> None:
    """The one overwrite rule: ``path`` (given to ``option``) may be written only when it does
    not exist, or with ``--force``; never over a folder or other non-file, and never over one
    of the command's own ``inputs`` (the ``--data`` file), whatever ``--force`` says."""
    if not path:
        return
    if path == "-":
        raise AutotuneError(f"{option} -: autotune writes a file there, not to standard "
                            "output (--json prints the document); give a file name")
    for source in inputs:
        if source and _same(path, source):
            raise AutotuneError(f"{option} {path} is the input file {source} itself: "
                                "give another path")
    if not os.path.lexists(path):
        parent = file_on_the_way(os.path.dirname(os.path.abspath(path)))
        if parent:
            raise AutotuneError(f"{option} {path}: {parent} is a file, not a folder")
        return
    if not os.path.isfile(path):
        raise AutotuneError(f"{option} {path} exists and is not a regular file")
    if not force:
        raise AutotuneError(f"{path} already exists (pass --force to overwrite it)")


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def new_file_mode(path: str) -> int:
    """The mode a file written to ``path`` should get: the replaced file's, else what the
    umask leaves of 0666 (a temporary file starts at 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                errno.EPERM, errno.EIO}
"""What the file system says when a write is refused: a full disk, a quota, a read-only or
failing one."""


_WRITERS = ("PytorchStreamWriter", "inline_container", "Error while serializing")
"""What torch's checkpoint writer (a RuntimeError) and safetensors (a SafetensorError) say
when the file system refuses a write: they carry no errno."""


def write_error(exc: BaseException) -> OSError | None:
    """``exc`` as the refused write it is, else ``None``: the file system's own error, or
    torch's or safetensors' writer failing on one (a full disk, a file-size limit)."""
    if isinstance(exc, OSError):
        return exc if exc.errno in WRITE_ERRORS else None
    if isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError":
        text = str(exc)
        if any(writer in text for writer in _WRITERS):
            return OSError(errno.EIO, "the file system refused a write (a full disk or a "
                                      f"file-size limit?): {text.splitlines()[0][:160]}")
    return None
