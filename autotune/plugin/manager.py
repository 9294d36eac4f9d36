"""The plugin manager: built-in plugins first, then third-party entry points."""

from __future__ import annotations

import importlib
import os
import sys

import pluggy

from autotune.plugin import hookspecs
from autotune.util.errors import PluginError

ENTRY_POINT_GROUP = "autotune"

BUILTIN_PLUGINS = (
    "autotune_plugins.generic",
    "autotune_plugins.llama",
    "autotune_plugins.mistral",
    "autotune_plugins.qwen",
    "autotune_plugins.deepseek",
    "autotune_plugins.yuan",
    "autotune_plugins.pt",
    "autotune_plugins.sft",
    "autotune_plugins.dpo",
    "autotune_plugins.ppo",
    "autotune_plugins.inference",
)


def get_plugin_manager(load_entrypoints: bool | None = None) -> pluggy.PluginManager:
    """Build a plugin manager with the built-ins and (unless disabled) installed plugins.

    ``AUTOTUNE_DISABLE_PLUGINS=a,b`` blocks plugins by name (built-in dotted names or
    entry-point names); ``AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points.
    """
    pm = pluggy.PluginManager("autotune")
    pm.add_hookspecs(hookspecs)
    for name in filter(None, os.environ.get("AUTOTUNE_DISABLE_PLUGINS", "").split(",")):
        pm.set_blocked(name.strip())
    for name in BUILTIN_PLUGINS:
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(name), name=name)
    if load_entrypoints is None:
        load_entrypoints = not os.environ.get("AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD")
    if load_entrypoints:
        _load_entrypoints(pm)
    pm.check_pending()
    return pm


_current: list[pluggy.PluginManager] = []


def use(pm: pluggy.PluginManager) -> pluggy.PluginManager:
    """Make ``pm`` the process's plugin manager (the CLI calls it with the one it runs on)."""
    _current[:] = [pm]
    return pm


def current_manager() -> pluggy.PluginManager:
    """The plugin manager the CLI runs on, else one built now (and kept) with the defaults:
    for code that is handed a stage or family by name only."""
    return _current[0] if _current else use(get_plugin_manager())


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    """Like ``pm.load_setuptools_entrypoints``, but a broken plugin is a warning, not a crash."""
    from importlib.metadata import distributions

    seen = set()
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or ep.name in seen or pm.is_blocked(ep.name):
                continue
            seen.add(ep.name)
            if pm.get_plugin(ep.name) is not None:
                print(f"autotune: plugin name {ep.name!r} already taken, skipping "
                      f"{dist.metadata['Name']}", file=sys.stderr)
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # noqa: BLE001
                # one broken plugin must not stop the CLI, nor end it (sys.exit at import)
                where = f"plugin {ep.name!r} (from {dist.metadata['Name']})"
                if os.environ.get("AUTOTUNE_STRICT_PLUGINS"):
                    raise PluginError(f"{where} failed to load: {_what(exc)}") from None
                print(f"autotune: warning: {where} failed to load, skipped: {_what(exc)}",
                      file=sys.stderr)


def _what(exc: BaseException) -> str:
    """``exc`` in one line: ``SystemExit: 0`` for a plugin that calls ``sys.exit(0)``."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())
