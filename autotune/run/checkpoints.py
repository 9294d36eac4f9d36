"""Checkpoints a run can resume from, the signals that ask for one, and the lock that
says a run folder is still being written.

The Trainer writes ``checkpoint-N/`` in place, so a kill during a save leaves a folder
that looks like a checkpoint. A checkpoint counts only once its commit marker exists:
the marker is written (atomically) after the Trainer has finished the folder, and
folders without one are removed before resuming.

Every process that writes a run folder (the run, its launcher, each rank) holds a
shared lock on its ``run.lock``; an exclusive attempt tells whether any is still alive,
so neither ``--resume`` nor a cleanup acts on a folder an orphaned process still writes.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable

from autotune.util.atomic import write_json
from autotune.util.errors import AutotuneError
from autotune.util.files import read_json

MARKER = "autotune-complete.json"
LOCK = "run.lock"
STOP = "stop-requested"
"""Written by a launcher that was signalled: its ranks stop together at the next step."""
_STEP = re.compile(r"^checkpoint-(\d+)$")


def commit(folder: str, step: int, tokens: int) -> None:
    """Mark ``folder`` as a complete checkpoint of ``step``, with the ``tokens`` trained up to
    it (over every session of the run)."""
    write_json(os.path.join(folder, MARKER), {"step": step, "time": time.time(),
                                              "tokens": tokens})


def tokens_before(checkpoint: str | None) -> int:
    """The tokens trained up to ``checkpoint`` (0 from the start, or where its marker does
    not say: an older version's, or one damaged since; the count is a report's, not worth
    refusing a resume over)."""
    if checkpoint is None:
        return 0
    try:
        marker = read_json(os.path.join(checkpoint, MARKER), "checkpoint marker")
    except AutotuneError:
        return 0
    tokens = marker.get("tokens") if isinstance(marker, dict) else None
    return tokens if type(tokens) is int and tokens >= 0 else 0


def latest(trainer_dir: str) -> str | None:
    """The newest committed checkpoint under ``trainer_dir``; uncommitted ones are removed."""
    if not os.path.isdir(trainer_dir):
        return None
    found = []
    for name in os.listdir(trainer_dir):
        match = _STEP.match(name)
        if not match:
            continue
        path = os.path.join(trainer_dir, name)
        if os.path.exists(os.path.join(path, MARKER)):
            found.append((int(match.group(1)), path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    return max(found)[1] if found else None


class RunInterrupted(AutotuneError):
    """A signal stopped the run (``signal``: its number; ``step``: the last step taken)."""

    exit_code = 130

    def __init__(self, message: str, number: int | None = None, step: int | None = None):
        super().__init__(message)
        self.signal = number
        self.step = step


# --- the run folder's lock ----------------------------------------------------------------------

def claim(folder: str):
    """Hold ``folder`` for this process (a shared lock that its ranks share); refuse when
    another process, such as an orphaned launcher or rank, still writes to it."""
    handle = open(os.path.join(folder, LOCK), "a+", encoding="utf-8")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise AutotuneError(
            f"another process is still writing to {folder} (started by pid {holder}: an "
            "orphaned launcher or training rank?): stop it, then try again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def join(folder: str):
    """Hold ``folder`` beside the process that claimed it (one rank of a launched run)."""
    handle = open(os.path.join(folder, LOCK), "a+", encoding="utf-8")  # noqa: SIM115
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def alone(handle) -> bool:
    """Whether no other process holds the folder ``handle`` was claimed with."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(handle, fcntl.LOCK_SH)
    return True


# --- signals ------------------------------------------------------------------------------------

STOPPING = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                 if hasattr(signal, name))
"""The signals that ask a run to stop (SIGHUP: its terminal closed)."""


class Signals:
    """SIGINT, SIGTERM and SIGHUP for the life of a run, acted on as its phase allows.

    ``abort`` (preparing, loading): stop at once with :class:`RunInterrupted`.
    ``checkpoint`` (training): save a checkpoint after this step, then stop; a second
    signal stops at once. ``hold`` (saving the trained run): noted, acted on after.
    Handlers exist only in the main thread; elsewhere signals keep their defaults.
    """

    NUMBERS = STOPPING

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.mode = "abort"
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.NUMBERS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal"

    def _on_signal(self, number, _frame) -> None:
        first, self.received = self.received is None, self.received or number
        name = signal.Signals(number).name
        if self.mode == "abort" or (self.mode == "checkpoint" and not first):
            raise RunInterrupted(f"stopped by {name}", number)
        if not first:
            return
        if self.mode == "hold":
            self._say(f"{name}: the run has finished training; saving it first")
        else:
            self._say(f"{name}: saving a checkpoint after this step, then stopping (again to "
                      "stop at once)")

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(f"autotune: {message}", file=sys.stderr, flush=True)


class SaveSchedule:
    """When to checkpoint: every ``steps`` optimizer steps and/or every ``seconds``, and at
    once when a signal arrives or ``stop_file`` appears (then training stops after the save).
    The ranks of a multi-process run agree on both every step, so they stop together.
    ``tokens``: the tokens trained so far, recorded with each checkpoint."""

    def __init__(self, signals: Signals, tokens: Callable[[], int], steps: int | None = None,
                 seconds: float | None = None, stop_file: str | None = None):
        self.signals = signals
        self.tokens = tokens
        self.steps = steps
        self.seconds = seconds
        self.stop_file = stop_file
        self.stopped = False
        self._last = time.monotonic()

    def callback(self):
        from transformers import TrainerCallback

        schedule = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                due = bool((schedule.steps and state.global_step % schedule.steps == 0) or (
                    schedule.seconds and time.monotonic() - schedule._last >= schedule.seconds))
                stop = schedule.signals.received is not None or bool(
                    schedule.stop_file and os.path.exists(schedule.stop_file))
                due, stop = _agreed(due, stop)
                if due or stop:
                    control.should_save = True
                if stop:
                    control.should_training_stop = True
                    schedule.stopped = True

            def on_save(self, args, state, control, **kwargs):
                schedule._last = time.monotonic()
                if args.should_save:
                    commit(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                           state.global_step, schedule.tokens())

        return Callback()


def _agreed(*flags: bool) -> tuple[bool, ...]:
    """``flags`` or-ed over every rank of a multi-process run (as they are, in one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    values = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())
