"""LoRA targets per architecture: on a small random model of each family, the default targets exist, every one of
them is adapted, and only adapter weights train; the memory planner counts the same adapter parameters."""

from __future__ import annotations

import pytest
import torch

from tasks.finetune import LORA_TARGETS, lora_targets

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


def test_every_listed_architecture_is_covered():
    assert set(CONFIGS) == set(LORA_TARGETS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_default_targets_adapt_every_listed_module(model_type, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    from tasks.memory import model_shape

    name, kwargs = CONFIGS[model_type]
    config = getattr(transformers, name)(**kwargs)
    assert config.model_type == model_type
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    targets = lora_targets(model_type, None)
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


def test_unknown_architecture_names_the_key():
    with pytest.raises(ValueError, match="train.lora_target_modules"):
        lora_targets("bloom", None)
    assert lora_targets("bloom", ["query_key_value"]) == ["query_key_value"]
