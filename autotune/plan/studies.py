"""Where studies are kept: an Optuna storage that any number of ``plan`` processes share.

A study is written once, whole: under an exclusive lock (a SQLite file's ``.lock`` beside it;
on a database server, the unique study name), its trials are added and then a ``complete``
mark is set; a study without the mark is never read. A process that finds the study being
written waits for it rather than writing a second copy. A storage that cannot be used (a
corrupted file, a read-only or missing cache folder, an in-memory URL) is
:class:`StorageUnavailable`: the planner then plans without storing, with one warning.

A study travels as a :class:`Study` (trials as plain rows). A SQLite file of Optuna's
current schema is read and written by :mod:`autotune.plan.sqlitestudy` without importing
Optuna; other URLs and schemas go through Optuna's API.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

from autotune.plan import sqlitestudy
from autotune.util.errors import AutotuneError
from autotune.util.files import cache_dir

COMPLETE = "autotune_complete"
"""The study attribute set once every trial is written (the trial count)."""
WRITING = "autotune_writing_since"
"""The study attribute a writer sets first (a Unix time): how stale an unfinished study is."""
WAIT = 300.0
"""Seconds to wait for another process to finish writing a study, or to take a lock."""
STALE = 600.0
"""An unfinished study older than this (its writer died) is written again."""


class StorageUnavailable(AutotuneError):
    """The study storage cannot be used; planning goes on without it."""


@dataclass
class Study:
    """A study's rows: each trial a dict of ``state`` (Optuna's state name), ``params``,
    ``choices`` (each parameter's categorical choices), ``values`` (the two objectives, or
    ``None``) and ``attrs`` (user attributes); ``attrs``: the study's user attributes."""

    trials: list[dict]
    attrs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, study, attrs: dict) -> Study:
        """The rows of an Optuna ``study``, with study attributes ``attrs``."""
        return cls([{"state": t.state.name, "params": t.params,
                     "choices": {k: d.choices for k, d in t.distributions.items()},
                     "values": t.values, "attrs": t.user_attrs} for t in study.trials], attrs)


PRICING = ("autotune.cost", "autotune.catalog", "autotune.plan", "autotune_plugins")
"""The packages whose code prices and ranks a study's trials (the built-in families and
stages among them)."""


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of the :data:`PRICING` packages' source: a stored study's figures come from
    the code that priced them, so changed code prices anew."""
    import hashlib
    import importlib
    from pathlib import Path

    digest = hashlib.sha1()
    for name in PRICING:
        for root in importlib.import_module(name).__path__:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(f"{name}/{path.relative_to(root).as_posix()}".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_storage() -> str:
    """SQLite in the cache folder (:func:`autotune.util.files.cache_dir`)."""
    return f"sqlite:///{os.path.join(cache_dir(), 'studies.db')}"


def sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL, ``None`` for other URLs; an in-memory SQLite
    URL keeps nothing between processes and is :class:`StorageUnavailable`."""
    scheme, _, rest = url.partition("://")
    if not scheme.lower().startswith("sqlite"):
        return None
    if not rest.startswith("/") or "?" in rest:  # options, or no file: SQLAlchemy reads it
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            database = make_url(url).database
        except ArgumentError as exc:
            raise StorageUnavailable(f"{url!r} is not a storage URL ({exc})") from None
    else:
        database = rest[1:]
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise StorageUnavailable(f"{url!r} is an in-memory database, which keeps nothing")
    return os.path.abspath(database)


@contextmanager
def locked(url: str, timeout: float = WAIT) -> Iterator[None]:
    """Hold the storage's write lock: an exclusive ``flock`` on ``<database>.lock`` for a
    SQLite file (the database server's own transactions serve other URLs)."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    import fcntl

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StorageUnavailable(f"cannot use {os.path.dirname(path)}: "
                                 f"{exc.strerror or exc}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageUnavailable(f"{path}.lock is held by another process "
                                             f"for more than {timeout:.0f} s") from None
                time.sleep(0.05)
            except OSError as exc:  # a file system without locks
                raise StorageUnavailable(f"cannot lock {path}.lock: "
                                         f"{exc.strerror or exc}") from None
        yield
    finally:
        os.close(fd)


def open_storage(url: str):
    """The Optuna storage at ``url``; any problem is :class:`StorageUnavailable`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines are not ours

    path = sqlite_file(url)
    for attempt in range(3):
        try:
            if path is not None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            storage = optuna.storages.RDBStorage(url)
            break
        except Exception as exc:  # any driver error becomes one line
            if path is None and attempt < 2:  # a server's schema created by two at once
                time.sleep(0.5)
                continue
            raise StorageUnavailable(f"cannot open study storage {url!r}: "
                                     f"{_first_line(exc)}") from exc
    if path is not None:
        from sqlalchemy import event

        @event.listens_for(storage.engine, "connect")
        def _fast(connection, _record):  # a cache, not a ledger: trade durability for speed
            cursor = connection.cursor()
            cursor.execute("PRAGMA synchronous=OFF")
            cursor.execute("PRAGMA journal_mode=MEMORY")
            cursor.close()

        storage.engine.dispose()
    return storage


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text[:300]


class _Optuna:
    """A storage through Optuna's API: database servers, and files of other schemas."""

    def __init__(self, url: str):
        self.storage = open_storage(url)

    def complete(self, name: str, size: int) -> Study | None | bool:
        """The stored study ``name`` if completely written and covering ``size`` points;
        ``None`` if absent, ``False`` if present but unfinished."""
        import optuna

        try:
            study = optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:
            return None
        done = study.user_attrs.get(COMPLETE)
        if not (isinstance(done, int) and done >= size):
            return False
        return Study.of(study, study.user_attrs)

    def stale(self, name: str) -> bool:
        import optuna

        study = optuna.load_study(study_name=name, storage=self.storage)
        since = study.user_attrs.get(WRITING)
        return not isinstance(since, (int, float)) or time.time() - since > STALE

    def delete(self, name: str) -> None:
        import optuna

        optuna.delete_study(study_name=name, storage=self.storage)

    def write(self, name: str, study: Study) -> None:
        """Create ``name`` and add the trials (parameters, distributions, values and user
        attributes), then mark it done."""
        import optuna
        from optuna.distributions import CategoricalDistribution

        stored = optuna.create_study(study_name=name, storage=self.storage,
                                     directions=["maximize", "maximize"])
        stored.set_user_attr(WRITING, time.time())
        for key, value in study.attrs.items():
            stored.set_user_attr(key, value)
        stored.add_trials([optuna.trial.create_trial(
            state=optuna.trial.TrialState[t["state"]], values=t["values"], params=t["params"],
            distributions={k: CategoricalDistribution(v) for k, v in t["choices"].items()},
            user_attrs=t["attrs"]) for t in study.trials])
        stored.set_user_attr(COMPLETE, len(study.trials))


class _SQLite:
    """A SQLite file of Optuna's schema, read and written without Optuna (one transaction
    per write: a study is never seen half written)."""

    def __init__(self, path: str):
        self.connection = sqlitestudy.connect(path)

    def complete(self, name: str, size: int) -> Study | None | bool:
        attrs = sqlitestudy.study_attrs(self.connection, name)
        if attrs is None:
            return None
        done = attrs.get(COMPLETE)
        if not (isinstance(done, int) and done >= size):
            return False
        return Study(sqlitestudy.read_trials(self.connection, name), attrs)

    def delete(self, name: str) -> None:
        with self._transaction():
            sqlitestudy.delete(self.connection, name)

    def write(self, name: str, study: Study) -> None:
        attrs = {WRITING: time.time(), **study.attrs, COMPLETE: len(study.trials)}
        with self._transaction():
            sqlitestudy.write(self.connection, name, attrs, study.trials)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")


def open_backend(url: str) -> _Optuna | _SQLite:
    """The storage at ``url``: a SQLite file of Optuna's schema directly, anything else
    through Optuna; any problem is :class:`StorageUnavailable`."""
    path = sqlite_file(url)
    if path is None:
        return _Optuna(url)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _SQLite(path)
    except sqlitestudy.OtherSchema:
        return _Optuna(url)
    except (OSError, sqlite3.Error) as exc:
        raise StorageUnavailable(f"cannot open study storage {url!r}: "
                                 f"{_first_line(exc)}") from exc


def load_or_store(url: str, name: str, size: int, compute: Callable[[], Study],
                  wait: float = WAIT) -> tuple[Study, bool, bool]:
    """``(study, reused, stored)``: the complete stored study ``name`` (of ``size`` points),
    else ``compute()`` stored once under the lock.

    ``stored`` is False when the storage could not be used: one warning says so, and the
    computed study is returned all the same. Errors of ``compute`` itself pass through.
    """
    try:
        with locked(url, wait):
            backend = _guard(open_backend, url)
            found = _guard(backend.complete, name, size)
    except StorageUnavailable as exc:
        warn(url, exc)
        return compute(), False, False
    if found:
        return found, True, True
    study = compute()
    try:
        with locked(url, wait):
            found = _guard(backend.complete, name, size)
            if found:
                return found, True, True
            if found is False and (sqlite_file(url) is not None
                                   or _guard(backend.stale, name)):
                # unfinished and no one writing it (the lock is ours, or its writer died)
                _guard(backend.delete, name)
            try:
                _guard(backend.write, name, study)
                return study, False, True
            except StorageUnavailable as exc:
                if type(exc.__cause__).__name__ != "DuplicatedStudyError":
                    raise
        # a server: another process is writing it now; take its copy when done
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            found = _guard(backend.complete, name, size)
            if found:
                return found, True, True
            time.sleep(0.2)
        return study, False, True
    except StorageUnavailable as exc:
        warn(url, exc)
        return study, False, False


def _guard(function, *args, **kwargs):
    """``function(...)``, its storage errors as :class:`StorageUnavailable`."""
    try:
        return function(*args, **kwargs)
    except StorageUnavailable:
        raise
    except Exception as exc:  # a driver's, a lock's or Optuna's error
        raise StorageUnavailable(f"{type(exc).__name__}: {_first_line(exc)}") from exc


def warn(url: str, exc: Exception) -> None:
    """The one warning line a broken storage costs (a password in its URL not shown)."""
    text = str(exc).replace("\n", " ")
    shown = url
    try:
        password = urlsplit(url).password
    except ValueError:  # an unreadable port or address: nothing to hide that parses
        password = None
    if password:
        shown, text = url.replace(password, "***"), text.replace(password, "***")
    print(f"autotune: warning: study storage {shown} unusable ({text}); planning without "
          "storing", file=sys.stderr, flush=True)
