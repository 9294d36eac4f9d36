"""Where studies are kept: an Optuna storage that any number of ``plan`` processes share.

A study is written once, whole: under an exclusive lock (a SQLite file's ``.lock`` beside it;
on a database server, the unique study name), its trials are added and then a ``complete``
mark is set; a study without the mark is never read. A process that finds the study being
written waits for it rather than writing a second copy. A storage that cannot be used (a
corrupted file, a read-only or missing cache folder, an in-memory URL) is
:class:`StorageUnavailable`: the planner then plans without storing, with one warning.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def default_storage() -> str:
    """SQLite in the cache folder (:func:`autotune.util.files.cache_dir`)."""
    return f"sqlite:///{os.path.join(cache_dir(), 'studies.db')}"


def sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL, ``None`` for other URLs; an in-memory SQLite
    URL keeps nothing between processes and is :class:`StorageUnavailable`."""
    if not url.lower().startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError as exc:
        raise StorageUnavailable(f"{url!r} is not a storage URL ({exc})") from None
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


def _complete(storage, name: str, size: int):
    """The stored study ``name`` if it is completely written and covers ``size`` points;
    ``None`` if absent, ``False`` if present but unfinished."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    done = study.user_attrs.get(COMPLETE)
    return study if isinstance(done, int) and done >= size else False


def _write(storage, name: str, study) -> None:
    """Create ``name`` in ``storage`` and copy ``study``'s trials into it (parameters,
    distributions, values and user attributes: what ``optuna-dashboard`` and
    ``trials_dataframe`` read), then mark it done."""
    import optuna

    stored = optuna.create_study(study_name=name, storage=storage,
                                 directions=["maximize", "maximize"])
    stored.set_user_attr(WRITING, time.time())
    for key, value in study.user_attrs.items():
        stored.set_user_attr(key, value)
    trials = [optuna.trial.create_trial(state=t.state, values=t.values, params=t.params,
                                        distributions=t.distributions, user_attrs=t.user_attrs)
              for t in study.trials]
    if not _insert_all(stored, trials):
        stored.add_trials(trials)
    stored.set_user_attr(COMPLETE, len(trials))


def _insert_all(study, trials: list) -> bool:
    """Write ``trials`` into ``study`` (new, empty, ours under the lock) in one transaction
    of bulk inserts into Optuna's own tables; ``False`` (nothing written) where the storage
    is not Optuna's RDB storage of this schema, and ``study.add_trials`` must do it."""
    import json

    from optuna.distributions import distribution_to_json
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models

    storage = getattr(study._storage, "_backend", study._storage)  # Optuna's cache wraps it
    if not isinstance(storage, RDBStorage):
        return False
    session = storage.scoped_session()
    try:
        rows = [models.TrialModel(study_id=study._study_id, number=i, state=t.state,
                                  datetime_start=t.datetime_start,
                                  datetime_complete=t.datetime_complete)
                for i, t in enumerate(trials)]
        session.add_all(rows)
        session.flush()  # the trial ids
        for row, t in zip(rows, trials):
            session.add_all(models.TrialParamModel(
                trial_id=row.trial_id, param_name=name,
                param_value=t.distributions[name].to_internal_repr(value),
                distribution_json=distribution_to_json(t.distributions[name]))
                for name, value in t.params.items())
            for objective, value in enumerate(t.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                session.add(models.TrialValueModel(trial_id=row.trial_id, objective=objective,
                                                   value=stored, value_type=kind))
            session.add_all(models.TrialUserAttributeModel(
                trial_id=row.trial_id, key=key, value_json=json.dumps(value))
                for key, value in t.user_attrs.items())
        session.commit()
    except Exception:  # noqa: BLE001 -- another schema: Optuna's own path writes it
        session.rollback()
        return False
    finally:
        session.close()
    return True


def _stale(storage, name: str) -> bool:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    since = study.user_attrs.get(WRITING)
    return not isinstance(since, (int, float)) or time.time() - since > STALE


def load_or_store(url: str, name: str, size: int, compute: Callable[[], object],
                  wait: float = WAIT) -> tuple[object, bool, bool]:
    """``(study, reused, stored)``: the complete stored study ``name`` (of ``size`` points),
    else ``compute()`` stored once under the lock.

    ``stored`` is False when the storage could not be used: one warning says so, and the
    computed study is returned all the same. Errors of ``compute`` itself pass through.
    """
    import optuna

    try:
        with locked(url, wait):
            storage = _guard(open_storage, url)
            found = _guard(_complete, storage, name, size)
    except StorageUnavailable as exc:
        warn(url, exc)
        return compute(), False, False
    if found:
        return found, True, True
    study = compute()
    try:
        with locked(url, wait):
            found = _guard(_complete, storage, name, size)
            if found:
                return found, True, True
            if found is False and (sqlite_file(url) is not None
                                   or _guard(_stale, storage, name)):
                # unfinished and no one writing it (the lock is ours, or its writer died)
                _guard(optuna.delete_study, study_name=name, storage=storage)
            try:
                _guard(_write, storage, name, study)
                return study, False, True
            except StorageUnavailable as exc:
                if not isinstance(exc.__cause__, optuna.exceptions.DuplicatedStudyError):
                    raise
        # a server: another process is writing it now; take its copy when done
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            found = _guard(_complete, storage, name, size)
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
    """The one warning line a broken storage costs."""
    text = str(exc).replace("\n", " ")
    print(f"autotune: warning: study storage {url} unusable ({text}); planning without "
          "storing", file=sys.stderr, flush=True)
