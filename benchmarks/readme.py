"""README.md's example outputs and timings, produced by running the commands (so they cannot drift).

    python benchmarks/readme.py                  rewrite every output block
    python benchmarks/readme.py --check          name the stale blocks (exit 1 if any)
    python benchmarks/readme.py --time demo      time `autotune run --demo`, write it in
    python benchmarks/readme.py --time tests     time the whole test suite, write it in

An output block is the text between ``<!-- output: autotune ARGS -->`` and ``<!-- end -->``:
a fenced ``$ autotune ARGS`` and what the command prints on the reference machine, which
these outputs pin whatever machine runs the script: no GPU, 24 GiB of RAM (22 available),
100 GiB of free disk, nothing in the Hugging Face cache, a fresh study cache. A timing is the
text between ``<!-- time: NAME -->`` and ``<!-- end -->``, measured on the machine that runs
``--time`` (its cores and RAM are written beside the figure).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GiB = 2**30
REFERENCE = {"ram": 24 * GiB, "available": 22 * GiB, "disk_free": 100 * GiB}
OUTPUT = re.compile(r"(<!-- output: (autotune [^\n]*?) -->\n)(.*?)(<!-- end -->)", re.S)
TIMING = re.compile(r"(<!-- time: (\w+) -->)(.*?)(<!-- end -->)", re.S)
TIMED = {"demo": [sys.executable, "-m", "autotune", "run", "--demo", "-q", "--output-dir"],
         "tests": [sys.executable, "-m", "pytest", "-q", "-n", "auto"]}  # as the README says


@contextlib.contextmanager
def reference_machine():
    """The machine the README's outputs describe, whatever machine runs them."""
    with tempfile.TemporaryDirectory() as scratch, mock.patch.dict(os.environ, {
            "AUTOTUNE_CACHE_DIR": os.path.join(scratch, "cache"),
            "HF_HUB_CACHE": os.path.join(scratch, "hub"), "AUTOTUNE_PROFILES_PATH": ""}), \
            mock.patch("autotune.catalog.gpus.probe",
                       lambda: {"gpus": [], "nvidia": {"available": False}, "host": {}}), \
            mock.patch("autotune.cost.host.machine_ram",
                       lambda: (REFERENCE["ram"], REFERENCE["available"])), \
            mock.patch("autotune.cost.host.free_disk", lambda _folder: REFERENCE["disk_free"]):
        yield


def output(command: str) -> str:
    """``command``'s output on the reference machine, as its README block holds it."""
    from click.testing import CliRunner

    from autotune.cli.main import make_cli
    from autotune.plugin.manager import get_plugin_manager

    args = shlex.split(command)[1:]
    cwd = os.getcwd()
    os.chdir(ROOT)  # the README's paths are relative to the repository
    try:
        with reference_machine():
            result = CliRunner().invoke(make_cli(get_plugin_manager(load_entrypoints=False)),
                                        args)
    finally:
        os.chdir(cwd)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise RuntimeError(f"{command}: {result.exception!r}")
    return f"```text\n$ {command}\n{result.stdout.rstrip()}\n```\n"


def blocks(text: str) -> list[tuple[str, str]]:
    """(command, current block) of every output block in ``text``."""
    return [(m.group(2), m.group(3)) for m in OUTPUT.finditer(text)]


def stale(text: str, only=None) -> list[str]:
    """The commands whose README block is not what they print now (``only``: a filter)."""
    return [command for command, block in blocks(text)
            if (only is None or only(command)) and output(command) != block]


def regenerate(text: str) -> str:
    return OUTPUT.sub(lambda m: m.group(1) + output(m.group(2)) + m.group(4), text)


def measure(name: str) -> str:
    """``name``'s wall time on this machine, with the machine named."""
    from autotune.cost.host import machine_ram

    with tempfile.TemporaryDirectory() as scratch:
        command = TIMED[name] + ([os.path.join(scratch, "run")] if name == "demo" else [])
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT if name == "tests" else scratch, check=True,
                       capture_output=True)
        seconds = time.perf_counter() - start
    figure = f"{seconds:.0f} s" if seconds < 120 else \
        f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    load = os.getloadavg()[0]  # a shared machine's figure is only as good as its load
    return (f"{figure} measured on {os.cpu_count()} CPU cores, "
            f"{machine_ram()[0] / GiB:.0f} GiB of RAM, no GPU"
            + (f", load average {load:.0f}" if load > os.cpu_count() else ""))


def main() -> None:
    text = README.read_text(encoding="utf-8")
    if "--check" in sys.argv:
        found = stale(text)
        print("\n".join(f"stale: {c}" for c in found) or "README outputs are current")
        sys.exit(1 if found else 0)
    if "--time" in sys.argv:
        name = sys.argv[sys.argv.index("--time") + 1]
        figure = measure(name)
        text = TIMING.sub(lambda m: m.group(1) + figure + m.group(4) if m.group(2) == name
                          else m.group(0), text)
        print(f"{name}: {figure}")
    else:
        text = regenerate(text)
    README.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
