"""LoRA targets per architecture: on a small random model of each family, the default targets exist, every one of
them is adapted, and only adapter weights train; the memory planner counts the same adapter parameters. A family
not listed gets the listed ones' rule, every linear layer of its blocks; names given that adapt nothing are refused
with the model's linear layers."""

from __future__ import annotations

import pytest
import torch

from edgar_tune.config import ConfigError
from tasks.finetune import LORA_TARGETS, block_linears, lora_targets

CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=300)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=300, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=300)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128)),
}  # fmt: skip
UNLISTED = {  # families LORA_TARGETS does not name: their targets come from the rule
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=300),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=300),
              ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
}  # fmt: skip


def _model(name: str, kwargs: dict):
    import transformers

    config = getattr(transformers, name)(**kwargs)
    torch.manual_seed(0)
    return config, transformers.AutoModelForCausalLM.from_config(config)


def test_every_listed_architecture_is_covered():
    assert set(CONFIGS) == set(LORA_TARGETS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS) + sorted(UNLISTED))
def test_default_targets_adapt_every_listed_module(model_type, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tasks.memory import model_shape

    name, kwargs, *expected = CONFIGS.get(model_type) or UNLISTED[model_type]
    config, model = _model(name, kwargs)
    assert config.model_type == model_type
    targets = lora_targets(model, None)
    assert targets == (expected[0] if expected else LORA_TARGETS[model_type])
    assert set(block_linears(model)) == set(targets)  # the listed families' targets are the rule's too
    found = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(targets) <= found, f"{model_type}: {set(targets) - found} not in the model"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == set(targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    config.save_pretrained(tmp_path)
    assert model_shape(str(tmp_path), "lora", 4, None).lora_params == sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad
    )


@pytest.mark.parametrize(("given", "says"), [
    (["q_proj", "v_porj"], "'v_porj' names no module of this llama model"),  # a typo would adapt q_proj alone
    (["mlp"], "'mlp' names LlamaMLP modules, which LoRA does not adapt"),  # peft refuses it once the base has loaded
    (["input_layernorm"], "'input_layernorm' names LlamaRMSNorm modules"),
])  # fmt: skip
def test_targets_that_adapt_nothing_are_refused_with_the_linear_layers(given, says):
    _, model = _model(*CONFIGS["llama"])
    with pytest.raises(ConfigError) as err:
        lora_targets(model, given)
    assert str(err.value).startswith(f"train.lora_target_modules: {says}")
    assert str(err.value).endswith("; its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                   "down_proj, lm_head; unset, it adapts q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                   "up_proj, down_proj")  # fmt: skip


def test_targets_match_as_peft_matches_them(tmp_path):
    """A dotted suffix names the modules peft adapts for it (only the attention's o_proj), and the planner counts
    those; the embedding and the LM head are modules LoRA adapts too."""
    from peft import LoraConfig, get_peft_model

    from tasks.memory import model_shape

    config, model = _model(*CONFIGS["llama"])
    given = ["self_attn.o_proj", "embed_tokens", "lm_head"]
    assert lora_targets(model, given) == given
    config.save_pretrained(tmp_path)
    planned = model_shape(str(tmp_path), "lora", 4, given)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=given, task_type="CAUSAL_LM"))
    assert planned.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert planned.lora_targets == ("o_proj",)
