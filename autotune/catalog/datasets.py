"""Read a local dataset and normalise its rows for a training stage.

Sources (by extension): ``.jsonl``/``.ndjson`` (one JSON object a line; blank lines are
skipped), ``.json`` (a list of objects, an object holding one list such as
``{"data": [...]}``, a single row object, or JSON Lines under a ``.json`` name), ``.csv``
(header on line 1; ``messages``/``conversations``/``history`` cells hold JSON), ``.parquet``,
``.txt`` (pt only: paragraphs separated by blank lines, each one text) and a folder written by
``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (its ``train`` split).

Row formats, detected per row from its keys (a file may not mix them):

* ``alpaca``: ``instruction``, optional ``input``, ``output``, optional ``system`` and
  ``history`` (``[[user, assistant], ...]``); the user turn is instruction + "\\n\\n" + input.
  For dpo, ``chosen`` and ``rejected`` replace ``output``.
* ``messages``: ``{"messages": [{"role", "content"}, ...]}``, ending with an assistant turn.
* ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}`` (``human``/``gpt``;
  ``role``/``content`` keys work too), optional top-level ``system``; for dpo, add ``chosen``
  and ``rejected``.
* ``prompt-completion``: ``prompt`` and ``completion``, strings or message lists.
* ``dpo-pairs``: ``prompt``, ``chosen`` and ``rejected``, strings or message lists.
* ``dpo-implicit``: ``chosen`` and ``rejected`` as whole conversations sharing every turn but
  the last (TRL's implicit-prompt layout); the shared turns are the prompt.
* ``seed-dpo``: ``{"messages": [prompt turns], "chosen": {...}, "rejected": {...}}``, where
  chosen and rejected are an assistant message, a list of one, or a string.
* ``text``: ``text`` (or ``content``), for pt. pt also takes every conversational sft format
  above, joining all the turns' contents with newlines.

What a row becomes is its stage's (``Stage.normalise``), from the readings :class:`Row`
offers: ``text()`` (a text row, or a conversation's turns joined), ``conversation()`` (every
turn, an assistant answer last) and ``preference()`` (prompt, chosen and rejected). The
built-in stages make sft ``{"prompt": [turns], "completion": [assistant turn]}``, dpo
``{"prompt": [turns], "chosen": [assistant turn], "rejected": [assistant turn]}`` and pt
``{"text": str}``. Turns are ``{"role": "system"|"user"|"assistant", "content": str}``.

Every problem is an :class:`~autotune.util.errors.AutotuneError` of one line that names the file and
the place: ``train.jsonl:7`` (physical line, JSONL/CSV/txt), ``train.json: item 7`` (1-based
item of a JSON list), ``train.parquet: row 12`` (0-based row index, as ``dataset[12]``). No row
is dropped: a row that cannot be used is an error. The only content dropped is a system turn
with empty content (it says nothing); ``null`` or empty optional fields count as absent.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autotune.plugin.manager import current_manager
from autotune.plugin.registry import Stage, plugin_failed, stage_named, stages
from autotune.util.errors import AutotuneError, RowError
from autotune.util.files import regular_file

FORMATS = ("alpaca", "messages", "sharegpt", "prompt-completion", "dpo-pairs", "dpo-implicit",
           "seed-dpo", "text")

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".parquet": "parquet", ".txt": "txt"}

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant"}
_PAIRS_ONLY = ("dpo-pairs", "dpo-implicit", "seed-dpo")
_ROW_KEYS = {"messages", "conversations", "instruction", "output", "prompt", "completion",
             "chosen", "rejected", "text", "content"}
_CSV_JSON_COLUMNS = ("messages", "conversations", "history")
_BATCH = 1024
LINE_LIMIT = 256 * 2**20
"""The longest JSONL line (one row) autotune reads."""
WHOLE_FILE_LIMIT = 2**30
"""The largest .json, .csv or .txt file, which is read whole."""


def load_rows(path: str | os.PathLike, stage: str | Stage, limit: int | None = None
              ) -> list[dict]:
    """Read ``path`` and return its rows normalised for ``stage`` (at most ``limit`` of them)."""
    return _load(path, stage, limit)[0]


def describe_format(path: str | os.PathLike, stage: str | Stage) -> str:
    """The row format of ``path`` (one of :data:`FORMATS`), checked on its first row."""
    return _load(path, stage, 1)[1]


# --- reading ---------------------------------------------------------------------------------

def _load(path, stage: str | Stage, limit: int | None) -> tuple[list[dict], str]:
    stage = stage_named(None, stage)
    if not stage.schema:
        readers = sorted(s.name for s in stages_of(stage) if s.schema)
        raise AutotuneError(f"stage {stage.name!r} reads no dataset (the stages that do: "
                            f"{', '.join(readers)})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise AutotuneError(f"limit must be a positive whole number, not {limit!r}")
    shown = os.fspath(path)
    source = _source(Path(shown), shown, stage)
    rows: list[dict] = []
    first: tuple[str, str] | None = None
    try:
        for where, ref, row in source:
            if not isinstance(row, dict):
                _fail(where, f"a row must be an object, not {_kind(row)}")
            fmt = _detect(row)
            if fmt is None:
                keys = ", ".join(_short(k, 30) for k in list(row)[:8]) or "none"
                _fail(where, f"unrecognised row (keys: {keys}); {stage.name} takes "
                             f"{stage.schema}")
            if first is None:
                first = (fmt, ref)
            elif fmt == "dpo-implicit" and first[0] == "dpo-pairs":
                fmt = "dpo-pairs"  # a pair without its prompt: say 'missing prompt'
            elif fmt != first[0]:
                _fail(where, f"this row is {fmt} but the first row ({first[1]}) is {first[0]}; "
                             "a file may not mix formats")
            try:
                rows.append(_normalise(Row(row, fmt, stage), stage))
            except _WrongKind as exc:
                _fail(where, f"{exc}; {stage.name} takes {stage.schema}")
            except RowError as exc:
                _fail(where, str(exc))
            _check_encodable(rows[-1], where)
            if limit is not None and len(rows) >= limit:
                break
    finally:
        source.close()
    if not rows:
        _fail(shown, "empty dataset (no rows)")
    return rows, first[0]


def _source(path: Path, shown: str, stage: Stage) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(where, ref, row)``: the error prefix, a short place and the raw row."""
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except OSError as exc:
        _fail(shown, f"cannot read: {exc.strerror or exc}")
    if not exists:
        _fail(shown, "no such file or directory")
    if is_dir:
        return _folder_rows(path, shown)
    regular_file(shown, "data file")  # /dev/zero or a FIFO would never end
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        what = f"{path.suffix} files" if path.suffix else "files without an extension"
        _fail(shown, f"cannot read {what} (autotune reads .jsonl, .json, .csv, .parquet, .txt "
                     "and folders written by datasets' save_to_disk)")
    if kind == "txt" and "text" not in stage.row_kinds:
        _fail(shown, f"a .txt file is plain text, which only {_takers(stage, 'text')} takes "
                     f"({stage.name} takes {stage.schema})")
    return {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows,
            "parquet": _parquet_rows, "txt": _txt_rows}[kind](path, shown)


def _read_text(path: Path, shown: str) -> str:
    if os.path.getsize(path) > WHOLE_FILE_LIMIT:
        _fail(shown, f"more than {WHOLE_FILE_LIMIT // 2**30} GiB to read at once: write it as "
                     ".jsonl, which is read a line at a time")
    try:
        data = path.read_bytes()
    except OSError as exc:
        _fail(shown, f"cannot read: {exc.strerror or exc}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        _fail(f"{shown}:{line}", f"not valid UTF-8 at byte {exc.start}")
    return text.removeprefix("\ufeff")


def _jsonl_rows(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    try:
        with open(path, "rb") as handle:
            yield from _jsonl_lines(handle, shown)
    except OSError as exc:
        _fail(shown, f"cannot read: {exc.strerror or exc}")


def _jsonl_lines(handle, shown: str) -> Iterator[tuple[str, str, Any]]:
    offset = 0
    for lineno, raw in enumerate(iter(lambda: handle.readline(LINE_LIMIT + 1), b""), 1):
        start, offset = offset, offset + len(raw)
        where = f"{shown}:{lineno}"
        if len(raw) > LINE_LIMIT:
            _fail(where, f"a line of more than {LINE_LIMIT // 2**20} MiB")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(where, f"not valid UTF-8 at byte {start + exc.start}")
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(where, f"invalid JSON: {exc.msg} (column {exc.colno})")
        except (ValueError, RecursionError) as exc:
            _fail(where, f"invalid JSON: {_json_problem(exc)}")
        yield where, f"line {lineno}", value


def _json_rows(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    text = _read_text(path, shown)
    if not text.strip():
        _fail(shown, "empty dataset (no rows)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _jsonl_rows(path, shown)  # JSON Lines under a .json name
            return
        _fail(f"{shown}:{exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})")
    except (ValueError, RecursionError) as exc:
        _fail(shown, f"invalid JSON: {_json_problem(exc)}")
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if _ROW_KEYS & set(value):
            value = [value]
        elif len(lists) == 1:
            value = value[lists[0]]
        else:
            found = (f"several lists ({', '.join(_short(k, 30) for k in lists[:6])})" if lists
                     else "no list")
            _fail(shown, "expected a JSON list of rows or an object holding one list of rows "
                         f"(like {{\"data\": [...]}}), found an object with {found}")
    elif not isinstance(value, list):
        _fail(shown, f"expected a JSON list of rows, not {_kind(value)}")
    for index, item in enumerate(value, 1):
        yield f"{shown}: item {index}", f"item {index}", item


def _csv_rows(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    text = _read_text(path, shown)
    records: list[tuple[int, list[str]]] = []
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long cells are data, not errors
    reader = csv.reader(io.StringIO(text, newline=""))
    last = 0
    try:
        for record in reader:
            start, last = last + 1, reader.line_num
            if record:
                records.append((start, record))
    except csv.Error as exc:
        _fail(f"{shown}:{reader.line_num}", f"invalid CSV: {exc}")
    finally:
        csv.field_size_limit(old_limit)
    if not records:
        return
    header = records[0][1]
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            _fail(f"{shown}:1", f"column {_short(name, 30)} appears twice in the header")
        seen.add(name)
    for lineno, record in records[1:]:
        where = f"{shown}:{lineno}"
        if len(record) != len(header):
            _fail(where, f"this row has {len(record)} fields but the header has {len(header)}")
        row: dict[str, Any] = dict(zip(header, record, strict=True))
        for column in _CSV_JSON_COLUMNS:
            cell = row.get(column)
            if cell is None:
                continue
            if not cell.strip():
                row[column] = None
                continue
            try:
                row[column] = json.loads(cell)
            except (ValueError, RecursionError) as exc:
                _fail(where, f"the {column!r} cell must hold JSON: {_json_problem(exc)}")
        yield where, f"line {lineno}", row


def _txt_rows(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    text = _read_text(path, shown)
    paragraph: list[str] = []
    start = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if line.strip():
            if not paragraph:
                start = lineno
            paragraph.append(line)
        elif paragraph:
            yield f"{shown}:{start}", f"line {start}", {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield f"{shown}:{start}", f"line {start}", {"text": "\n".join(paragraph)}


def _parquet_rows(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    index = 0
    try:
        batches = pq.ParquetFile(str(path)).iter_batches(batch_size=_BATCH)
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{shown}: row {index}", f"row {index}", row
                index += 1
    except (pyarrow.ArrowException, OSError) as exc:
        _fail(shown if index == 0 else f"{shown}: row {index}",
              f"cannot read parquet: {first_line(exc)}")


def _folder_rows(path: Path, shown: str) -> Iterator[tuple[str, str, Any]]:
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        _fail(shown, "a folder, but not a dataset written by datasets' save_to_disk (no "
                     "state.json or dataset_dict.json); give a .jsonl, .json, .csv, .parquet "
                     "or .txt file instead")
    try:
        import datasets
    except ImportError:
        _fail(shown, "reading a saved dataset folder needs the datasets package "
                     "(pip install datasets)")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here is the folder's
        _fail(shown, f"cannot load the saved dataset: {first_line(exc)}")
    prefix = shown
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(_short(s, 30) for s in loaded) or "none"
            _fail(shown, f"a DatasetDict without a 'train' split (it has: {splits})")
        loaded = loaded["train"]
        prefix = f"{shown.rstrip('/')}/train"
    table = loaded.with_format("arrow")
    for start in range(0, len(loaded), _BATCH):
        for offset, row in enumerate(table[start:start + _BATCH].to_pylist()):
            index = start + offset
            yield f"{prefix}: row {index}", f"row {index}", row


# --- normalising ------------------------------------------------------------------------------

class _WrongKind(RowError):
    """A row of a kind the stage does not take; the reader adds what the stage takes."""


def stages_of(stage: Stage) -> list[Stage]:
    """The stages registered beside ``stage`` (by the process's plugin manager)."""
    return list(stages(current_manager()).values())


def _takers(stage: Stage, kind: str) -> str:
    """The stages that take rows read as ``kind``, in words (for error messages)."""
    names = sorted(s.name for s in stages_of(stage) if kind in s.row_kinds)
    if not names:
        return "no installed stage"
    return f"the {names[0]} stage" if len(names) == 1 else \
        f"the {', '.join(names[:-1])} and {names[-1]} stages"


class Row:
    """One raw dataset row and its detected format: what :meth:`Stage.normalise` reads.

    ``data`` is the row as read, ``format`` one of :data:`FORMATS`. The readings below
    raise :class:`~autotune.util.errors.RowError` (one line, without the place) for a row
    that cannot be read so.
    """

    def __init__(self, data: dict, fmt: str, stage: Stage):
        self.data, self.format, self._stage = data, fmt, stage

    def text(self) -> str:
        """The row as plain text: a text row's text, or a conversation's turns joined by
        newlines."""
        if self.format == "text":
            key = "text" if self.data.get("text") is not None else "content"
            return _required_text(self.data, key, "plain-text rows need text")
        return "\n".join(turn["content"] for turn in self._turns())

    def conversation(self) -> list[dict]:
        """Every turn (``{"role", "content"}``), the last an assistant turn: the answer."""
        turns = self._turns()
        field = {"messages": "messages", "sharegpt": "conversations"}.get(self.format)
        if field is not None:
            if turns[-1]["role"] != "assistant":
                raise RowError(f"{field!r} must end with an assistant turn (it ends with "
                               f"{turns[-1]['role']})")
            _check_prompt(turns[:-1], field)
        return turns

    def preference(self) -> dict:
        """The prompt turns and the chosen and rejected answers (one assistant turn each):
        ``{"prompt", "chosen", "rejected"}``."""
        return _pair(self.data, self.format)

    def _turns(self) -> list[dict]:
        fmt, row = self.format, self.data
        pairs = _takers(self._stage, "preference")
        if fmt == "text":
            raise _WrongKind("a text row is plain text, which only "
                             f"{_takers(self._stage, 'text')} takes")
        if fmt in _PAIRS_ONLY:
            raise _WrongKind(f"{fmt} rows (chosen/rejected) are preference pairs for {pairs}")
        if fmt == "sharegpt" and _has_pair(row):
            raise _WrongKind(f"this ShareGPT row has chosen/rejected, which is data for {pairs}")
        return _conversation(row, fmt, pairs)


def _detect(row: dict) -> str | None:
    keys = {key for key, value in row.items() if value is not None}
    if "messages" in keys:
        return "seed-dpo" if keys & {"chosen", "rejected"} else "messages"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if keys & {"chosen", "rejected"}:
        return "dpo-pairs" if "prompt" in keys else "dpo-implicit"
    if keys & {"prompt", "completion"}:
        return "prompt-completion"
    if keys & {"text", "content"}:
        return "text"
    return None


def _normalise(row: Row, stage: Stage) -> dict:
    try:
        return stage.normalise(row)
    except RowError:
        raise
    except Exception as exc:
        raise plugin_failed(stage, "normalise", exc) from exc


def _conversation(row: dict, fmt: str, pairs: str) -> list[dict]:
    """Every turn of an sft-style row, the answer last."""
    if fmt == "alpaca":
        hint = "alpaca rows need instruction and output"
        if row.get("output") is None and _has_pair(row):
            hint += f"; chosen/rejected rows are for {pairs}"
        prompt = _alpaca_prompt(row, hint)
        return prompt + [_turn("assistant", _required_text(row, "output", hint))]
    if fmt == "messages":
        return _messages(row["messages"], "messages")
    if fmt == "sharegpt":
        return _sharegpt(row)
    hint = "prompt-completion rows need prompt and completion"
    prompt = _prompt(_required(row, "prompt", hint), "prompt")
    return prompt + _answer(_required(row, "completion", hint), "completion")


def _pair(row: dict, fmt: str) -> dict:
    if fmt == "alpaca":
        hint = "alpaca rows for preference pairs need instruction, chosen and rejected"
        prompt = _alpaca_prompt(row, hint)
    elif fmt == "seed-dpo":
        hint = "preference rows need messages, chosen and rejected"
        prompt = _messages(row["messages"], "messages")
        _check_prompt(prompt, "messages")
    elif fmt == "sharegpt":
        hint = "ShareGPT rows for preference pairs need conversations, chosen and rejected"
        prompt = _sharegpt(row)
        _check_prompt(prompt, "conversations")
    elif fmt == "dpo-pairs":
        hint = "dpo rows need prompt, chosen and rejected"
        prompt = _prompt(_required(row, "prompt", hint), "prompt")
    elif fmt == "dpo-implicit":
        return _implicit_pair(row)
    else:
        raise _WrongKind(f"{fmt} rows have no chosen and rejected answers")
    chosen = _answer(_required(row, "chosen", hint), "chosen")
    rejected = _answer(_required(row, "rejected", hint), "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _implicit_pair(row: dict) -> dict:
    hint = "dpo rows need prompt, chosen and rejected"
    chosen = _required(row, "chosen", hint)
    rejected = _required(row, "rejected", hint)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise RowError(f"missing 'prompt' ({hint}; without a prompt, chosen and rejected must "
                        "be whole conversations)")
    chosen_turns = _messages(chosen, "chosen")
    rejected_turns = _messages(rejected, "rejected")
    shared = 0
    while (shared < min(len(chosen_turns), len(rejected_turns))
           and chosen_turns[shared] == rejected_turns[shared]):
        shared += 1
    if len(chosen_turns) != shared + 1 or len(rejected_turns) != shared + 1:
        raise RowError("chosen and rejected must share every turn but their last (the "
                        "answers), or give the prompt in 'prompt'")
    for field, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        if turns[-1]["role"] != "assistant":
            raise RowError(f"{field!r} must end with an assistant turn (it ends with "
                            f"{turns[-1]['role']})")
    prompt = chosen_turns[:shared]
    _check_prompt(prompt, "chosen")
    return {"prompt": prompt, "chosen": [chosen_turns[-1]], "rejected": [rejected_turns[-1]]}


def _alpaca_prompt(row: dict, hint: str) -> list[dict]:
    instruction = _required_text(row, "instruction", hint)
    extra = _optional_text(row, "input")
    system = _optional_text(row, "system")
    prompt = [_turn("system", system)] if system else []
    history = row.get("history")
    if history is not None:
        if not isinstance(history, (list, tuple)):
            raise RowError(f"'history' must be a list of [user, assistant] pairs, not "
                            f"{_kind(history)}")
        for index, pair in enumerate(history):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(text, str) and text.strip() for text in pair)):
                raise RowError(f"history[{index}] must be a [user, assistant] pair of "
                                "non-empty strings")
            prompt += [_turn("user", pair[0]), _turn("assistant", pair[1])]
    user = instruction + ("\n\n" + extra if extra else "")
    return prompt + [_turn("user", user)]


def _sharegpt(row: dict) -> list[dict]:
    turns = _messages(row["conversations"], "conversations")
    system = _optional_text(row, "system")
    if system and turns[0]["role"] != "system":
        turns.insert(0, _turn("system", system))
    return turns


def _has_pair(row: dict) -> bool:
    return row.get("chosen") is not None or row.get("rejected") is not None


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _message(value: Any, field: str) -> dict | None:
    """One message as ``{"role", "content"}``; None for a system turn with empty content."""
    if not isinstance(value, dict):
        raise RowError(f"{field} must be a message object, not {_kind(value)}")
    role = value.get("role") if value.get("role") is not None else value.get("from")
    if role is None:
        raise RowError(f"{field}: missing 'role'")
    if not isinstance(role, str) or role.strip().lower() not in _ROLES:
        raise RowError(f"{field}: unknown role {_short(role, 30)} (use system, user or "
                        "assistant; ShareGPT's human and gpt work too)")
    role = _ROLES[role.strip().lower()]
    content = value.get("content") if value.get("content") is not None else value.get("value")
    if content is None:
        raise RowError(f"{field}: missing 'content'")
    if not isinstance(content, str):
        raise RowError(f"{field}: content must be a string, not {_kind(content)}")
    if not content.strip():
        if role == "system":
            return None
        raise RowError(f"{field}: content is empty")
    return _turn(role, content)


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise RowError(f"{field!r} must be a list of messages, not {_kind(value)}")
    turns = [_message(item, f"{field}[{index}]") for index, item in enumerate(value)]
    turns = [turn for turn in turns if turn is not None]
    if not turns:
        raise RowError(f"{field!r} is empty")
    return turns


def _prompt(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"{field!r} is empty")
        return [_turn("user", value)]
    turns = [_message(value, field)] if isinstance(value, dict) else _messages(value, field)
    turns = [turn for turn in turns if turn is not None]
    if not turns:
        raise RowError(f"{field!r} is empty")
    _check_prompt(turns, field)
    return turns


def _check_prompt(turns: list[dict], field: str) -> None:
    if not any(turn["role"] == "user" for turn in turns):
        raise RowError(f"{field!r} has no user turn before the answer")
    if turns[-1]["role"] != "user":
        raise RowError(f"{field!r}: the turn before the answer must be a user turn, not "
                        f"{turns[-1]['role']}")


def _answer(value: Any, field: str) -> list[dict]:
    """An answer (completion, chosen, rejected) as a list of one assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"{field!r} is empty")
        return [_turn("assistant", value)]
    if isinstance(value, dict):
        message = _message(value, field)
    elif isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise RowError(f"{field!r} must be one assistant message, not {len(value)} "
                            "messages")
        message = _message(value[0], f"{field}[0]")
    else:
        raise RowError(f"{field!r} must be a string or an assistant message, not "
                        f"{_kind(value)}")
    if message is None or message["role"] != "assistant":
        role = "an empty system turn" if message is None else message["role"]
        raise RowError(f"{field!r} must be an assistant message, not {role}")
    return [message]


def _required(row: dict, key: str, hint: str) -> Any:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing {key!r} ({hint})")
    return value


def _required_text(row: dict, key: str, hint: str) -> str:
    value = _required(row, key, hint)
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, not {_kind(value)}")
    if not value.strip():
        raise RowError(f"{key!r} is empty ({hint})")
    return value


def _optional_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, not {_kind(value)}")
    return value if value.strip() else None


def _check_encodable(row: dict, where: str) -> None:
    """Text a tokenizer can encode: JSON's ``\\ud800`` escapes decode to lone surrogates."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        _fail(where, f"text holds a lone surrogate ({exc.object[exc.start]!a}), which is not "
                     "a character: fix the escape")


# --- messages ---------------------------------------------------------------------------------

def _fail(where: str, message: str):
    """Raise the one-line error ``where: message``."""
    raise AutotuneError(" ".join(f"{where}: {message}".split()))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _short(value: Any, width: int) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _json_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (line {exc.lineno}, column {exc.colno})"
    return first_line(exc)
