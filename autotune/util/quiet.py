"""Keep the libraries' chatter (deprecations, progress bars, logging) out of autotune's output."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Keep the libraries' deprecation chatter and progress bars out of autotune's output."""
    for variable, value in (("TRANSFORMERS_VERBOSITY", "error"),
                            ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                            ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(variable, value)
    quiet = os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    if quiet and "transformers" in sys.modules:  # imported already: the variable came late
        sys.modules["transformers"].logging.set_verbosity_error()
    if not os.environ.get("AUTOTUNE_DEBUG"):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
    warnings.resetwarnings()
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning"
    logging.getLogger("bitsandbytes").setLevel(logging.WARNING)
