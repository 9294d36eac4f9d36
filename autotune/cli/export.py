"""``autotune export``: a plan as the config file LLaMA-Factory, Axolotl, TRL, Accelerate or
DeepSpeed reads, to train it where those tools already run."""

from __future__ import annotations

import json

import click

from autotune.export.exports import TOOLS


@click.command("export")
@click.argument("plan_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--to", "tool", required=True, type=click.Choice(TOOLS),
              help="The tool whose config file to write.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write it (default: llamafactory_<stage>.yaml, axolotl.yaml, "
                   "trl_<stage>.yaml, accelerate_config.yaml or ds_config.json here).")
@click.option("--data", type=click.Path(), help="The training data the config names "
                                                "(default: a placeholder to edit).")
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
@click.option("--trust-remote-code", is_flag=True,
              help="Set trust_remote_code in the config (implied when the plan was made with it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema autotune.export/1).")
@click.pass_obj
def command(pm, plan_file, tool, output, data, force, trust_remote_code, as_json) -> None:
    """Write PLAN_FILE as another tool's config (and the DeepSpeed or Accelerate file it
    refers to for several GPUs)."""
    from autotune.export.exports import build, export_context, full_logits_caveat, write
    from autotune.plan.planfile import read_plan, remote_code

    plan = read_plan(plan_file)
    trust_remote_code = trust_remote_code or remote_code(plan)  # as the plan was made
    context = None
    if tool in ("llamafactory", "axolotl", "trl"):
        context = export_context(pm, plan, trust_remote_code, plan_file)
    export = build(tool, plan, context, data, output)
    caveat = full_logits_caveat(pm, plan, plan_file, tool)
    if caveat:  # shown, and written at the top of the config
        export.notes.append(caveat)
        export.caveats.append(caveat)
    written = write(export, force, (plan_file, data))
    result = {"schema": "autotune.export/1", "plan": plan_file, "to": tool, "path": export.path,
              "config": export.config,
              "companions": [{"path": p, "config": c} for p, c in export.companions],
              "files": written, "launch": export.launch, "notes": export.notes, **export.extra}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    lines = [f"wrote {', '.join(written)} ({tool})", f"launch: {export.launch}"]
    lines += [f"note: {note}" for note in export.notes]
    if "dataset_info" in export.extra:
        lines.append("dataset_info.json entry: " + json.dumps(export.extra["dataset_info"]))
    click.echo("\n".join(lines))
