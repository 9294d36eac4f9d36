"""The token lengths of a dataset as a stage trains on it, and what they cost a batch.

Each example is counted the way TRL tokenizes it, over the sequences its stage puts through
the model (``Stage.sequences``): a conversation is rendered with the chat template, a raw
text counts its tokens plus one EOS, and an example with several sequences (a DPO pair)
counts the longest (the trainer pads the pair to it). With the model's tokenizer the counts
are exact. Without one they are approximated from characters per token by script, priors for
large-vocabulary byte-level BPE tokenizers (Llama 3, Qwen, DeepSeek class), spaces folded
into their neighbours and template markers such as ``<|im_start|>`` one token each:

========== ============== =================================================================
class      chars / token  characters
========== ============== =================================================================
latin      4.0            Latin letters (OpenAI's ~4 characters per token of English)
digit      1.5            0-9 (Llama 3 groups up to 3 digits, Qwen splits every digit)
punct      1.0            ASCII punctuation and symbols, general and CJK punctuation
han        1.5            CJK ideographs (Llama 3 ~1.3, Qwen and DeepSeek ~1.8-2.0)
kana       1.5            Hiragana and Katakana
hangul     1.0            Hangul
brahmic    1.2            Indic, Thai, Lao, Myanmar and Khmer letters and their signs
emoji      0.4            emoji and pictographs (2 to 3 tokens each)
other      2.5            every other character: Cyrillic, Greek, Arabic, Hebrew...
========== ============== =================================================================

See docs/data.md for the sources, the batching modes and the worst-batch rule.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from autotune.catalog.datasets import describe_format, first_line, load_rows
from autotune.plugin.registry import Stage, stage_named
from autotune.util.errors import AutotuneError

BATCHINGS = ("padded", "packed", "wrapped")

CHARS_PER_TOKEN = {
    "latin": 4.0, "digit": 1.5, "punct": 1.0, "han": 1.5, "kana": 1.5, "hangul": 1.0,
    "brahmic": 1.2, "emoji": 0.4, "other": 2.5,
}
"""Characters per token by script: priors for large-vocabulary BPE tokenizers (docs/data.md)."""

APPROXIMATION = ("characters per token by script (docs/data.md); install the model's tokenizer "
                 "locally for exact counts")

_MARKERS = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>\s]{1,40}｜>|</?s>|\[/?INST\]"
                      r"|</?[a-z]+(?:_[a-z]+)+>")  # <|im_start|>, <start_of_turn>...
_SPACE = re.compile(r"[\s\ufe00-\ufe0f]+")
_CLASSES = {  # removed in this order; what is left is "other"
    "latin": r"A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "digit": r"0-9",
    "punct": r"!-/:-@\[-`{-~\u00a1-\u00bf\u00d7\u00f7\u2000-\u206f\u3000-\u303f\uff01-\uff65",
    "han": r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff",
    "kana": r"\u3040-\u30ff\u31f0-\u31ff",
    "hangul": r"\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "brahmic": r"\u0900-\u0dff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff",
    "emoji": r"\u2600-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff",
}
_PATTERNS = {name: re.compile(f"[{chars}]+") for name, chars in _CLASSES.items()}
_TEMPLATE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}  # markers: one token each
_BATCH = 512
_PROGRESS_ROWS = 20_000
_PROGRESS_SECONDS = 5.0
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class Lengths:
    """The tokens each example of a dataset puts in front of the model, sorted ascending."""

    path: str
    stage: str
    format: str
    rows: int
    tokens: tuple[int, ...]
    counted_by: str
    """``tokenizer`` or ``approximation``."""
    tokenizer: str | None
    sampled: bool
    """True when only the first ``limit`` rows were read."""

    def stats(self) -> dict:
        """min, median, p95, p99, max (nearest rank), mean and total tokens."""
        return dict(self._stats)

    @cached_property
    def _stats(self) -> dict:
        n = len(self.tokens)

        def rank(p: float) -> int:
            return self.tokens[max(math.ceil(p * n), 1) - 1]

        total = sum(self.tokens)
        return {"min": self.tokens[0], "median": rank(0.5), "p95": rank(0.95),
                "p99": rank(0.99), "max": self.tokens[-1], "mean": round(total / n, 1),
                "total": total}

    def truncated(self, seq_len: int) -> int:
        """How many examples are longer than ``seq_len``."""
        return len(self.tokens) - bisect_right(self.tokens, seq_len)

    def digest(self) -> str:
        """A short stable hash of the stage, the counting and the lengths (for cache keys)."""
        text = json.dumps([self.stage, self.counted_by, self.tokens])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self, seq_len: int | None = None) -> dict:
        out = {"path": self.path, "stage": self.stage, "format": self.format, "rows": self.rows,
               "sampled": self.sampled, "counted_by": self.counted_by,
               "tokenizer": self.tokenizer,
               "approximation": APPROXIMATION if self.counted_by == "approximation" else None,
               "tokens": self.stats()}
        if seq_len is not None:
            count = self.truncated(seq_len)
            out["truncated"] = {"seq_len": seq_len, "count": count,
                                "share": round(count / self.rows, 4)}
        return out


def measure_lengths(path: str | os.PathLike, stage: str | Stage, *, tokenizer=None,
                    chat_template: str | None = None, limit: int = 50_000,
                    quiet: bool = False) -> Lengths:
    """Count the tokens of each example of ``path`` (its first ``limit`` rows) for ``stage``.

    ``tokenizer``: a transformers tokenizer for exact counts, else the approximation.
    ``chat_template``: the model family's template, for tokenizers that have none (and for
    the approximation).
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise AutotuneError(f"limit must be a positive whole number, not {limit!r}")
    stage = stage_named(None, stage)
    rows = load_rows(path, stage, limit + 1)
    sampled = len(rows) > limit
    rows = rows[:limit]
    shown = os.fspath(path)
    owners, items = [], []
    for index, row in enumerate(rows):
        for sequence in stage.sequences(row):
            owners.append(index)
            items.append(sequence)
    if tokenizer is None:
        count = _approximate_counter(chat_template, shown)
    else:
        count = _tokenizer_counter(tokenizer, chat_template, shown)
    counts = [0] * len(rows)
    step = _BATCH * max(1, round(len(items) / max(len(rows), 1)))
    shown_at = time.monotonic()
    for start in range(0, len(items), step):
        batch = items[start:start + step]
        for owner, tokens in zip(owners[start:start + step], _counted(count, batch),
                                 strict=True):
            counts[owner] = max(counts[owner], tokens)
        if (not quiet and len(rows) > _PROGRESS_ROWS
                and time.monotonic() - shown_at > _PROGRESS_SECONDS):
            print(f"autotune: counting tokens: {owners[start + len(batch) - 1] + 1:,} / "
                  f"{len(rows):,} rows", file=sys.stderr, flush=True)
            shown_at = time.monotonic()
    name = None if tokenizer is None else (getattr(tokenizer, "name_or_path", "")
                                           or type(tokenizer).__name__)
    return Lengths(path=shown, stage=stage.name, format=describe_format(path, stage),
                   rows=len(rows), tokens=tuple(sorted(counts)),
                   counted_by="approximation" if tokenizer is None else "tokenizer",
                   tokenizer=name, sampled=sampled)


def _counted(count, batch: list) -> list[int]:
    """Token counts of a batch of texts and conversations, each kind counted together."""
    out = [0] * len(batch)
    for is_text in (True, False):
        at = [i for i, item in enumerate(batch) if isinstance(item, str) == is_text]
        if at:
            for i, tokens in zip(at, count([batch[i] for i in at], is_text), strict=True):
                out[i] = tokens
    return out


def _tokenizer_counter(tokenizer, chat_template: str | None, shown: str):
    """A function from a batch of texts or of conversations to their token counts."""
    own = getattr(tokenizer, "chat_template", None)
    eos = getattr(tokenizer, "eos_token_id", None)

    def count(items: list, texts: bool) -> list[int]:
        if not texts and not own and chat_template is None:
            raise AutotuneError(f"{shown}: the tokenizer has no chat template and none was "
                                "given")
        try:
            if texts:  # TRL appends EOS unless the tokenizer already does
                ids = tokenizer(items)["input_ids"]
                return [len(i) + (0 if i and i[-1] == eos else 1) for i in ids]
            ids = tokenizer.apply_chat_template(
                items, tokenize=True, return_dict=True,
                chat_template=None if own else chat_template)["input_ids"]
            return [len(i) for i in ids]
        except Exception as exc:  # noqa: BLE001 - the template or tokenizer failed on the data
            raise AutotuneError(f"{shown}: cannot tokenize: {first_line(exc)}") from None

    return count


def _approximate_counter(chat_template: str | None, shown: str):
    """Like :func:`_tokenizer_counter`, by :func:`approximate_tokens`."""
    def count(items: list, texts: bool) -> list[int]:
        if texts:
            return [approximate_tokens(item) + 1 for item in items]  # + EOS
        if chat_template is None:
            return [approximate_tokens("\n".join(t["content"] for t in turns)) for turns in items]
        try:
            template = _chat_template(chat_template)
            rendered = [template.render(messages=turns, add_generation_prompt=False,
                                        **_TEMPLATE_TOKENS) for turns in items]
        except Exception as exc:  # noqa: BLE001 - the template failed on the data
            raise AutotuneError(f"{shown}: cannot render the chat template: "
                                f"{first_line(exc)}") from None
        return [approximate_tokens(item) for item in rendered]

    return count


@lru_cache(maxsize=8)
def _chat_template(source: str):
    """``source`` compiled as transformers compiles chat templates (a sandboxed Jinja
    environment with its globals and ``tojson``), without importing transformers."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def approximate_tokens(text: str) -> int:
    """Tokens in ``text`` by :data:`CHARS_PER_TOKEN` (template markers count one each)."""
    text, markers = _MARKERS.subn("", text)
    text = _SPACE.sub("", text)
    tokens = float(markers)
    for name, pattern in _PATTERNS.items():
        rest = pattern.sub("", text)
        tokens += (len(text) - len(rest)) / CHARS_PER_TOKEN[name]
        text = rest
    return math.ceil(tokens + len(text) / CHARS_PER_TOKEN["other"])


def local_tokenizer(model_spec):
    """The model's tokenizer from its local folder (``model_spec.path``), else None.

    Never downloads; a folder without tokenizer files, or one that fails to load, gives None.
    """
    path = getattr(model_spec, "path", None)
    if not path or not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to the approximation
        return None


def batching_for(stage: str | Stage, attn: str) -> str:
    """How TRL batches ``stage`` under attention kernel ``attn`` (docs/data.md): the
    stage's own :meth:`~autotune.plugin.registry.Stage.batching`."""
    stage = stage_named(None, stage)
    batching = stage.batching(attn)
    if batching not in BATCHINGS:
        raise AutotuneError(f"plugin {stage.plugin!r}: stage {stage.name!r} batches "
                            f"{batching!r}, not one of {', '.join(BATCHINGS)}")
    return batching


def choose_seq_len(lengths: Lengths, cap: int, multiple: int = 64) -> int:
    """The longest example rounded up to ``multiple``, at most ``cap`` (never truncates
    silently: report ``lengths.truncated`` of the answer)."""
    if cap < 1 or multiple < 1:
        raise AutotuneError(f"sequence length cap and multiple must be positive, not {cap} and "
                            f"{multiple}")
    rounded = max(math.ceil(lengths.tokens[-1] / multiple), 1) * multiple
    return min(rounded, cap)


@dataclass(frozen=True)
class Workload:
    """A dataset as a plan trains on it: its lengths, the sequence length and the batching."""

    lengths: Lengths
    seq_len: int
    batching: str

    def __post_init__(self):
        if self.batching not in BATCHINGS:
            raise AutotuneError(f"unknown batching {self.batching!r} (choose from "
                                f"{', '.join(BATCHINGS)})")
        if self.seq_len < 1:
            raise AutotuneError(f"seq_len must be positive, not {self.seq_len}")

    def worst_seq_len(self) -> int:
        """The per-sequence length of the worst micro batch."""
        if self.batching == "padded":
            return min(self.lengths.tokens[-1], self.seq_len)
        return self.seq_len

    def worst_tokens(self, batch: int) -> int:
        """Tokens in the worst micro batch the sampler can form (any examples can meet)."""
        return batch * self.worst_seq_len()

    def row_len(self, batch: int) -> float:
        """Tokens a row of a micro batch holds on average, padding included: the expected
        longest of ``batch`` examples when padded, the sequence length otherwise."""
        if self.batching != "padded":
            return float(self.seq_len)
        if batch not in self._longest:
            self._longest[batch] = _expected_max(self._clipped, batch)
        return self._longest[batch]

    def efficiency(self, batch: int) -> float:
        """Useful (non-pad) tokens / tokens processed, expected over random micro batches."""
        if self.batching == "wrapped":
            return 1.0
        if self.batching == "packed":
            return sum(self._clipped) / (self._bins * self.seq_len)
        return min(1.0, (sum(self._clipped) / len(self._clipped)) / self.row_len(batch))

    def examples_per_row(self) -> float:
        """Examples per trained row: 1 padded, the mean per bin packed, seq_len / mean wrapped."""
        tokens = self.lengths.tokens
        if self.batching == "padded":
            return 1.0
        if self.batching == "packed":
            return len(tokens) / self._bins
        return self.seq_len / (sum(tokens) / len(tokens))

    @cached_property
    def _clipped(self) -> list[int]:
        """Every example's length, cut at the sequence length (sorted ascending)."""
        return [min(n, self.seq_len) for n in self.lengths.tokens]

    @cached_property
    def _longest(self) -> dict[int, float]:
        """Expected longest example of a padded micro batch, by batch (filled on demand)."""
        return {}

    @cached_property
    def _bins(self) -> int:
        """Rows best-fit-decreasing packing makes of the (truncated) examples."""
        return _bfd_bins(self._clipped, self.seq_len)

    def to_dict(self, batch: int) -> dict:
        return {"seq_len": self.seq_len, "batching": self.batching,
                "worst_batch_tokens": self.worst_tokens(batch),
                "efficiency": round(self.efficiency(batch), 4),
                "examples_per_row": round(self.examples_per_row(), 2),
                "row_tokens": round(self.row_len(batch), 1)}


def _expected_max(values: list[int], draws: int) -> float:
    """E[max] of ``draws`` values drawn with replacement from ``values`` (sorted ascending):
    P(max <= v_k) = (k/n)^draws."""
    n = len(values)
    return sum(v * ((k / n) ** draws - ((k - 1) / n) ** draws)
               for k, v in enumerate(values, 1))


def _bfd_bins(sizes: list[int], capacity: int) -> int:
    """Bins best-fit-decreasing packing needs for ``sizes`` (each <= capacity), as TRL packs."""
    free: list[int] = []  # distinct spare capacities of open bins, ascending
    holding: dict[int, int] = {}  # spare capacity -> how many bins have it
    bins = 0
    for size in sorted(sizes, reverse=True):
        at = bisect_left(free, size)
        if at == len(free):
            bins += 1
            spare = capacity - size
        else:
            best = free[at]
            holding[best] -= 1
            if not holding[best]:
                del holding[best]
                free.pop(at)
            spare = best - size
        if spare:
            if spare not in holding:
                insort(free, spare)
                holding[spare] = 0
            holding[spare] += 1
    return bins

