"""Checkpoints a run can resume from, and the signals that ask for one.

The Trainer writes ``checkpoint-N/`` in place, so a kill during a save leaves a folder
that looks like a checkpoint. A checkpoint counts only once its commit marker exists:
the marker is written (atomically) after the Trainer has finished the folder, and
folders without one are removed before resuming.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time

from autotune.util.atomic import write_json

MARKER = "autotune-complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")

def commit(folder: str, step: int) -> None:
    """Mark ``folder`` as a complete checkpoint of ``step``."""
    write_json(os.path.join(folder, MARKER), {"step": step, "time": time.time()})


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


class SaveSchedule:
    """When to checkpoint: every ``steps`` optimizer steps and/or every ``seconds``, and
    at once when SIGINT or SIGTERM arrives (then training stops after the save).

    Signal handlers are installed only while training (``with schedule:``); a second
    signal during the save falls through to the default action.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, steps: int | None = None, seconds: float | None = None,
                 quiet: bool = False):
        self.steps = steps
        self.seconds = seconds
        self.quiet = quiet
        self.signalled: int | None = None
        self._last = time.monotonic()
        self._previous: dict = {}

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        except ValueError:  # not the main thread: no handlers, checkpoints still taken
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _on_signal(self, number, _frame) -> None:
        self.signalled = number
        for s, handler in self._previous.items():  # a second signal acts at once
            signal.signal(s, handler)
        if not self.quiet:
            print(f"autotune: {signal.Signals(number).name}: saving a checkpoint after this "
                  "step, then stopping (again to stop at once)", file=sys.stderr, flush=True)

    def callback(self):
        from transformers import TrainerCallback

        schedule = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                due = (schedule.steps and state.global_step % schedule.steps == 0) or (
                    schedule.seconds and time.monotonic() - schedule._last >= schedule.seconds)
                if due or schedule.signalled:
                    control.should_save = True
                if schedule.signalled:
                    control.should_training_stop = True

            def on_save(self, args, state, control, **kwargs):
                schedule._last = time.monotonic()
                if args.should_save:
                    commit(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                           state.global_step)

        return Callback()
