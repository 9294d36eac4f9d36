"""What the demo and the tests train on: the shipped datasets and a tokenizer built from them.

Nothing is downloaded: the datasets were written for this project (``profiles/datasets``)
and the byte-level BPE tokenizer is trained on them in about a second.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import as_file, files

from autotune.plugin.registry import Stage, stage_named
from autotune.util.errors import AutotuneError

DATASETS = ("emotional_support_sft.jsonl", "emotional_support_dpo.jsonl", "wellbeing_notes.txt")
"""The shipped datasets (each stage names its own in ``Stage.demo``)."""
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
MIN_VOCAB = 300
"""The smallest vocabulary :func:`build_tokenizer` builds (256 bytes, the special tokens)."""


def dataset_path(stage: str | Stage) -> str:
    """The shipped dataset for ``stage`` (a real file path)."""
    stage = stage_named(None, stage)
    if not stage.demo:
        raise AutotuneError(f"stage {stage.name!r} has no example dataset: give --data")
    resource = files("autotune_profiles") / "datasets" / stage.demo
    with as_file(resource) as path:
        return str(path)


def _corpus():
    for name in DATASETS:
        text = (files("autotune_profiles") / "datasets" / name).read_text(encoding="utf-8")
        yield from text.splitlines()


@lru_cache(maxsize=4)
def _trained(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer.to_str()


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens, trained on the shipped data."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least {MIN_VOCAB}")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)), unk_token="<unk>",
        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
