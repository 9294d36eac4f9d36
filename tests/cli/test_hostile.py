"""Hostile inputs: whatever a user types or hand-edits ends in an answer or one line, never a trace.

Property-based (hypothesis) over the arguments of ``estimate``, ``plan``, ``models``, ``gpus``
and ``explain``, the contents of a ``config.json``, hand-edited ``plan.yaml`` files, and a
few dataset files given to ``run``. Every case runs ``autotune.cli.main.main()`` in-process, so
the real error path (``AutotuneError`` -> exit 1, a bug -> exit 70) is what is tested, and
must end in one of:

* exit 0, for inputs a rule of this file calls valid (plans are asked only where the model
  fits: "no plan fits", exit 3, comes with a slow search of what would);
* exit 1 and exactly one line on stderr, ``autotune: error: ...``;
* exit 2 for click's usage errors, also one ``autotune: error: ...`` line.

Never a traceback, never ``internal error`` (exit 70: a bug), and nothing written when it
fails. Which inputs are valid is decided here, by rules written from the documented
contract (``LIMITS``), not by asking the code. The runs are derandomized: CI sees the same
examples every time.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from autotune import hookimpl
from autotune.cli.main import main
from autotune.plugin.manager import get_plugin_manager
from autotune.plugin.registry import ModelFamily, Stage
from autotune.util.units import parse_size

pytestmark = pytest.mark.slow  # trains, launches processes or fuzzes

# AUTOTUNE_HOSTILE_SEARCH=N looks N times harder, with fresh random examples each run.
SEARCH = int(os.environ.get("AUTOTUNE_HOSTILE_SEARCH", "0"))
FAST = settings(max_examples=120 * (SEARCH or 1), deadline=None, derandomize=not SEARCH,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FEW = settings(FAST, max_examples=25 * (SEARCH or 1))

# The documented limits (autotune.cost.recipe.LIMITS and the config checks of autotune.cost.assess),
# written out again: the test's own rule of what is valid.
RANK_MAX = BATCH_MAX = FREEZE_MAX = 2**16
SEQ_MAX = 2**24
SIZE_MAX = 2**31 - 1
LAYERS_MAX = 1024

# A model of every built-in analytic family, small enough to estimate in milliseconds.
MODELS = ["tiny", "TINY", "qwen2.5-0.5b", "deepseek-7b", "mistral-7b", "yuan2-2b",
          "deepseek-v2-lite"]
MOE_MODELS = ["deepseek-v2-lite"]
CARDS = ["t4", "rtx3090", "RTX 3090", "a100-80gb", "h100", "l4"]
TARGETS = ["all-linear", "qv", "attn", "mlp", "q_proj,v_proj", "q_proj+k_proj"]

PM = get_plugin_manager(load_entrypoints=False)


# -- running the CLI as the console script does ---------------------------------------------

@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout: {self.out[-2000:]}\nstderr: {self.err[-2000:]}"


def autotune(*args: str, pm=PM) -> Outcome:
    """``autotune ARGS`` through :func:`autotune.cli.main.main` (its error handling included),
    with ``pm`` as the plugin manager (built-ins only by default) and no GPU probed."""
    out, err = io.StringIO(), io.StringIO()
    probe = {"gpus": [], "nvidia": {"available": False}, "host": {}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sys, "argv", ["autotune", *args]))
        if pm is not None:
            stack.enter_context(mock.patch("autotune.plugin.manager.get_plugin_manager",
                                           return_value=pm))
        stack.enter_context(mock.patch("autotune.catalog.gpus.probe", return_value=probe))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return Outcome(code, out.getvalue(), err.getvalue())


OK, ERROR, EITHER = "ok", "error", "either"


def check(result: Outcome, expect: str = EITHER) -> None:
    """The outcome contract of this file (see the module docstring)."""
    with contextlib.suppress(Exception):  # outside a hypothesis test there is nothing to tell
        event(f"expected {expect}, exit {result.code}")
    both = result.out + result.err
    assert "Traceback" not in both, result
    assert "internal error" not in result.err and result.code != 70, result
    if result.code == 0:
        assert expect != ERROR, f"expected an error\n{result}"
        return
    assert expect != OK, f"expected success\n{result}"
    assert result.code in (1, 2), result  # 2: click's usage errors, in the same one line
    lines = result.err.splitlines()  # \r, \x85, \u2028... count as line breaks too
    assert len(lines) == 1 and lines[0].startswith("autotune: error: "), result
    assert result.err.endswith("\n"), result


def worst(*verdicts: str) -> str:
    """Combine the verdicts of independent inputs: any error wins, then any doubt."""
    return ERROR if ERROR in verdicts else EITHER if EITHER in verdicts else OK


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Studies and calibrations go to a private folder, never the user's."""
    with mock.patch.dict(os.environ, {"AUTOTUNE_CACHE_DIR": str(tmp_path_factory.mktemp("c"))}):
        yield


# -- strategies: values with their verdict ---------------------------------------------------

# What argv can hold: any text but NUL (a C string ends there).
ARG = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
NO_DIGITS = st.characters(blacklist_categories=("Nd", "Cs"), blacklist_characters="\x00")


def arg_text(max_size: int):
    return st.text(ARG, max_size=max_size)


def mostly(valid, other):
    """``valid`` four times in five: an error in one option hides what the others do."""
    return st.integers(0, 4).flatmap(lambda i: other if i == 0 else valid)


def whole(limit: int | None):
    """A CLI whole-number option: (text, verdict) with 1..limit valid (no limit: None)."""
    too_big = st.integers((limit or 0) + 1, 10**40).map(
        lambda n: (str(n), ERROR if limit else OK))
    return mostly(
        st.integers(1, limit or 10**40).map(lambda n: (str(n), OK))
        | st.integers(1, 64).map(lambda n: (str(n), OK)),
        st.one_of(
            st.integers(-(10**30), 0).map(lambda n: (str(n), ERROR)),
            too_big,
            st.just(("9" * 400, ERROR if limit else OK)),
            st.floats().map(lambda f: (repr(f), ERROR)),  # "1.5", "nan", "inf", "1e+300"
            st.text(NO_DIGITS, max_size=8).map(lambda t: (t, ERROR)),  # "", "x", "--help"
        ),
    )


UNITS = ["", "GiB", "GB", "MiB", "MB", "TiB", "TB", "gib", " GiB", "G"]


def size_text():
    """A --vram/--headroom size: (text, verdict)."""
    valid = st.tuples(st.integers(1, 4096), st.sampled_from(UNITS)).map(
        lambda p: (f"{p[0]}{p[1]}", OK))
    return mostly(
        valid,
        st.one_of(
            st.sampled_from(["abc", "-1GiB", "1e400GB", "0", "0GiB", "GiB", "", "nan", "inf",
                             "-0", "24 GiB GiB", "9" * 400 + "GB", "1" + "0" * 30 + "TiB",
                             "0.0000000001"]).map(lambda t: (t, ERROR)),
            arg_text(10).map(lambda t: (t, EITHER)),
        ),
    )


def choice(valid: list[str]):
    return mostly(st.sampled_from(valid).map(lambda v: (v, OK)),
                  arg_text(12).map(lambda t: (t, EITHER)))


def model_arg():
    return mostly(st.sampled_from(MODELS).map(lambda m: (m, OK)), st.one_of(
        arg_text(20).map(lambda t: ("no-such-model-" + t, ERROR)),
        st.sampled_from(["a" * 5000, "./" + "a/" * 3000, "~no-such-user-0", "~no-such-user-0/m",
                         "org/" + "n" * 300, ".", "..", "/", "-", "--", " "]).map(
            lambda t: (t, ERROR)),
        arg_text(20).map(lambda t: (t, EITHER)),
    ))


@st.composite
def estimate_args(draw):
    given: dict[str, tuple[str, str]] = {"--model": draw(model_arg())}
    for option, strategy in (("--rank", whole(RANK_MAX)), ("--batch", whole(BATCH_MAX)),
                             ("--seq-len", whole(SEQ_MAX)),
                             ("--freeze-layers", whole(FREEZE_MAX)), ("--alpha", whole(None)),
                             ("--targets", choice(TARGETS)),
                             ("--method", choice(["lora", "dora", "qlora", "full", "freeze"])),
                             ("--stage", choice(["pt", "sft", "dpo", "ppo", "inference"])),
                             ("--gpu", choice(CARDS)), ("--vram", size_text())):
        if draw(st.booleans()):
            given[option] = draw(strategy)
    verdicts = {option: verdict for option, (_, verdict) in given.items()}
    method = given.get("--method", ("lora",))[0]
    unread = ("--rank", "--alpha", "--targets") if method in ("full", "freeze") \
        else ("--freeze-layers",)
    for option in unread:  # an option the method does not read: refused
        if option in verdicts:
            verdicts[option] = ERROR
    if method == "freeze" and verdicts.get("--freeze-layers") == OK:
        verdicts["--freeze-layers"] = EITHER  # more layers than the model has: refused
    if method == "dora" and given["--model"][0] in MOE_MODELS:
        verdicts["dora"] = EITHER  # PEFT refuses DoRA on fused experts: it depends on targets
    if "--gpu" in given and "--vram" in given:
        verdicts["both"] = ERROR  # --gpu or --vram, not both
    args = ["estimate", *(item for option, (value, _) in given.items()
                          for item in (option, value))]
    if draw(st.booleans()):
        args.append("--json")
    return args, worst(*verdicts.values())


# -- (a) arguments ---------------------------------------------------------------------------

@FAST
@given(estimate_args())
def test_estimate_arguments(case):
    args, expect = case
    result = autotune(*args)
    check(result, expect)
    if result.code == 0 and "--json" in args:
        json.loads(result.out)


@pytest.mark.parametrize("option, value", [
    ("--rank", str(RANK_MAX)), ("--batch", str(BATCH_MAX)), ("--seq-len", str(SEQ_MAX)),
    ("--freeze-layers", str(FREEZE_MAX)), ("--alpha", "9" * 30),
])
@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo", "inference"])
def test_estimate_largest_values_are_answered(option, value, stage):
    for method in ("lora", "full", "freeze"):
        # --freeze-layers: more top layers than the model's 27 (freeze), or not read (the
        # others); --rank and --alpha are not read by full and freeze tuning: refused
        expect = ERROR if option == "--freeze-layers" or (
            option in ("--rank", "--alpha") and method != "lora") else OK
        for device in ("cuda", "cpu"):
            check(autotune("estimate", "--model", "deepseek-v2-lite", option, value, "--stage",
                           stage, "--method", method, "--device", device, "--attn", "eager",
                           "--gpu", "t4", "--json"), expect)


CAPPED = ["--rank", "--batch", "--seq-len", "--effective-batch", "--seed"]


@FAST
@given(option=st.sampled_from([*CAPPED, "--top", "--measure-steps", "--measure"]),
       value=st.one_of(st.integers(-(10**30), 0).map(str), st.just("9" * 400),
                       st.integers(2**32, 10**40).map(str), st.floats().map(repr),
                       st.text(NO_DIGITS, max_size=8)),
       headroom=st.none() | st.sampled_from(["5%", "-1%", "100%", "nan%", "%", "1e400%", "x"]))
def test_plan_rejects_bad_numbers(option, value, headroom, tmp_path_factory):
    """Out of range, not a number: a usage error before any search (or file) is made."""
    assume(not (option in ("--seed", "--measure") and value.lstrip("-") in ("0", "")))
    assume(option in CAPPED or not value.isdigit())  # --top 10**400 lists every plan
    out = tmp_path_factory.mktemp("plan") / "plan.yaml"
    args = ["plan", "--model", "tiny", "--vram", "2GiB", "--storage", "none", option, value,
            "-o", str(out)]
    if headroom is not None:
        args += ["--headroom", headroom]
    result = autotune(*args)
    check(result, ERROR)
    assert not out.exists()


HEADROOMS = [("5%", OK), ("0%", OK), (" 12.5% ", OK), ("100%", ERROR), ("-5%", ERROR),
             ("250%", ERROR), ("nan%", ERROR), ("1e400%", ERROR), ("%", ERROR), ("abc", ERROR),
             ("0", ERROR), ("1PB", ERROR), ("99.99999999999999%", ERROR)]


@FEW
@given(vram=size_text(), headroom=st.sampled_from(HEADROOMS))
def test_plan_budgets(vram, headroom, tmp_path_factory):
    (text, verdict), (room, room_verdict) = vram, headroom
    # valid budgets from 2 GiB up only: the tiny model fits at the upper bound of its peak
    # (the CUDA context alone may take 1 GiB), and no slow "what would fit" search
    assume(verdict == ERROR or (verdict == OK and parse_size(text) >= 2 * 2**30))
    out = tmp_path_factory.mktemp("plan") / "plan.yaml"
    result = autotune("plan", "--model", "tiny", "--seq-len", "64", "--vram", text,
                      "--headroom", room, "--storage", "none", "-o", str(out))
    check(result, worst(verdict, room_verdict))
    assert out.exists() == (result.code == 0)


@FEW
@given(targets=choice([*TARGETS, "mlp,qv"]), method=st.sampled_from(["lora", "dora", "qlora"]))
def test_plan_pinned_targets(targets, method):
    """A pinned target list that names no layer is an error, not a silent full fine-tune."""
    text, expect = targets
    result = autotune("plan", "--model", "tiny", "--vram", "24GiB", "--seq-len", "64",
                      "--storage", "none", "--top", "1", "--method", method, "--targets", text,
                      "--json")
    check(result, expect)
    if result.code == 0:
        assert json.loads(result.out)["plans"][0]["method"] == method


@pytest.mark.parametrize("args", [  # budgets where they fit: "what would fit" takes long
    ["--seq-len", str(SEQ_MAX), "--batch", "1", "--vram", "4096TiB"],
    ["--rank", str(RANK_MAX), "--batch", str(BATCH_MAX), "--seq-len", "1", "--vram", "24GiB"],
    ["--effective-batch", str(BATCH_MAX), "--gpu", "h100", "--seq-len", "64"],
    ["--seed", str(2**32 - 1), "--gpu", "t4", "--seq-len", "64"],
])
def test_plan_largest_values_are_answered(args):
    check(autotune("plan", "--model", "tiny", "--storage", "none", "--top", "1", *args), OK)


@FAST
@given(spec=st.one_of(st.sampled_from(MODELS).map(lambda m: (m, OK)),
                      arg_text(30).map(lambda t: (t, EITHER)),
                      arg_text(10).map(lambda t: ("./no/such/" + t, ERROR))),
       as_json=st.booleans())
def test_models_spec(spec, as_json):
    text, expect = spec
    result = autotune("models", *([text] if text else []), *(["--json"] if as_json else []))
    check(result, expect)


@FAST
@given(spec=choice(CARDS), as_json=st.booleans())
def test_gpus_spec(spec, as_json):
    text, expect = spec
    check(autotune("gpus", *([text] if text else []), *(["--json"] if as_json else [])), expect)


def test_explain_missing_or_odd_paths(tmp_path):
    for path in (tmp_path / "nope.yaml", tmp_path, "-"):
        check(autotune("explain", str(path)), ERROR)


# -- (b) config.json -----------------------------------------------------------------------

BASE_CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size")
OPTIONAL = ("num_key_value_heads", "head_dim")
FAMILIES = ["llama", "qwen2", "mistral", "yuan", "deepseek"]

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(10**40), 10**40)
                | st.floats(allow_nan=True) | st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


def size_value(key: str):
    """A config.json value for ``key`` with the test's verdict."""
    limit = LAYERS_MAX if key == "num_hidden_layers" else SIZE_MAX
    sane = st.integers(1, 4) if key == "num_hidden_layers" else st.integers(1, 96)
    return st.one_of(
        sane.map(lambda n: (n, EITHER)),  # valid types; shapes may disagree (see below)
        st.integers(-(10**30), 0).map(lambda n: (n, ERROR)),
        st.integers(limit + 1, 10**400).map(lambda n: (n, ERROR)),
        st.sampled_from([True, False, 2.0, 1.5, math.inf, -math.inf, math.nan, "64", "x", [],
                         [64], {}, {"a": 1}]).map(lambda v: (v, ERROR)),
        st.just((None, ERROR if key in REQUIRED else OK)),
        st.just(("<missing>", ERROR if key in REQUIRED else OK)),
    )


def consistent(config: dict) -> bool:
    """Sane shapes are valid: every size a small positive int, the heads dividing the width
    into an even head size, the kv-heads dividing the heads."""
    sizes = [config.get(k) for k in REQUIRED]
    if not all(type(v) is int and 1 <= v <= 4096 for v in sizes):
        return False
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return (type(kv) is int and 1 <= kv and h % heads == 0 and heads % kv == 0
            and (h // heads) % 2 == 0 and config.get("head_dim") in (None, h // heads))


@st.composite
def configs(draw):
    config = {"model_type": draw(st.sampled_from(FAMILIES)), **BASE_CONFIG}
    verdicts = []
    for key in draw(st.lists(st.sampled_from(REQUIRED + OPTIONAL), unique=True, max_size=3)):
        value, verdict = draw(size_value(key))
        if value == "<missing>":
            config.pop(key, None)
        else:
            config[key] = value
        verdicts.append(verdict)
    if consistent(config):
        verdicts = [OK if v == EITHER else v for v in verdicts]
    if draw(st.booleans()):  # junk in keys no family reads is ignored
        config[draw(st.text(min_size=1, max_size=8).filter(
            lambda k: k not in config and k not in REQUIRED + OPTIONAL and k != "model_type"
            and not k.startswith(("n_", "num_", "moe_", "q_", "qk_", "kv_", "v_", "first_"))
            and k not in ("hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
                          "auto_map", "experts_as_linears")))] = draw(JSON_VALUES)
    return config, worst(OK, *verdicts)


@FAST
@given(case=configs(), as_folder=st.booleans(), command=st.sampled_from(["estimate", "models"]))
def test_config_json_contents(case, as_folder, command):
    config, expect = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        spec = folder if as_folder else str(path)
        result = autotune(*(["estimate", "--model", spec] if command == "estimate"
                            else ["models", spec]), "--json")
    # `models` only resolves (no sizes read): a readable JSON object with a model_type is an
    # answer, whatever its sizes.
    check(result, expect if command == "estimate" else OK)
    if result.code == 0:
        json.loads(result.out)


@FAST
@given(content=st.one_of(
    st.binary(max_size=40),  # not UTF-8, not JSON, or not an object
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "model_type"), JSON_VALUES,
                    max_size=3).map(lambda d: json.dumps(d).encode()),  # no model_type
    JSON_SCALARS.filter(lambda v: not isinstance(v, str) or not v.strip()).map(
        lambda v: json.dumps({"model_type": v, **BASE_CONFIG}).encode()),
    st.just(b'{"model_type": "llama", "hidden_size": 64'),
    st.just(b"\xef\xbb\xbf\xff{}"),
    st.just(b"[" * 100_000 + b"]" * 100_000),
    st.just(b'{"model_type": "llama", "hidden_size": ' + b"9" * 5000 + b"}"),
), command=st.sampled_from(["estimate", "models"]))
def test_config_json_that_is_not_a_config(content, command):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_bytes(content)
        result = autotune(*(["estimate", "--model"] if command == "estimate" else ["models"]),
                          str(path))
    check(result, ERROR if not_a_config(content) else EITHER)


def not_a_config(content: bytes) -> bool:
    """The rule: a config.json is a UTF-8 JSON object with a non-blank string model_type."""
    try:
        data = json.loads(content.decode("utf-8").removeprefix("\ufeff"))
    except (ValueError, RecursionError):
        return True
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return not (isinstance(model_type, str) and model_type.strip())


@pytest.mark.parametrize("config, expect", [
    ({"model_type": "banana-no-such-type", **BASE_CONFIG}, ERROR),
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}, OK),
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100,
      "n_positions": "x"}, ERROR),
    ({"model_type": "gpt2", "n_embd": "64", "n_layer": 2, "n_head": 4}, ERROR),
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 10**6, "n_head": 4}, ERROR),
    ({"model_type": "llama", **BASE_CONFIG, "num_hidden_layers": 10**6}, ERROR),
    ({"model_type": "deepseek", **BASE_CONFIG, "n_routed_experts": 10**9,
      "moe_intermediate_size": 8, "num_experts_per_tok": 2}, ERROR),
    ({"model_type": "deepseek_v2", **BASE_CONFIG, "kv_lora_rank": "x"}, ERROR),
    ({"model_type": "deepseek_v2", **BASE_CONFIG, "kv_lora_rank": 8}, ERROR),  # lacks MLA dims
    ({"model_type": "llama", **BASE_CONFIG, "intermediate_size": None}, ERROR),
    ({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100},
     ERROR),  # no attention heads: a state-space model
    ({"model_type": "bamba", **BASE_CONFIG, "pad_token_id": 0, "bos_token_id": 0,
      "eos_token_id": 0}, ERROR),  # a hybrid: Mamba mixers beside its attention, refused
    ({"model_type": "mixtral", **BASE_CONFIG, "num_local_experts": 4,
      "num_experts_per_tok": 0}, ERROR),  # experts no token reaches
    ({"model_type": "qwen3_moe", **BASE_CONFIG, "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 0}, ERROR),  # empty experts
    ({"model_type": "qwen2_moe", **BASE_CONFIG, "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 32, "shared_expert_intermediate_size": 0}, OK),  # no shared
])
def test_config_json_edge_cases(tmp_path, config, expect):
    """Including unknown model types, which go to transformers (a meta-device build)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    check(autotune("estimate", "--model", str(path)), expect)


@pytest.mark.parametrize("model_type", [
    "aria_text",    # experts under a name its config does not count (moe_num_experts)
    "gemma4_text",  # head_dim kept per layer: reading the global one raises
])
def test_plan_answers_for_odd_architectures(tmp_path, model_type):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type, **BASE_CONFIG, "pad_token_id": 0,
                                "bos_token_id": 0, "eos_token_id": 0}))
    check(autotune("plan", "--model", str(path), "--gpu", "rtx3090", "--storage", "none"), OK)


def test_levers_a_model_cannot_take_are_skipped_in_combinations():
    """Falcon-7B with SDPA does not fit an A100 (its broadcast k and v run on the math
    path); the advice combined one more card with LoRA on attention projections it does
    not have, and the named error of that lever ended the estimate."""
    falcon = Path(__file__).parents[2] / "benchmarks" / "data" / "falcon-7b.json"
    check(autotune("estimate", "--model", str(falcon), "--gpu", "a100-80gb", "--batch", "4",
                   "--attn", "sdpa"), OK)


def test_model_folder_without_or_with_a_bad_config(tmp_path):
    check(autotune("estimate", "--model", str(tmp_path)), ERROR)
    (tmp_path / "config.json").mkdir()
    check(autotune("estimate", "--model", str(tmp_path)), ERROR)


# -- (c) dataset files given to `autotune run` ------------------------------------------------

DATASETS = {
    "empty.jsonl": b"",
    "blank.jsonl": b"\n\n  \n",
    "wrong-schema.jsonl": b'{"question": "hi", "answer": "yo"}\n',
    "bad-utf8.jsonl": b'{"instruction": "hi", "output": "\xff\xfe"}\n',
    "huge-line.jsonl": b'{"instruction": "' + b"x" * 3_000_000 + b'"}\n',
    "wrong-shape.json": b'{"a": [1], "b": [2]}',
    "scalar.json": b"42",
    "no-header.csv": b"hello,world\n",
    "header-only.csv": b"instruction,output\n",
    "data.bin": b"\x00\x01",
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_run_rejects_a_bad_dataset_before_anything_loads(tmp_path, name):
    data = tmp_path / name
    data.write_bytes(DATASETS[name])
    out = tmp_path / "run"
    result = autotune("-q", "run", "--model", "tiny", "--random-init", "--data", str(data),
                      "--max-steps", "1", "--output-dir", str(out))
    check(result, ERROR)
    assert name in result.err
    assert not out.exists() and not Path(f"{out}.partial").exists()


# -- (d) hand-edited plan.yaml -----------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_document(tmp_path_factory):
    """A real plan (LoRA on the tiny model), as `autotune plan -o` writes it."""
    path = tmp_path_factory.mktemp("base") / "plan.yaml"
    result = autotune("plan", "--model", "tiny", "--vram", "2GiB", "--method", "lora",
                      "--seq-len", "128", "--storage", "none", "-o", str(path))
    assert result.code == 0, result
    document = yaml.safe_load(path.read_text())
    assert document["recipe"]["method"] == "lora" and document["recipe"]["bits"] == 16
    return document


def _positive(limit=None):
    return lambda v: type(v) is int and v >= 1 and (limit is None or v <= limit)


def _number(v):
    return type(v) in (int, float) and 0 <= v < math.inf


RECIPE_RULES = {  # key: is the value valid in a LoRA recipe on a 16-bit base
    # qlora on the base's 16 bits: a contradiction (its base is 4-bit)
    "method": lambda v: v in ("full", "freeze", "lora", "dora") and type(v) is str,
    "bits": lambda v: type(v) is int and v in (16, 8, 4),
    "precision": lambda v: type(v) is str and v in ("bf16", "fp16", "fp32", "amp"),
    "optim": lambda v: type(v) is str and v in ("adamw_torch", "adamw_8bit",
                                                 "paged_adamw_8bit", "sgd", "adafactor"),
    "attn": lambda v: type(v) is str and v in ("sdpa", "flash", "eager"),
    "stage": lambda v: type(v) is str and v in ("pt", "sft", "dpo", "ppo", "inference"),
    "rank": _positive(RANK_MAX), "batch": _positive(BATCH_MAX), "seq_len": _positive(SEQ_MAX),
    "freeze_layers": _positive(FREEZE_MAX), "alpha": _positive(),
    "dropout": lambda v: type(v) in (int, float) and 0 <= v < 1,
    "grad_ckpt": lambda v: type(v) is bool,
    "targets": lambda v: None if type(v) is str and v not in TARGETS else v in TARGETS,
}
SECTION_RULES = {  # (section, key): rule; None from a rule: it depends (either outcome)
    ("model", "id"): lambda v: None if type(v) is str and v.strip() else False,
    ("model", "spec"): lambda v: v in ("tiny", None, "") or (None if type(v) is str else False),
    ("model", "name"): lambda v: v is None or type(v) is str,
    ("hardware", "gpu"): lambda v: v is None or type(v) is str,
    ("hardware", "budget_bytes"): _positive(), ("hardware", "memory_bytes"): _positive(),
    ("training", "micro_batch"): _positive(), ("training", "grad_accum"): _positive(),
    ("training", "learning_rate"): _number, ("training", "epochs"): _number,
    ("training", "lr_scheduler"): lambda v: type(v) is str and bool(v.strip()),
    ("predictions", "fidelity"): _number,
}
SECTIONS = ("model", "hardware", "training", "predictions")

HOSTILE = st.one_of(
    st.sampled_from(["x", "", " ", -3, 0, 1, 3, 16, 8, 4, 2.5, 0.5, 1e400, -1e400, None, True,
                     False, [], [1], {}, {"a": 1}, 10**30, "lora", "banana", "qv", "tiny",
                     "2020-13-45"]),
    st.integers(-(10**6), 10**6), st.text(max_size=6), JSON_VALUES,
)


_NAMES = st.none() | st.text(max_size=8)
VALUES = {  # values of the right type and range (the rules above still judge them)
    "method": st.sampled_from(["full", "freeze", "lora", "dora", "qlora"]),
    "bits": st.sampled_from([16, 8, 4]), "precision": st.sampled_from(["bf16", "fp32", "amp"]),
    "optim": st.sampled_from(["adamw_torch", "adamw_8bit", "sgd", "adafactor"]),
    "attn": st.sampled_from(["sdpa", "flash", "eager"]),
    "stage": st.sampled_from(["pt", "sft", "dpo", "ppo", "inference"]),
    "rank": st.integers(1, RANK_MAX), "batch": st.integers(1, 64),
    "seq_len": st.integers(1, SEQ_MAX), "freeze_layers": st.integers(1, 8),
    "alpha": st.integers(1, 10**6), "dropout": st.floats(0, 1, exclude_max=True),
    "grad_ckpt": st.booleans(), "targets": st.sampled_from(TARGETS),
    ("model", "id"): st.text(max_size=8), ("model", "spec"): st.sampled_from(["tiny", None]),
    ("model", "name"): _NAMES, ("hardware", "gpu"): _NAMES,
    ("hardware", "budget_bytes"): st.integers(1, 2**50),
    ("hardware", "memory_bytes"): st.integers(1, 2**50),
    ("training", "micro_batch"): st.integers(1, 64), ("training", "grad_accum"): st.integers(1, 64),
    ("training", "learning_rate"): st.floats(0, 1), ("training", "epochs"): st.floats(0, 10),
    ("training", "lr_scheduler"): st.sampled_from(["cosine", "linear"]),
    ("predictions", "fidelity"): st.floats(0, 1),
}


@st.composite
def edited_plans(draw, base):
    document = json.loads(json.dumps(base))  # a deep copy
    kind = draw(st.sampled_from(["recipe", "section", "section-type", "top", "drop"]))
    value = draw(HOSTILE)
    if kind == "recipe":
        key = draw(st.sampled_from(sorted(RECIPE_RULES)))
        value = draw(st.one_of(st.just(value), VALUES[key]))
        document["recipe"][key] = value
        valid = RECIPE_RULES[key](value)
    elif kind == "section":
        section, key = draw(st.sampled_from(sorted(SECTION_RULES)))
        value = draw(st.one_of(st.just(value), VALUES[(section, key)]))
        document[section][key] = value
        valid = SECTION_RULES[(section, key)](value)
    elif kind == "section-type":  # a whole section of the wrong type
        section = draw(st.sampled_from(SECTIONS))
        assume(not isinstance(value, dict))
        document[section] = value
        valid = False
    elif kind == "top":  # an unknown key, or the schema changed
        key = draw(st.sampled_from(["schema", "bogus", "Recipe", "distributed"]))
        assume(not (key == "distributed" and value is None))
        document[key] = value
        valid = False
    else:  # a required section dropped
        del document[draw(st.sampled_from(["schema", "model", "recipe"]))]
        valid = False
    if valid and kind in ("recipe", "section") and key in ("batch", "micro_batch"):
        # the trained micro batch is the priced one: editing one alone is a contradiction
        valid = document["recipe"]["batch"] == document["training"]["micro_batch"]
    expect = EITHER if valid is None else OK if valid else ERROR
    return yaml.safe_dump(document, allow_unicode=True).encode(), expect


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    return path


@FAST
@given(data=st.data())
def test_explain_hand_edited_plans(plan_document, data):
    content, expect = data.draw(edited_plans(plan_document))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plan.yaml"
        path.write_bytes(content)
        result = autotune("explain", str(path), "--json")
    check(result, expect)
    if result.code == 0:
        json.loads(result.out)


BROKEN_DOCUMENTS = [
    b"",  # empty: null
    b"- a\n- b\n",  # a list
    b"just a string\n",
    b"42\n",
    b"schema: [unclosed\n",
    b"schema: autotune.plan/1\nmodel: {id: tiny\n",
    b"\xff\xfe\x00s\x00c\x00h\x00",  # UTF-16, not UTF-8
    b"schema: autotune.plan/1\nmodel:\n  id: tiny\nrecipe:\n  rank: \xff\n",
    b"schema: 2020-13-45\n",  # a date YAML cannot build
    b"schema: !!int abc\n",
    b"schema: !!python/object:os.system x\n",
    b"a: " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
    b"? [a, b]\n: 1\n",  # an unhashable key
]


@FEW
@given(content=st.one_of(st.sampled_from(BROKEN_DOCUMENTS), st.binary(max_size=30),
                         st.text(max_size=30).map(str.encode)))
def test_explain_files_that_are_not_plans(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plan.yaml"
        path.write_bytes(content)
        check(autotune("explain", str(path)), ERROR)


RUN_EDITS = [
    ("recipe", "rank", "x"), ("recipe", "batch", -3), ("recipe", "method", "banana"),
    ("recipe", "seq_len", 10**30), ("recipe", "grad_ckpt", "yes"), ("recipe", "targets", 5),
    ("recipe", "stage", ["sft"]), ("recipe", "dropout", "x"), ("recipe", "bits", 16.0),
    ("training", "micro_batch", "x"), ("training", "learning_rate", "fast"),
    ("model", "id", 5), ("model", "spec", ["tiny"]), (None, "schema", "autotune.plan/0"),
    (None, "surprise", 1), (None, "training", [1, 2]), (None, "hardware", None),
]


@pytest.mark.parametrize("section, key, value", RUN_EDITS)
def test_run_rejects_a_hand_edited_plan(plan_document, good_data, tmp_path, section, key,
                                        value):
    document = json.loads(json.dumps(plan_document))
    (document[section] if section else document)[key] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(document))
    out = tmp_path / "run"
    result = autotune("-q", "run", str(path), "--data", str(good_data), "--max-steps", "1",
                      "--output-dir", str(out))
    check(result, ERROR)
    assert str(path) in result.err
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_run_of_a_plan_for_an_unknown_model_leaves_nothing(plan_document, good_data, tmp_path):
    document = json.loads(json.dumps(plan_document))
    document["model"]["spec"] = "no-such-model"
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(document))
    out = tmp_path / "run"
    result = autotune("-q", "run", str(path), "--data", str(good_data), "--output-dir", str(out))
    check(result, ERROR)
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize("content", BROKEN_DOCUMENTS[:8])
def test_run_rejects_a_file_that_is_not_a_plan(good_data, tmp_path, content):
    path = tmp_path / "plan.yaml"
    path.write_bytes(content)
    out = tmp_path / "run"
    check(autotune("-q", "run", str(path), "--data", str(good_data), "--output-dir", str(out)),
          ERROR)
    assert not out.exists() and not Path(f"{out}.partial").exists()


# -- (e) a plugin that raises is named ------------------------------------------------------

class Exploding(ModelFamily):
    name = "exploding"
    model_types = ("exploding",)

    def describe(self, config, remote_code=False):
        raise RuntimeError("describe blew up")


class Picky(ModelFamily):
    name = "picky"

    def matches(self, config):
        raise RuntimeError("matches blew up")


class BrokenStage(Stage):
    name = "sft"

    def extra_memory(self, arch, recipe, params):
        raise ZeroDivisionError("extra_memory blew up")


def _plugin_manager(plugin):
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(plugin, name="broken-plugin")
    return pm


class RegistersExploding:
    @hookimpl
    def register_model_families(self, register):
        register(Exploding())


class RegistersPicky:
    @hookimpl
    def register_model_families(self, register):
        register(Picky())


class RaisesInRegisterFamilies:
    @hookimpl
    def register_model_families(self, register):
        raise ValueError("no families today")


class RaisesInRegisterStages:
    @hookimpl
    def register_stages(self, register):
        raise KeyError("no stages today")


class RaisesInRegisterCommands:
    @hookimpl
    def register_commands(self, cli):
        raise RuntimeError("no commands today")


@pytest.mark.parametrize("plugin, model_type, message", [
    (RegistersExploding(), "exploding", "describe blew up"),
    (RegistersPicky(), "llama", "matches blew up"),
    (RaisesInRegisterFamilies(), "llama", "no families today"),
    (RaisesInRegisterStages(), "llama", "no stages today"),
    (RaisesInRegisterCommands(), "llama", "no commands today"),
])
def test_a_plugin_that_raises_is_named(tmp_path, plugin, model_type, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": model_type, **BASE_CONFIG}))
    result = autotune("estimate", "--model", str(config), pm=_plugin_manager(plugin))
    check(result, ERROR)
    assert "broken-plugin" in result.err and message in result.err, result


class RegistersBrokenStage:
    @hookimpl
    def register_stages(self, register):
        register(BrokenStage())


def test_a_stage_that_raises_is_named(monkeypatch):
    monkeypatch.setenv("AUTOTUNE_DISABLE_PLUGINS", "autotune_plugins.sft")  # the name is free
    result = autotune("estimate", "--model", "tiny", "--stage", "sft",
                      pm=_plugin_manager(RegistersBrokenStage()))
    check(result, ERROR)
    assert "broken-plugin" in result.err and "extra_memory blew up" in result.err, result


BROKEN_MODULE = "raise RuntimeError('boom at import')\n"


def test_strict_plugins_name_the_broken_plugin(tmp_path, monkeypatch):
    from tests.plugin.test_plugins import install_fake_distribution

    module = "autotune_hostile_broken"
    install_fake_distribution(tmp_path, module, BROKEN_MODULE, "broken-plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("AUTOTUNE_STRICT_PLUGINS", "1")
    result = autotune("gpus", "t4", pm=None)
    check(result, ERROR)
    assert "broken-plugin" in result.err and module in result.err and "boom" in result.err
    monkeypatch.delenv("AUTOTUNE_STRICT_PLUGINS")
    result = autotune("gpus", "t4", pm=None)  # not strict: a warning, and the answer
    assert result.code == 0 and "broken-plugin" in result.err, result


# -- the console script itself, for what only a real process shows ---------------------------

def test_console_script_with_odd_bytes_and_huge_numbers(tmp_path):
    """argv that is not UTF-8 and numbers too big for a float, through a real stderr."""
    script = textwrap.dedent("""
        import sys
        from autotune.cli.main import main
        main()
    """)
    env = {**os.environ, "AUTOTUNE_DISABLE_PLUGIN_AUTOLOAD": "1",
           "AUTOTUNE_CACHE_DIR": str(tmp_path)}
    for args in (["estimate", "--model", os.fsdecode(b"\xff\xfe")],
                 ["estimate", "--model", "tiny", "--vram", "9" * 400 + "GB"],
                 ["gpus", os.fsdecode(b"rtx\xff")],
                 ["generate", str(tmp_path), "--prompt", os.fsdecode(b"hi\xff")],
                 ["run", "--demo", "--output-dir", os.fsdecode(bytes(tmp_path) + b"/d\xff")]):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                                text=True, timeout=120, env=env, check=False)
        check(Outcome(result.returncode, result.stdout, result.stderr), ERROR)
