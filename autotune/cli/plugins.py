"""``autotune plugins``: the loaded plugins, what each registers, and the hooks it implements."""

from __future__ import annotations

import json

import click


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.plugins/1).")
@click.pass_obj
def command(pm, as_json) -> None:
    """List loaded plugins (built-in and installed) and the hooks each implements."""
    from autotune.plugin.registry import model_families, stages

    families, found_stages = model_families(pm), stages(pm)
    distributions = {pm.get_name(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist = distributions.get(name)
        rows.append({
            "name": name,
            "builtin": name.startswith("autotune_plugins."),
            "distribution": f"{dist.metadata['Name']} {dist.version}" if dist else None,
            "hooks": sorted(impl.name for impl in pm.get_hookcallers(plugin) or []),
            "families": sorted(f.name for f in families.values() if f.plugin == name),
            "stages": sorted(s.name for s in found_stages.values() if s.plugin == name),
        })
    rows.sort(key=lambda r: (not r["builtin"], r["name"]))
    if as_json:
        described = {name: {"plugin": s.plugin, "description": s.description,
                            "trains": s.trains, "schema": s.schema,
                            "methods": list(s.methods) if s.methods is not None else None,
                            "options": {o.name: o.default for o in s.options},
                            "exports": dict(s.exports)}
                     for name, s in sorted(found_stages.items())}
        click.echo(json.dumps({"schema": "autotune.plugins/1", "plugins": rows,
                               "stages": described}, indent=2))
        return
    for row in rows:
        registers = ", ".join([*(f"family {f}" for f in row["families"]),
                               *(f"stage {s}" for s in row["stages"])])
        origin = row["distribution"] or ("built-in" if row["builtin"] else "local")
        click.echo(f"{row['name']:<28} {origin:<16} hooks: {', '.join(row['hooks'])}"
                   + (f"  ({registers})" if registers else ""))
