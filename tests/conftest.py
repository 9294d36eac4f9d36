"""Shared fixtures: a plugin manager with built-ins only, and tiny model configs."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per worker: the cores are shared
    os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import autotune_plugins  # noqa: F401
except ImportError as exc:  # pragma: no cover - a hint, not a test
    raise SystemExit("autotune is not installed: run `pip install -e '.[test]'` first") from exc

from benchmarks.accuracy_grid import ARCHITECTURES
from autotune.plugin.manager import get_plugin_manager

# Small configs of several architectures (GQA, biases, a vocabulary >= 64k, tied
# embeddings, MLA + MoE): the accuracy benchmark's own, built in milliseconds.
TINY = ARCHITECTURES


@pytest.fixture(scope="session")
def pm():
    """A plugin manager with the built-in plugins only: installed plugins never leak in."""
    return get_plugin_manager(load_entrypoints=False)


@pytest.fixture(autouse=True)
def _process_plugin_manager():
    """The CLI makes the manager it runs on the process's (``use``), and code handed a stage
    by name reads it: each test leaves it as it found it, so one that ran the CLI with a
    misbehaving plugin does not hand that plugin to the next."""
    from autotune.plugin import manager

    before = list(manager._current)
    yield
    manager._current[:] = before


@pytest.fixture
def offline_machine(monkeypatch, tmp_path):
    """No GPU on this machine (whatever it has) and a private study cache."""
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("autotune.catalog.gpus.probe",
                        lambda: {"gpus": [], "nvidia": {"available": False}, "host": {}})
