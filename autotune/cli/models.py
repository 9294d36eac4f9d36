"""``autotune models``: the model profiles (ids and aliases ``--model`` accepts)."""

from __future__ import annotations

import json

import click

from autotune.cli.output import table
from autotune.catalog.models import ModelProfile, hidden_profiles, model_profiles, resolve_model

SCHEMA = "autotune.models/1"


def _billions(params: int) -> str:
    b = params / 1e9
    return f"{b:.2f}" if b >= 0.1 else f"{b:.3g}"


def _table(profiles: list[ModelProfile]) -> str:
    return table(["ID", "FAMILY", "PARAMS (B)", "CONTEXT", "NAME", "ALIASES"],
                 [(p.id, p.family, _billions(p.params), str(p.context or "-"), p.name,
                   ", ".join(p.aliases) or "-") for p in profiles], right={2, 3})


def _pm(obj):
    if obj is not None:
        return obj
    from autotune.plugin.manager import get_plugin_manager

    return get_plugin_manager()


@click.command("models")
@click.argument("spec", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def command(obj, spec: str | None, as_json: bool) -> None:
    """List the model profiles, or show what SPEC resolves to.

    SPEC is what --model accepts: a profile id or alias, a config.json, a model folder,
    or a hub id (org/name) already in the local Hugging Face cache (never downloaded).
    PARAMS is the verified total parameter count, in billions.
    """
    pm = _pm(obj)
    if spec:
        model = resolve_model(spec, pm)
        if as_json:
            click.echo(json.dumps({"schema": SCHEMA, "models": [model.to_dict()]}, indent=2))
            return
        cfg = model.config
        fields = [
            ("id", model.id),
            ("name", model.name),
            ("family", model.family or "none (no installed family recognises it)"),
            ("source", model.source),
            ("path", model.path or "-"),
            ("params", f"{model.params:,} ({_billions(model.params)}B)" if model.params
             else "unknown until counted (autotune estimate counts it)"),
            ("model_type", cfg.get("model_type")),
            ("layers", cfg.get("num_hidden_layers", "-")),
            ("hidden", cfg.get("hidden_size", "-")),
            ("vocab", cfg.get("vocab_size", "-")),
        ]
        width = max(len(k) for k, _ in fields)
        for key, value in fields:
            click.echo(f"{key.ljust(width)}  {value}")
        return

    profiles = sorted(model_profiles(pm).values(), key=lambda p: (p.family, p.params, p.id))
    if as_json:
        click.echo(json.dumps({"schema": SCHEMA, "models": [p.to_dict() for p in profiles]},
                              indent=2))
        return
    click.echo(_table(profiles))
    hidden = hidden_profiles(pm)
    if hidden:
        click.echo(f"note: {len(hidden)} profile(s) hidden, their model family is not installed: "
                   f"{', '.join(sorted(hidden))}", err=True)
