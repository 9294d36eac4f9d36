"""autotune.catalog.datasets: every source and row format, normalised per stage, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.catalog.datasets import FORMATS, describe_format, load_rows
from autotune.plugin.manager import get_plugin_manager
from autotune.plugin.registry import stages
from autotune.util.errors import AutotuneError

DATASETS = Path(__file__).resolve().parents[2] / "profiles" / "datasets"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return path


def error(path, stage, *, limit=None) -> str:
    with pytest.raises(AutotuneError) as info:
        load_rows(path, stage, limit=limit)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert Path(path).name in message, message
    return message


# --- the public surface ------------------------------------------------------------------------

def test_stage_schemas_are_one_line_each():
    schemas = {s.name: s.schema for s in stages(get_plugin_manager(False)).values() if s.schema}
    assert set(schemas) == {"pt", "sft", "dpo"}
    for text in schemas.values():
        assert text and "\n" not in text


def test_import_stays_light():
    code = ("import sys, autotune.catalog.datasets; heavy = {'torch', 'transformers', 'datasets', 'pyarrow'}"
            " & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_stage_and_bad_limit(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    with pytest.raises(AutotuneError, match="stage 'ppo' reads no dataset"):
        load_rows(path, "ppo")
    with pytest.raises(AutotuneError, match="no stage 'kto'"):
        load_rows(path, "kto")
    for limit in (0, -1, 1.5):
        with pytest.raises(AutotuneError, match="limit"):
            load_rows(path, "pt", limit=limit)


# --- sft ---------------------------------------------------------------------------------------

def test_alpaca_sft(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Summarise", "input": "A long text", "output": "Short"},
        {"instruction": "Say hi", "input": "", "output": "Hi", "system": "Be kind"},
        {"instruction": "And now?", "output": "Later", "history": [["q1", "a1"], ["q2", "a2"]]},
    ])
    rows = load_rows(path, "sft")
    assert rows == [
        {"prompt": [user("Summarise\n\nA long text")], "completion": [assistant("Short")]},
        {"prompt": [system("Be kind"), user("Say hi")], "completion": [assistant("Hi")]},
        {"prompt": [user("q1"), assistant("a1"), user("q2"), assistant("a2"), user("And now?")],
         "completion": [assistant("Later")]},
    ]
    assert describe_format(path, "sft") == "alpaca"


def test_messages_sft_last_assistant_is_the_completion(tmp_path):
    turns = [system("S"), user("u1"), assistant("a1"), user("u2"), assistant("a2")]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
    assert load_rows(path, "sft") == [{"prompt": turns[:-1], "completion": [assistant("a2")]}]
    assert describe_format(path, "sft") == "messages"


def test_sharegpt_sft_both_key_styles(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}], "system": "Top"},
    ])
    assert load_rows(path, "sft") == [
        {"prompt": [system("S"), user("hi")], "completion": [assistant("hello")]},
        {"prompt": [system("Top"), user("q")], "completion": [assistant("a")]},
    ]
    assert describe_format(path, "sft") == "sharegpt"


def test_prompt_completion_sft_strings_and_lists(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [system("S"), user("3+3?")], "completion": [assistant("6")]},
    ])
    assert load_rows(path, "sft") == [
        {"prompt": [user("2+2?")], "completion": [assistant("4")]},
        {"prompt": [system("S"), user("3+3?")], "completion": [assistant("6")]},
    ]
    assert describe_format(path, "sft") == "prompt-completion"


# --- dpo ---------------------------------------------------------------------------------------

def test_seed_004_dpo_layout(tmp_path):
    row = {"messages": [{"role": "user", "content": "How do I relax?"}],
           "chosen": {"role": "assistant", "content": "Try slow breathing."},
           "rejected": {"role": "assistant", "content": "Just relax."}}
    path = write_jsonl(tmp_path / "seed.jsonl", [row])
    assert load_rows(path, "dpo") == [{"prompt": [user("How do I relax?")],
                                       "chosen": [assistant("Try slow breathing.")],
                                       "rejected": [assistant("Just relax.")]}]
    assert describe_format(path, "dpo") == "seed-dpo"


def test_seed_dpo_answers_as_lists_or_strings(tmp_path):
    path = write_jsonl(tmp_path / "seed.jsonl", [
        {"messages": [system("S"), user("q")], "chosen": [assistant("good")], "rejected": "bad"},
    ])
    assert load_rows(path, "dpo") == [{"prompt": [system("S"), user("q")],
                                       "chosen": [assistant("good")],
                                       "rejected": [assistant("bad")]}]


def test_dpo_pairs_strings_and_lists(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [user("q2")], "chosen": [assistant("g2")], "rejected": [assistant("b2")]},
    ])
    assert load_rows(path, "dpo") == [
        {"prompt": [user("q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]},
        {"prompt": [user("q2")], "chosen": [assistant("g2")], "rejected": [assistant("b2")]},
    ]
    assert describe_format(path, "dpo") == "dpo-pairs"


def test_dpo_implicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]},
    ])
    assert load_rows(path, "dpo") == [{"prompt": [user("q")], "chosen": [assistant("good")],
                                       "rejected": [assistant("bad")]}]
    assert describe_format(path, "dpo") == "dpo-implicit"


def test_alpaca_and_sharegpt_dpo(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Fix", "input": "teh", "chosen": "the", "rejected": "teh"},
    ])
    assert load_rows(alpaca, "dpo") == [{"prompt": [user("Fix\n\nteh")],
                                         "chosen": [assistant("the")],
                                         "rejected": [assistant("teh")]}]
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}],
         "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
    ])
    assert load_rows(sharegpt, "dpo") == [{"prompt": [user("q")], "chosen": [assistant("good")],
                                           "rejected": [assistant("bad")]}]


# --- pt ----------------------------------------------------------------------------------------

def test_pt_text_and_content(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"content": "two"}])
    assert load_rows(path, "pt") == [{"text": "one"}, {"text": "two"}]
    assert describe_format(path, "pt") == "text"


def test_pt_joins_sft_rows(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "I", "input": "x", "output": "O"}])
    assert load_rows(alpaca, "pt") == [{"text": "I\n\nx\nO"}]
    messages = write_jsonl(tmp_path / "m.jsonl",
                           [{"messages": [system("S"), user("U"), assistant("A")]}])
    assert load_rows(messages, "pt") == [{"text": "S\nU\nA"}]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "P", "completion": "C"}])
    assert load_rows(pc, "pt") == [{"text": "P\nC"}]


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\nFirst para\nstill first\n\n   \nSecond\r\n\r\nThird\n", encoding="utf-8")
    assert load_rows(path, "pt") == [{"text": "First para\nstill first"}, {"text": "Second"},
                                     {"text": "Third"}]
    assert describe_format(path, "pt") == "text"
    assert "only the pt stage" in error(path, "sft")


# --- sources -----------------------------------------------------------------------------------

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
EXPECTED = [{"prompt": [user(f"q{i}")], "completion": [assistant(f"a{i}")]} for i in range(5)]


def test_json_array_and_wrapper(tmp_path):
    assert load_rows(write_json(tmp_path / "list.json", ROWS), "sft") == EXPECTED
    assert load_rows(write_json(tmp_path / "wrap.json", {"data": ROWS}), "sft") == EXPECTED
    assert load_rows(write_json(tmp_path / "meta.json", {"version": 2, "rows": ROWS}),
                     "sft") == EXPECTED
    single = write_json(tmp_path / "one.json", ROWS[0])
    assert load_rows(single, "sft") == EXPECTED[:1]
    lines = write_jsonl(tmp_path / "lines.json", ROWS)  # JSON Lines under a .json name
    assert load_rows(lines, "sft") == EXPECTED
    assert "several lists" in error(write_json(tmp_path / "two.json", {"a": [], "b": []}), "sft")
    assert "not number" in error(write_json(tmp_path / "num.json", 3), "sft")


def test_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('instruction,input,output\nq0,,a0\n"multi\nline",x,"a,1"\nq2,y,a2\n',
                    encoding="utf-8")
    assert load_rows(path, "sft") == [
        {"prompt": [user("q0")], "completion": [assistant("a0")]},
        {"prompt": [user("multi\nline\n\nx")], "completion": [assistant("a,1")]},
        {"prompt": [user("q2\n\ny")], "completion": [assistant("a2")]},
    ]
    messages = tmp_path / "m.csv"
    cell = json.dumps([user("u"), assistant("a")]).replace('"', '""')
    messages.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    assert load_rows(messages, "sft") == [{"prompt": [user("u")], "completion": [assistant("a")]}]


def test_csv_line_numbers_count_physical_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('instruction,output\n"two\nlines",a\n\nq,\n', encoding="utf-8")
    message = error(path, "sft")
    assert message.startswith(f"{path}:5: ") and "'output' is empty" in message
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,output\nq,a\nq,a,extra\n", encoding="utf-8")
    assert error(ragged, "sft").startswith(f"{ragged}:3: this row has 3 fields")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_rows(path, "sft") == EXPECTED
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:3] + [{"instruction": "q", "output": ""}]), bad)
    assert error(bad, "sft").startswith(f"{bad}: row 3: 'output' is empty")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert "cannot read parquet" in error(broken, "sft")


def test_parquet_messages_with_struct_union(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"messages": [user("u"), assistant("a")]},
            {"messages": [{"role": "user", "content": "u2", "name": "x"}, assistant("a2")]}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # missing struct fields come back as None
    assert load_rows(path, "sft") == [
        {"prompt": [user("u")], "completion": [assistant("a")]},
        {"prompt": [user("u2")], "completion": [assistant("a2")]},
    ]


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "ds"))
    assert load_rows(tmp_path / "ds", "sft") == EXPECTED
    dpo = datasets.Dataset.from_list([{"prompt": "q", "chosen": "g", "rejected": "b"}] * 3
                                     + [{"prompt": "q", "chosen": "g", "rejected": ""}])
    datasets.DatasetDict({"train": dpo, "test": dataset}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(tmp_path / "dd", "dpo", limit=3) == [
        {"prompt": [user("q")], "chosen": [assistant("g")], "rejected": [assistant("b")]}] * 3
    message = error(tmp_path / "dd", "dpo")
    assert "row 3" in message and "'rejected' is empty" in message
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "nosplit"))
    assert "without a 'train' split" in error(tmp_path / "nosplit", "sft")
    (tmp_path / "plain").mkdir()
    assert "save_to_disk" in error(tmp_path / "plain", "sft")


def test_limit_stops_early(tmp_path):
    rows = ROWS + [{"instruction": "bad"}]  # an error past the limit is never reached
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert load_rows(path, "sft", limit=2) == EXPECTED[:2]
    assert len(load_rows(path, "sft", limit=5)) == 5
    assert "missing 'output'" in error(path, "sft", limit=6)


def test_blank_lines_and_bom_in_jsonl(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n\n  \n"
                     + json.dumps(ROWS[1]).encode() + b"\r\n")
    assert load_rows(path, "sft") == EXPECTED[:2]


def test_huge_line_parses(tmp_path):
    big = "x" * 3_000_000
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": big}])
    assert load_rows(path, "pt") == [{"text": big}]
    csv_path = tmp_path / "big.csv"
    csv_path.write_text(f"text\n{big}\n", encoding="utf-8")
    assert load_rows(csv_path, "pt") == [{"text": big}]


# --- errors ------------------------------------------------------------------------------------

def test_missing_output_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:6] + [{"instruction": "q"}])
    assert error(path, "sft") == (f"{path}:6: missing 'output' (alpaca rows need instruction "
                                  "and output)")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c" "d": 1}\n', encoding="utf-8")
    assert error(path, "pt") == f"{path}:3: invalid JSON: Expecting ',' delimiter (column 14)"


def test_invalid_json_document_reports_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]\n', encoding="utf-8")
    assert error(path, "pt").startswith(f"{path}:3: invalid JSON: ")


def test_invalid_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    good = (json.dumps({"text": "ok"}) + "\n").encode()
    path.write_bytes(good + b'{"text": "bad \xff"}\n')
    assert error(path, "pt") == f"{path}:2: not valid UTF-8 at byte {len(good) + 14}"
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(b"text\nfine\nbad \xc3\n")
    assert error(csv_path, "pt") == f"{csv_path}:3: not valid UTF-8 at byte 14"


@pytest.mark.parametrize("name, content", [
    ("e.jsonl", ""), ("e2.jsonl", "\n\n  \n"), ("e.json", "[]"), ("e2.json", "  "),
    ("e.csv", "instruction,output\n"), ("e.txt", "\n \n"),
])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    stage = "pt" if name.endswith(".txt") else "sft"
    assert error(path, stage) == f"{path}: empty dataset (no rows)"


def test_messages_must_end_with_assistant(tmp_path):
    rows = [{"messages": [user("u"), assistant("a")]}] * 4 + [{"messages": [user("u")]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert error(path, "sft") == (f"{path}:5: 'messages' must end with an assistant turn "
                                  "(it ends with user)")
    sharegpt = write_jsonl(tmp_path / "s.jsonl",
                           [{"conversations": [{"from": "human", "value": "q"}]}])
    assert "'conversations' must end with an assistant turn" in error(sharegpt, "sft")


def test_content_must_be_a_string(tmp_path):
    parts = [{"type": "text", "text": "hi"}]
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [user("u"), assistant("a")]},
        {"messages": [{"role": "user", "content": parts}, assistant("a")]},
    ])
    message = error(path, "sft")
    assert message.startswith(f"{path}:2: ") and "content must be a string, not list" in message


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "", "output": "a"}, "'instruction' is empty"),
    ({"instruction": "  ", "output": "a"}, "'instruction' is empty"),
    ({"instruction": "q", "output": ""}, "'output' is empty"),
    ({"instruction": "q", "output": 5}, "'output' must be a string, not number"),
    ({"messages": [user(""), assistant("a")]}, "messages[0]: content is empty"),
    ({"messages": [user("u"), assistant("")]}, "messages[1]: content is empty"),
    ({"messages": [user("u"), {"role": "tool", "content": "x"}, assistant("a")]},
     "messages[1]: unknown role 'tool'"),
    ({"messages": [{"content": "u"}, assistant("a")]}, "messages[0]: missing 'role'"),
    ({"messages": [{"role": "user"}, assistant("a")]}, "messages[0]: missing 'content'"),
    ({"messages": "hello"}, "'messages' must be a list of messages, not string"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [assistant("a")]}, "'messages' has no user turn"),
    ({"messages": [user("u"), "x"]}, "messages[1] must be a message object, not string"),
    ({"conversations": [{"from": "robot", "value": "q"}]}, "unknown role 'robot'"),
    ({"prompt": "", "completion": "c"}, "'prompt' is empty"),
    ({"prompt": "p"}, "missing 'completion'"),
    ({"prompt": "p", "completion": [assistant("a"), assistant("b")]},
     "'completion' must be one assistant message, not 2 messages"),
    ({"prompt": "p", "completion": user("c")}, "'completion' must be an assistant message"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0] must be"),
    ({"text": "t"}, "only the pt stage"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference pairs for the dpo stage"),
    ({"instruction": "q", "chosen": "c", "rejected": "r"},
     ("missing 'output' (alpaca rows need instruction and output; chosen/rejected rows are "
      "for the dpo stage)")),
    ({"foo": 1, "bar": 2}, "unrecognised row (keys: 'foo', 'bar')"),
])
def test_sft_row_errors(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0]] * 2 + [row]) if "instruction" in row \
        else write_jsonl(tmp_path / "train.jsonl", [row])
    line = 3 if "instruction" in row else 1
    message = error(path, "sft")
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message, message


@pytest.mark.parametrize("row, expected", [
    ({"messages": [user("q")], "chosen": assistant("c")}, "missing 'rejected'"),
    ({"messages": [user("q")], "chosen": assistant("c"), "rejected": assistant("")},
     "rejected: content is empty"),
    ({"messages": [user("q")], "chosen": user("c"), "rejected": assistant("r")},
     "'chosen' must be an assistant message, not user"),
    ({"messages": [user("q"), assistant("c")], "chosen": "c", "rejected": "r"},
     "the turn before the answer must be a user turn, not assistant"),
    ({"prompt": "q", "chosen": "", "rejected": "r"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "r"}, "not number"),
    ({"chosen": "c", "rejected": "r"}, "missing 'prompt'"),
    ({"chosen": [user("q"), assistant("c")], "rejected": [user("other"), assistant("r")]},
     "must share every turn but their last"),
    ({"messages": [user("q"), assistant("a")]}, "messages rows have no chosen and rejected"),
    ({"instruction": "q", "output": "a"}, "missing 'chosen'"),
])
def test_dpo_row_errors(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    message = error(path, "dpo")
    assert message.startswith(f"{path}:1: "), message
    assert expected in message, message


def test_pt_row_errors(tmp_path):
    assert "'text' is empty" in error(write_jsonl(tmp_path / "a.jsonl", [{"text": ""}]), "pt")
    assert "'text' must be a string, not list" in error(
        write_jsonl(tmp_path / "b.jsonl", [{"text": ["a"]}]), "pt")
    dpo = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "r"}])
    assert "dpo stage" in error(dpo, "pt")


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    assert error(path, "pt") == f"{path}:2: a row must be an object, not list"
    items = write_json(tmp_path / "train.json", [{"text": "a"}, {"text": "b"}, "c"])
    assert error(items, "pt") == f"{items}: item 3: a row must be an object, not string"


def test_json_items_are_numbered_from_one(tmp_path):
    path = write_json(tmp_path / "train.json", {"data": ROWS[:6] + [{"instruction": "q"}]})
    assert error(path, "sft").startswith(f"{path}: item 6: missing 'output'")


def test_mixed_formats(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        ROWS[0], ROWS[1], {"messages": [user("u"), assistant("a")]},
    ])
    assert error(path, "sft") == (f"{path}:3: this row is messages but the first row (line 1) "
                                  "is alpaca; a file may not mix formats")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "r"},
                                                   {"chosen": "c", "rejected": "r"}])
    assert error(pairs, "dpo") == (f"{pairs}:2: missing 'prompt' (dpo rows need prompt, chosen "
                                   "and rejected)")
    items = write_json(tmp_path / "mixed.json", [{"text": "t"}, ROWS[0]])
    assert "item 2: this row is alpaca but the first row (item 1) is text" in error(items, "pt")


def test_unreadable_format_and_missing_path(tmp_path):
    xlsx = tmp_path / "sheet.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    assert error(xlsx, "sft").startswith(f"{xlsx}: cannot read .xlsx files")
    missing = tmp_path / "nowhere.jsonl"
    assert error(missing, "sft") == f"{missing}: no such file or directory"


def test_huge_bad_line_errors_in_one_short_line(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "' + "y" * 2_000_000 + '"\n', encoding="utf-8")
    message = error(path, "pt")
    assert message.startswith(f"{path}:1: invalid JSON: ") and len(message) < 300
    nested = tmp_path / "nested.jsonl"
    nested.write_text("[" * 200_000 + "]" * 200_000 + "\n", encoding="utf-8")
    message = error(nested, "pt")
    assert message.startswith(f"{nested}:1: ") and len(message) < 300
    digits = tmp_path / "digits.jsonl"
    digits.write_text('{"text": ' + "9" * 10_000 + "}\n", encoding="utf-8")
    assert error(digits, "pt").startswith(f"{digits}:1: invalid JSON")


def test_every_format_name_is_documented():
    from autotune.catalog import datasets as data

    for name in FORMATS:
        assert f"``{name}``" in data.__doc__


# --- the shipped example datasets --------------------------------------------------------------

SHIPPED = [("emotional_support_sft.jsonl", "sft"), ("emotional_support_dpo.jsonl", "dpo"),
           ("wellbeing_notes.txt", "pt")]


@pytest.mark.parametrize("name, stage", SHIPPED)
def test_shipped_datasets_load(name, stage):
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} is not there yet")
    rows = load_rows(path, stage)
    assert rows
    keys = {"pt": {"text"}, "sft": {"prompt", "completion"},
            "dpo": {"prompt", "chosen", "rejected"}}[stage]
    assert all(set(row) == keys for row in rows)
