"""Model family: Yuan 2.0 (remote code): Llama-style layers plus Localized Filtering-based Attention.

Each attention block carries ``lf_gate``: two (2, 1) convolutions (hidden -> hidden/2 ->
hidden, with biases) and an RMSNorm, applied to the hidden states before q and k.
"""

from autotune import ModelFamily, SavedActivation, decoder, hookimpl


class Yuan(ModelFamily):
    name = "yuan"
    model_types = ("yuan",)

    def remote_code(self, config):
        return True

    def module_groups(self, config):
        groups = super().module_groups(config)
        groups["lfa"] = ("lf_gate",)
        return groups

    def chat_template(self, config):
        # Yuan 2.0 separates turns with <sep> and ends answers with <eod>
        return ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                "{{ message['content'] + '<eod>' }}{% else %}{{ message['content'] + '<sep>' }}"
                "{% endif %}{% endfor %}")

    def export_template(self, tool, config):
        return "yuan"

    def load_kwargs(self, config):
        # the hub's modelling code does not declare SDPA support: transformers refuses it
        return {"attn_implementation": "eager"}

    def quirks(self, config):
        return ["remote code: loading needs --trust-remote-code (never implied)",
                "the tokenizer needs pad_token set to <unk> and add_eos_token=False (seed 001)"]

    def describe(self, config, remote_code=False):
        h = config["hidden_size"]
        half = h // 2
        lfa = {
            "self_attn.lf_gate.conv1.weight": half * h * 2,
            "self_attn.lf_gate.conv1.bias": half,
            "self_attn.lf_gate.conv2.weight": h * half * 2,
            "self_attn.lf_gate.conv2.bias": h,
            "self_attn.lf_gate.output_layernorm.weight": h,
        }
        # for backward: the filter's input, the first convolution's output, and the
        # RMSNorm's fp32 input
        saves = (SavedActivation("lfa.x", h), SavedActivation("lfa.conv1", half),
                 SavedActivation("lfa.x32", h, fp32=True))
        return decoder(config, extras=lfa, tags=("lfa",), saves=saves, counted_by="plugin yuan")


@hookimpl
def register_model_families(register):
    register(Yuan())
