"""``autotune merge``: fold a run's adapter into its base model and save full weights."""

from __future__ import annotations

import json
import os

import click

from autotune.cli.estimate import trust_remote_code_option
from autotune.util.errors import AutotuneError


@click.command("merge")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--output", type=click.Path(file_okay=False), help="Where to write the merged "
                                                                 "model (default RUN_DIR/merged).")
@trust_remote_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def command(pm, run_dir, output, trust_remote_code, as_json) -> None:
    """Merge a run's LoRA/DoRA adapter into its base weights."""
    from autotune.run.finished import load_run, read_report

    if "adapter" not in read_report(run_dir)["saved"]:
        raise AutotuneError(f"{run_dir} holds full weights already: nothing to merge")
    output = os.path.abspath(output or os.path.join(run_dir, "merged"))
    if os.path.exists(output) and os.listdir(output):
        raise AutotuneError(f"{output} exists and is not empty: give another --output")
    model, tokenizer, _ = load_run(pm, run_dir, merge=True, remote_code=trust_remote_code)
    _save(model, tokenizer, output)
    result = {"schema": "autotune.merge/1", "run": run_dir, "merged": output,
              "params": sum(p.numel() for p in model.parameters())}
    click.echo(json.dumps(result, indent=2) if as_json else
               f"merged the adapter of {run_dir} into {output} ({result['params']:,} parameters)")


def _save(model, tokenizer, output: str) -> None:
    """Write the merged model into a folder beside ``output`` and rename it into place:
    a refused write (a full or read-only disk) is one error and leaves nothing behind."""
    import shutil

    from autotune.util.files import write_error

    parent = os.path.dirname(output)
    folder = os.path.join(parent, f".{os.path.basename(output)}.merging-{os.getpid()}")
    try:
        os.makedirs(folder)
    except OSError as exc:
        raise AutotuneError(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        os.replace(folder, output)  # over an empty folder too
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if (refused := write_error(exc)) is None:
            raise
        raise AutotuneError(f"cannot write {output}: {refused.strerror or refused}; nothing "
                            "was written") from None
