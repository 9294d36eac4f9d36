"""``autotune completion``: the shell completion script (bash, zsh or fish)."""

from __future__ import annotations

import click


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.option("--json", "as_json", is_flag=True, help="Print the script inside a JSON object.")
@click.pass_context
def command(ctx, shell, as_json) -> None:
    """Print the completion script: eval "$(autotune completion bash)" in ~/.bashrc."""
    import json

    from click.shell_completion import get_completion_class

    script = get_completion_class(shell)(ctx.find_root().command, {}, "autotune",
                                         "_AUTOTUNE_COMPLETE").source()
    click.echo(json.dumps({"schema": "autotune.completion/1", "shell": shell,
                           "script": script}) if as_json else script)
