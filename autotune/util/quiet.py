"""Keep the libraries' chatter (deprecations, progress bars, logging) out of autotune's output."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

_LOUD = False
# loggers whose warnings are noise to autotune's user: bitsandbytes' CPU-kernel fallbacks, and
# `kernels` (which bitsandbytes asks for a hub kernel at import) on skipping its trust check
# offline
_CHATTY = ("bitsandbytes", "kernels")


def quiet_libraries() -> None:
    """Keep the libraries' deprecation chatter and progress bars out of autotune's output."""
    for variable, value in (("TRANSFORMERS_VERBOSITY", "error"),
                            ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                            ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(variable, value)
    quiet = os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    if quiet and "transformers" in sys.modules:  # imported already: the variable came late
        sys.modules["transformers"].logging.set_verbosity_error()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()  # the same, for datasets
    if not os.environ.get("AUTOTUNE_DEBUG"):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # torch on building a zero-width layer (a config's size 0, e.g. no shared expert)
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.ERROR)


OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
           "HF_HUB_DISABLE_TELEMETRY")


def offline() -> None:
    """Keep the Hugging Face libraries off the network (autotune never needs it: models and
    data are local files or the local hub cache), telemetry threads included. Set before
    they are imported: they read these once."""
    for variable in OFFLINE:
        os.environ[variable] = "1"


def loud_libraries() -> None:
    """Let the libraries' warnings and progress through again (``--verbose``)."""
    global _LOUD
    _LOUD = True
    warnings.resetwarnings()
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning"
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def native_stderr_quiet():
    """Silence what native code writes to file descriptor 2 (the PyTorch profiler's
    ``USDT ... profiler_start`` lines) unless ``--verbose`` or ``AUTOTUNE_DEBUG``."""
    if _LOUD or os.environ.get("AUTOTUNE_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def launch_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` for launched training processes, without the launchers' banners: torchrun
    warns about OMP_NUM_THREADS unless it is set (one thread per process, as it would), and
    torch's C++ warnings (DDP's "find_unused_parameters=True ... did not find any unused
    parameters", which MoE models whose steps skip experts need set) print unless the log
    level is raised; ``--verbose`` and ``AUTOTUNE_DEBUG`` keep the C++ warnings."""
    quiet = {} if _LOUD or os.environ.get("AUTOTUNE_DEBUG") else {"TORCH_CPP_LOG_LEVEL": "ERROR"}
    return {"OMP_NUM_THREADS": "1", **quiet, **env}


class _Tolerant:
    """A stream whose writes never fail: once the reader is gone (a closed pipe, a hung-up
    terminal) the rest is dropped, so progress lines cannot stop the work they report on."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except OSError:
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError:
                self.broken = True

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tolerant_stderr() -> None:
    """Make ``sys.stderr`` a stream whose writes never fail (see :class:`_Tolerant`)."""
    if sys.stderr is not None and not isinstance(sys.stderr, _Tolerant):
        sys.stderr = _Tolerant(sys.stderr)
