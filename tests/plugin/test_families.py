"""Family plugins: chat templates render, quirks and loading arguments are stated."""

import pytest

from autotune.catalog.demo import build_tokenizer
from autotune.catalog.models import resolve_model
from autotune.plugin.registry import CHATML, model_families

CONVERSATION = [{"role": "system", "content": "Be kind."},
                {"role": "user", "content": "I feel tired."},
                {"role": "assistant", "content": "That sounds draining."}]


@pytest.mark.parametrize("model_id", ["deepseek-7b-chat", "llama-2-7b", "mistral-7b",
                                      "qwen2.5-7b", "yuan2-2b", "deepseek-v2-lite"])
def test_default_chat_templates_render(pm, model_id):
    spec = resolve_model(model_id, pm)
    family = model_families(pm)[spec.family]
    tokenizer = build_tokenizer(2048)
    tokenizer.chat_template = family.chat_template(spec.config)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert "I feel tired." in text and "That sounds draining." in text
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False,
                                           add_generation_prompt=True)
    assert "That sounds draining." not in prompt


def test_qwen_and_unknown_models_use_chatml(pm):
    families = model_families(pm)
    assert families["qwen"].chat_template({}) == CHATML
    assert families["generic"].chat_template({}) == CHATML


def test_quirks_and_loading_arguments(pm):
    families = model_families(pm)
    v2 = resolve_model("deepseek-v2-lite", pm).config
    assert any("fuses" in q for q in families["deepseek"].quirks(v2))
    yuan = resolve_model("yuan2-2b", pm).config
    assert families["yuan"].remote_code(yuan)
    assert any("trust-remote-code" in q for q in families["yuan"].quirks(yuan))
    assert families["yuan"].load_kwargs(yuan) == {"attn_implementation": "eager"}
    assert families["llama"].load_kwargs({}) == {}
