"""Hook specifications: the whole plugin API of autotune.

Every hook here is public: renaming or removing an argument is a breaking change,
adding one is not (pluggy passes an implementation only the arguments it names).
Plugins implement hooks with ``@autotune.hookimpl``; built-in plugins
(``autotune_plugins.*``) are written exactly like third-party ones, which arrive
through the ``autotune`` entry-point group.

Registration hooks hand the plugin a ``register`` callback; the core validates each
object, records which plugin registered it, and refuses duplicate names. The
behaviour itself lives on the registered objects:

* :class:`~autotune.plugin.registry.ModelFamily` -- recognise a ``config.json``
  (:meth:`~autotune.plugin.registry.ModelFamily.matches`), name its module groups
  (attention, MLP, experts, embeddings, output head:
  :meth:`~autotune.plugin.registry.ModelFamily.module_groups`) and describe an
  architecture exactly, including ones transformers cannot build such as remote-code
  models (:meth:`~autotune.plugin.registry.ModelFamily.describe`).
* :class:`~autotune.plugin.registry.Stage` -- everything about a training stage: the rows
  it trains on (``schema``, ``normalise``), the methods it allows, its batching, the extra
  memory it needs (:meth:`~autotune.plugin.registry.Stage.extra_memory`), its trainer, its
  options (offered by ``plan`` and ``run``) and its names in exported configs.

Plugins import these from the top-level package (``from autotune import Stage``): its
``__all__`` is the stable API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from autotune.plugin.registry import ModelFamily, Stage

hookspec = pluggy.HookspecMarker("autotune")

# -- registration hooks: called once per command, collect-all -----------------------


@hookspec
def register_model_families(register: Callable[[ModelFamily], None]) -> None:
    """Register model families (llama, qwen, deepseek, ...).

    Called once when the registry is first consulted. Call ``register(MyFamily())``
    once per family. Family names must be unique across installed plugins: a clash is
    an error that names both plugins. A family that ships model profiles points its
    ``profiles`` attribute at a folder of profile YAML files.

    :param register: callback taking a :class:`~autotune.plugin.registry.ModelFamily` instance.
    """


@hookspec
def register_stages(register: Callable[[Stage], None]) -> None:
    """Register training stages (pt, sft, dpo, ...).

    Called once when the registry is first consulted. Call ``register(MyStage())``
    once per stage; names must be unique across installed plugins.

    :param register: callback taking a :class:`~autotune.plugin.registry.Stage` instance.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``autotune`` command line.

    Called once while the CLI is built. Decorate new commands with ``@cli.command()``.

    :param cli: the top-level click group.
    """
