"""LoRA targets per architecture: on a small random model of each family, the default targets exist, every one of
them is adapted, and only adapter weights train; the memory planner counts the same adapter parameters. A family
not listed gets the listed ones' rule, every linear layer of its blocks; names given that adapt nothing are refused
with the model's linear layers."""

from __future__ import annotations

import copy
import re

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


def test_rslora_scales_the_adapters_by_the_square_root_of_the_rank(tiny_run, tmp_path):
    """`train.use_rslora`: the train stage's adapters scaled by lora_alpha / sqrt(lora_r), so rsLoRA at r=4 and
    alpha 16 trains the losses plain LoRA does at alpha 32 (both scale by 8; no dropout, the same seed), and the
    adapter saved says rsLoRA, for peft to load it so. Full fine-tuning refuses it."""
    import json

    from edgar_tune.config import load_config
    from tests.conftest import train_variants

    variants = {"rs": {"use_rslora": True, "lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
                "plain": {"lora_r": 4, "lora_alpha": 32, "lora_dropout": 0.0}}  # fmt: skip
    out = train_variants(tiny_run, tmp_path, variants, steps=4)
    assert out["rs"][1] == out["plain"][1], (out["rs"][1], out["plain"][1])
    saved = {name: json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text()) for name in variants}
    assert (saved["rs"]["use_rslora"], saved["plain"]["use_rslora"]) == (True, False)
    with pytest.raises(ConfigError, match="train.use_rslora scales LoRA's adapters, and train.mode=full trains none"):
        load_config("tiny", ["train.mode=full", "train.use_rslora=true"])


def test_dora_trains_a_magnitude_per_output_beside_the_adapters(tiny_run, tmp_path):
    """`train.use_dora`: the train stage's adapters are DoRA's, a magnitude per output row of each adapted weight
    trained beside them. Both start as the base (B = 0, each magnitude its row's norm), so the first losses are plain
    LoRA's, and then part; the adapter saved says DoRA and holds the trained magnitudes, with the parameters the
    memory plan counts; merged as the evaluate stage loads it, it computes what peft's unmerged adapter does."""
    import json

    from safetensors.torch import load_file

    from tasks.memory import model_shape
    from tasks.models import base_model_path, load_causal_lm
    from tests.conftest import train_variants

    variants = {"dora": {"use_dora": True, "lora_dropout": 0.0}, "plain": {"lora_dropout": 0.0}}
    out = train_variants(tiny_run, tmp_path, variants, steps=4)
    (dora, dora_losses), (plain, plain_losses) = out["dora"], out["plain"]
    assert dora_losses[0] == pytest.approx(plain_losses[0], rel=1e-6) and dora_losses[1:] != plain_losses[1:]
    adapter = tmp_path / "dora" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    magnitudes = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "magnitude" in k}
    base = str(base_model_path(tmp_path / "03_tokenize"))
    norms = {n: m.weight.norm(dim=1) for n, m in load_causal_lm(base).named_modules() if n.endswith("_proj")}
    assert len(magnitudes) == len(norms) == 14  # seven projections in each of two layers
    assert all(not torch.allclose(v, norms[k.split(".lora_magnitude")[0].removeprefix("base_model.model.")])
               for k, v in magnitudes.items())  # fmt: skip
    shape = model_shape(base, "lora", 8, None, dora=True)
    assert dora["trainable_parameters"] == shape.lora_params == plain["trainable_parameters"] + sum(
        out for _, out in shape.dora_widths) * 2  # fmt: skip
    from peft import PeftModel

    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    unmerged = PeftModel.from_pretrained(load_causal_lm(base), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(base, str(adapter))(ids).logits, unmerged(ids).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_loraplus_trains_b_at_its_ratio_of_the_learning_rate(tiny_run, tmp_path):
    """`train.loraplus_lr_ratio` (LoRA+): the optimizer's groups put every lora_B matrix and every 1-D trained tensor
    (DoRA's magnitudes) at the ratio times the learning rate and every lora_A at it, each with the weight decay the
    Trainer gives it; the train stage's first step is plain LoRA's (B starts at zero) and then they part. Full
    fine-tuning refuses it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

    from edgar_tune.config import load_config
    from tasks.checkpoints import trainer_class
    from tests.conftest import train_variants

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100)  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=2, use_dora=True,
                                                                                target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=1e-4, weight_decay=0.01, use_cpu=True,
                             report_to=[])  # fmt: skip
    trainer = trainer_class()(model=model, args=args)
    trainer.loraplus_lr_ratio = 16.0
    groups = trainer.create_optimizer().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    placed = {names[id(p)].split("self_attn.")[1].removesuffix(".default.weight"): (g["lr"], g["weight_decay"])
              for g in groups for p in g["params"]}  # fmt: skip
    assert placed == {"q_proj.lora_A": (1e-4, 0.01), "v_proj.lora_A": (1e-4, 0.01), "q_proj.lora_B": (1.6e-3, 0.01),
                      "v_proj.lora_B": (1.6e-3, 0.01), "q_proj.lora_magnitude_vector": (1.6e-3, 0.01),
                      "v_proj.lora_magnitude_vector": (1.6e-3, 0.01)}  # fmt: skip
    variants = {"plus": {"loraplus_lr_ratio": 16, "lora_dropout": 0.0}, "plain": {"lora_dropout": 0.0}}
    out = train_variants(tiny_run, tmp_path, variants, steps=3)
    plus_losses, plain_losses = out["plus"][1], out["plain"][1]
    assert plus_losses[0] == pytest.approx(plain_losses[0], rel=1e-6) and plus_losses[1:] != plain_losses[1:]
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio sets LoRA's B matrices' learning rate"):
        load_config("tiny", ["train.mode=full", "train.loraplus_lr_ratio=16"])


@pytest.mark.parametrize(("settings", "says"), [
    (["train.mode=full"], "train.use_dora decomposes LoRA's adapted weights, and train.mode=full trains them whole"),
    (["train.fp8_base=true"], "train.use_dora with train.fp8_base: DoRA normalizes each adapted weight W + BA"),
])  # fmt: skip
def test_dora_is_refused_where_it_cannot_run(settings, says):
    from edgar_tune.config import load_config

    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config("tiny", ["train.use_dora=true", *settings])


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
def test_token_rows_train_beside_lora_through_the_fused_loss_as_through_peft(tied):
    """`train.trainable_tokens`: peft's trainable tokens on the input embedding's rows and, where the LM head is
    not tied to it, on the head's own. The fused loss reads the head's rows apart (kernels/hf.py `head_rows`) and
    gives every trainable tensor the gradient peft's own loss gives it, the rows' included (a tied head's rows get
    both uses'), without the dense head gradient peft's merged copy of the head would cost (a matmul as large as
    the logits'); merged, the version holds the trained rows and the base's everywhere else."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from kernels.hf import causal_lm_loss
    from tasks.finetune import token_rows

    _, model = _model("LlamaConfig", dict(CONFIGS["llama"][1], tie_word_embeddings=tied))
    base_embedding = model.get_input_embeddings().weight.detach().clone()
    base_head = model.get_output_embeddings().weight.detach().clone()
    plain = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = [299, 3, 150]
    rows = token_rows(model, ids)
    assert rows == ({"model.embed_tokens": ids} if tied else {"model.embed_tokens": ids, "lm_head": ids})
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=rows))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    deltas = [n for n in params if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if tied else 2) and all("lora_" in n for n in params if n not in deltas), list(params)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (2, 24), generator=g)
    input_ids[:, ::5] = 299  # the rows' tokens as inputs and as targets
    labels = input_ids.clone()
    labels[:, 7] = 3
    labels[0, :4] = -100
    want = torch.autograd.grad(model(input_ids=input_ids, labels=labels).loss, list(params.values()))
    got = torch.autograd.grad(causal_lm_loss(model, input_ids, labels, backend="torch"), list(params.values()))
    for name, w, o in zip(params, want, got, strict=True):
        torch.testing.assert_close(o, w, atol=1e-6, rtol=1e-4, msg=name)
    assert all(want[list(params).index(n)].abs().sum() > 0 for n in deltas)
    flops = []
    for m in (plain, model):
        with FlopCounterMode(display=False) as counter:
            causal_lm_loss(m, input_ids, labels, backend="torch")  # the loss's gradients are computed with it
        flops.append(counter.get_total_flops())
    head_gradient = 2 * 2 * 23 * 300 * 64  # tokens x vocab x hidden, a multiply and an add
    assert 0 < flops[1] - flops[0] < head_gradient / 10, flops
    with torch.no_grad():
        for n in deltas:
            params[n].add_(1.0)
    merged = model.merge_and_unload()
    embedding = merged.get_input_embeddings().weight
    torch.testing.assert_close(embedding[ids], base_embedding[ids] + 1.0)
    others = [i for i in range(300) if i not in ids]
    assert torch.equal(embedding[others], base_embedding[others])
    head = merged.get_output_embeddings().weight
    assert head is embedding if tied else torch.equal(head[ids], base_head[ids] + 1.0) and torch.equal(
        head[others], base_head[others])  # fmt: skip


def test_special_tokens_the_base_never_trained_are_named_with_the_setting_that_trains_them(tiny_run, tmp_path,
                                                                                            caplog):  # fmt: skip
    """A special token the training examples hold whose embedding row the base never trained (zero: Llama-3 8B
    base's chat tokens, as reported), which `train.trainable_tokens=auto` does not take (auto takes non-special
    tokens): the training says so with the setting that trains it; named, its row trains and nothing is said."""
    import shutil

    from safetensors.torch import load_file, save_file

    from edgar_tune.config import EvalConfig, TrainConfig
    from tasks.finetune import train
    from tasks.models import base_model_path

    runs, _ = tiny_run
    tok = tmp_path / "03_tokenize"
    shutil.copytree(runs / "latest" / "03_tokenize", tok)
    file = f"{base_model_path(tok)}/model.safetensors"
    weights = load_file(file)
    weights["model.embed_tokens.weight"][0] = 0.0  # <|endoftext|>, between the packed documents
    save_file(weights, file, metadata={"format": "pt"})
    cfg = TrainConfig(max_steps=1, eval_steps=0, early_stopping_patience=0, save_steps=0,
                      load_best_model_at_end=False, memory_check="off")  # fmt: skip
    said = []
    for name, setting in (("auto", "auto"), ("named", ["<|endoftext|>"])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="tasks.finetune"):
            stats = train(tmp_path / name, tok, cfg.model_copy(update={"trainable_tokens": setting}),
                          EvalConfig(max_val_samples=4), tmp_path / f"{name}.ckpt")  # fmt: skip
        said.append((stats["trainable_tokens"], caplog.text))
    assert said[0][0] == [] and ("the training examples hold <|endoftext|> (0): special tokens whose embedding or LM "
                                 "head rows are zero in the base, never trained; LoRA leaves those rows so. To train "
                                 "them beside it: train.trainable_tokens=<|endoftext|>") in said[0][1]  # fmt: skip
    assert said[1][0] == ["<|endoftext|>"] and "never trained" not in said[1][1]


def test_a_start_taken_from_the_base_is_published_as_a_plain_lora_on_the_unchanged_base(tiny_run, tmp_path, caplog):
    """`train.lora_init=pissa` (PiSSA) and `olora` (OLoRA): the adapters start as a decomposition of each adapted
    weight, taken out of the base, so the first loss is the base's (plain LoRA's) and the trainings then part. The
    adapter published is a plain LoRA with twice lora_r that, on the unchanged base (merged, as the evaluate stage
    loads it, and through peft), computes what the training's model did: its last checkpoint, reloaded as peft
    reloads a PiSSA or OLoRA adapter (decomposing the base again, as a resume does). DoRA's magnitudes come through
    the conversion too. The log says what was decomposed, in how long (a full SVD of a 7B base's weights is slow)."""
    import json
    import logging

    from peft import PeftModel
    from safetensors.torch import load_file

    from tasks.models import base_model_path, load_causal_lm
    from tests.conftest import train_variants

    pissa = {"lora_init": "pissa", "lora_dropout": 0.0, "save_steps": 4}
    variants = {"pissa": pissa, "pissa_dora": pissa | {"use_dora": True}, "olora": pissa | {"lora_init": "olora"},
                "plain": {"lora_dropout": 0.0}}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="tasks.finetune"):
        out = train_variants(tiny_run, tmp_path, variants, steps=4)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.lora_init=")]
    assert len(said) == 3 and said[0].startswith("train.lora_init=pissa: 14 adapted weights decomposed in "), said
    assert said[0].endswith(" s; the adapter is published as a plain LoRA of r=16 on the unchanged base")
    plain_stats, plain = out.pop("plain")
    base = str(base_model_path(tmp_path / "03_tokenize"))
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    for name, (stats, losses) in out.items():
        assert losses[0] == pytest.approx(plain[0], rel=1e-5) and losses[1:] != plain[1:], (name, losses, plain)
        assert stats["lora_init"] == variants[name]["lora_init"]
        assert (stats["trainable_parameters"] == plain_stats["trainable_parameters"]) == (name != "pissa_dora")
        adapter = tmp_path / name / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 64, True)
        weights = load_file(adapter / "adapter_model.safetensors")
        assert {v.shape[0] for k, v in weights.items() if ".lora_A." in k} == {16}
        assert any("magnitude" in k for k in weights) == (name == "pissa_dora")
        trained = PeftModel.from_pretrained(load_causal_lm(base), str(tmp_path / f"{name}.ckpt" / "checkpoint-4"))
        assert trained.peft_config["default"].init_lora_weights == variants[name]["lora_init"]  # decomposed again
        published = PeftModel.from_pretrained(load_causal_lm(base), str(adapter))
        with torch.no_grad():
            want = trained.eval()(ids).logits
            torch.testing.assert_close(published.eval()(ids).logits, want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(load_causal_lm(base, str(adapter))(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_a_start_taken_from_the_base_is_refused_where_it_cannot_be():
    """PiSSA and OLoRA decompose the base's weights: not with full fine-tuning (no adapters), a quantized base or
    ZeRO-3's sharded build; a start peft does not have is refused with those it has."""
    from edgar_tune.config import load_config
    from tasks.finetune import preflight

    with pytest.raises(ConfigError, match="train.lora_init=gaussian starts LoRA's adapters, and train.mode=full"):
        load_config("tiny", ["train.mode=full", "train.lora_init=gaussian"])
    with pytest.raises(ConfigError, match="train.lora_init=pissa with train.int8_quantization: PiSSA and OLoRA"):
        load_config("tiny", ["train.lora_init=pissa", "train.int8_quantization=true"])
    with pytest.raises(ConfigError, match="must be one of default, gaussian, pissa, olora or pissa_niter_N"):
        load_config("tiny", ["train.lora_init=pisa"])
    assert load_config("tiny", ["train.lora_init=pissa_niter_4"]).train.lora_init == "pissa_niter_4"
    with pytest.raises(ConfigError, match=r"train.lora_init=olora decomposes .* train.deepspeed=zero3 \(ZeRO-3\)"):
        preflight(load_config("tiny", ["train.lora_init=olora", "train.deepspeed=zero3"]).train)
    with pytest.raises(ConfigError, match="Did you mean `train.lora_init`"):
        load_config("tiny", ["train.init_lora_weights=pissa"])
