"""``autotune generate``: answer a prompt with a run's model (base + adapter, seed 002)."""

from __future__ import annotations

import json

import click

from autotune.cli.estimate import trust_remote_code_option
from autotune.util.errors import AutotuneError

MAX_NEW_TOKENS = 1 << 20


@click.command("generate")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--prompt", required=True, help="The user's message.")
@click.option("--system", help="An optional system message.")
@click.option("--max-new-tokens", type=click.IntRange(1, MAX_NEW_TOKENS), default=128,
              show_default=True, help="At most this many tokens (and within the model's "
                                      "context).")
@trust_remote_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@click.pass_obj
def command(pm, run_dir, prompt, system, max_new_tokens, trust_remote_code, as_json) -> None:
    """Answer a prompt with a trained run or a model folder such as a merged run (greedy
    decoding, the model's chat template)."""
    import torch

    from autotune.run.finished import load_run

    model, tokenizer, _ = load_run(pm, run_dir, remote_code=trust_remote_code)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    context = getattr(model.config, "max_position_embeddings", None)
    length = ids["input_ids"].shape[1]
    if context and length + max_new_tokens > context:
        raise AutotuneError(f"--max-new-tokens {max_new_tokens}: the prompt ({length} tokens) "
                            f"and the answer must fit the model's context of {context} tokens "
                            f"(at most {max(context - length, 0)} new tokens)")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    click.echo(json.dumps({"schema": "autotune.generate/1", "prompt": prompt, "answer": answer},
                          ensure_ascii=False, indent=2) if as_json else answer)
