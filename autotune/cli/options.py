"""Options the installed stages define: ``--stage`` choices and each stage's own options."""

from __future__ import annotations

import copy
import functools

import click
import pluggy

from autotune.plugin.registry import Option, option_problem, stage_named, stage_settings, stages

STAGE_OPTIONS = "autotune.stage_options"
"""``click.Context.meta`` key: the stage options given on the command line."""
WITH_OPTIONS = ("plan", "run")
"""Commands that write a plan and so take the stages' own options."""


def with_stages(command: click.Command, pm: pluggy.PluginManager) -> click.Command:
    """A copy of ``command`` whose ``--stage`` offers the installed stages and which, for
    ``plan`` and ``run``, takes every stage's :attr:`~autotune.Stage.options` (read them
    back with :func:`given`)."""
    found = stages(pm)
    params = []
    for param in command.params:
        if param.name == "stage":
            param = copy.copy(param)
            # plan and run train on data: the stages that read it; estimate prices any
            param.type = click.Choice(sorted(
                name for name, stage in found.items()
                if command.name not in WITH_OPTIONS or (stage.trains and stage.schema)))
        params.append(param)
    declared: dict[str, str] = {}
    if command.name in WITH_OPTIONS:
        for stage in found.values():
            for option in stage.options:
                if option.name in declared:
                    declared[option.name] += f", {stage.name}"
                    continue
                declared[option.name] = stage.name
                params.append(click.Option(
                    ["--" + option.name.replace("_", "-"), option.name],
                    type=type(option.default), default=None, callback=_checked(option),
                    help=f"{option.help} [{stage.name}; default: {option.default}]"))
    if not declared and params == command.params:
        return command
    command = copy.copy(command)
    command.params = params
    callback = command.callback

    @functools.wraps(callback)
    def invoke(*args, **kwargs):
        chosen = {name: kwargs.pop(name) for name in declared}
        click.get_current_context().meta[STAGE_OPTIONS] = chosen
        return callback(*args, **kwargs)

    command.callback = invoke
    return command


def _checked(option: Option):
    """A click callback refusing a value ``option`` cannot take, before any work."""
    def check(_ctx, _param, value):
        problem = option_problem(option, value)
        if problem:
            raise click.BadParameter(problem)
        return value

    return check


def override(plan: dict, pm: pluggy.PluginManager) -> dict:
    """``plan`` with the stage options given on the command line in its ``training``
    section (``run plan.yaml --beta 0.2``); an option of another stage is an error."""
    chosen = {k: v for k, v in given().items() if v is not None}
    if chosen:
        settings = stage_settings(stage_named(pm, plan["recipe"]["stage"]), chosen)
        plan.setdefault("training", {}).update({k: settings[k] for k in chosen})
    return plan


def from_user(name: str) -> bool:
    """Whether option ``name`` of the running command was given by the user (on the command
    line or through its environment variable), not left at its default."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def given() -> dict:
    """The stage options given to the running command (``{}`` outside one)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(STAGE_OPTIONS, {})) if ctx else {}
