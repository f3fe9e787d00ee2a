"""The training engine's speed options besides the loss kernel: packing without cross-document attention
(`train.document_mask`), `train.torch_compile` and selective gradient checkpointing (`train.checkpoint_layers`).
Their speed is measured in bench/train_throughput.py; here, that they compute what they claim."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tasks.finetune import CausalLMCollator, document_positions, steady_step_seconds
from tests.conftest import train_variants


def test_document_positions_restart_after_each_end_of_document():
    ids = torch.tensor([[5, 5, 0, 7, 7, 7, 0, 1], [0, 1, 2, 0, 0, 3, 3, 3], [4, 4, 4, 4, 4, 4, 4, 4]])
    assert document_positions(ids, eos=0).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0],
        [0, 0, 1, 2, 0, 0, 1, 2],
        list(range(8)),
    ]
    batch = CausalLMCollator(pad_token_id=0, document_eos=0)([{"input_ids": [5, 0, 6, 6]}])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1]] and "attention_mask" not in batch
    assert "position_ids" not in CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 0, 6, 6]}])


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])  # flex: 30 s
def test_document_mask_keeps_each_packed_document_to_itself(tiny_run, attention):      # of compiling on the CPU
    """A block [doc A, eos, doc B]: with restarted position ids, doc B's logits are those of doc B alone, with
    PyTorch's sdpa (a dense mask) and with flex attention (a block mask)."""
    from tasks.models import base_model_path
    from tasks.models import load_causal_lm

    runs, _ = tiny_run
    model = load_causal_lm(str(base_model_path(runs / "latest" / "03_tokenize")), attention=attention).eval()
    eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else model.config.eos_token_id[0]
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    doc_a = torch.randint(5, vocab, (1, 13), generator=g)
    doc_b = torch.randint(5, vocab, (1, 11), generator=g)
    packed = torch.cat([doc_a, torch.tensor([[eos]]), doc_b], dim=1)
    with torch.no_grad():
        alone = model(input_ids=doc_b).logits[0]
        masked = model(input_ids=packed, position_ids=document_positions(packed, eos), use_cache=False).logits[0, 14:]
        leaky = model(input_ids=packed).logits[0, 14:]
    torch.testing.assert_close(masked, alone, atol=1e-4, rtol=1e-4)
    assert (leaky - alone).abs().max() > 1e-2  # without the mask, doc B sees doc A


def test_steady_step_time_leaves_out_the_warm_up_steps():
    assert steady_step_seconds([30.0, 2.0, 1.5, 1.0, 1.0, 1.2]) == pytest.approx(1.0)
    assert steady_step_seconds([3.0, 1.0]) == pytest.approx(2.0)  # too few steps: all of them
    assert steady_step_seconds([]) is None


def test_document_mask_reaches_the_model_in_training(tiny_run, tmp_path):
    """document_mask=true changes the training losses (no token sees the previous document), and the run records
    it and its steady-state speed."""
    out = train_variants(tiny_run, tmp_path, {"eager": {}, "masked": {"document_mask": True}})
    assert out["masked"][0]["document_mask"] is True and out["eager"][0]["document_mask"] is False
    assert out["masked"][1] != pytest.approx(out["eager"][1], rel=1e-4)
    assert all(s["tokens_per_s"] > 0 and s["step_seconds"] > 0 for s, _ in out.values())


def test_torch_compile_of_each_layer_trains_the_eager_losses_in_two_graphs(tiny_run, tmp_path):
    """train.torch_compile compiles each transformer layer in place by default (train.compile_scope=auto): the
    layers share their compiled graphs, two here: the first layer's input needs no gradient (LoRA leaves the
    embeddings frozen) and the others' do. The losses are the eager ones, and the saved adapter has the eager run's
    tensor names. Trained as the fitted 7B trains on a GPU (bench/gpu_session.sh): one of the two layers recomputed
    (checkpointing is decided outside the compiled layer, so it adds no graph), lean_lora, an FP8 base."""
    from safetensors import safe_open
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # dynamo's caches outlive a test: of earlier tests' models, in this process
    graphs = counters["stats"]["unique_graphs"]
    fitted = {"gradient_checkpointing": True, "checkpoint_layers": 0.5, "lean_lora": True, "fp8_base": True}
    out = train_variants(tiny_run, tmp_path, {"eager": fitted, "compiled": fitted | {"torch_compile": True}}, steps=4)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert out["compiled"][0]["torch_compile"] is True and out["compiled"][0]["compile_scope"] == "layers"
    assert out["eager"][0]["compile_scope"] is None
    assert out["compiled"][0]["checkpointed_layers"] == "1/2" and out["compiled"][0]["fp8_base_layers"] > 0
    assert out["compiled"][1] == pytest.approx(out["eager"][1], rel=2e-3)
    names = [sorted(safe_open(tmp_path / run / "adapter" / "adapter_model.safetensors", "pt").keys())
             for run in ("eager", "compiled")]  # fmt: skip
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])


@pytest.mark.slow  # inductor compiles for about 40 s on this CPU
def test_torch_compile_of_the_whole_model_trains_the_eager_losses(tiny_run, tmp_path):
    compiled = {"torch_compile": True, "compile_scope": "model"}
    out = train_variants(tiny_run, tmp_path, {"eager": {}, "compiled": compiled})
    assert out["compiled"][0]["torch_compile"] is True and out["eager"][0]["torch_compile"] is False
    assert out["compiled"][0]["compile_scope"] == "model"
    assert out["compiled"][1] == pytest.approx(out["eager"][1], rel=2e-3)


def _lora_grads(base: str, fraction: float | None, ids: torch.Tensor) -> tuple[dict, list[int]]:
    """One forward and backward of a LoRA model (dropout 0.1) with checkpointing on `fraction` of the layers
    (None: off): the adapters' gradients and how often each layer's MLP ran."""
    from peft import LoraConfig, get_peft_model

    from tasks.finetune import select_checkpointed_layers
    from tasks.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(base)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    if fraction is not None:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        select_checkpointed_layers(model, fraction)
    layers = model.get_base_model().model.layers
    runs = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, runs


def test_checkpoint_layers_recomputes_only_the_chosen_layers(tiny_run):
    """checkpoint_layers=0.5: every other layer runs again in backward, the others once; the gradients (LoRA
    dropout included) are those of full checkpointing and of none."""
    from tasks.models import base_model_path

    runs, _ = tiny_run
    base = str(base_model_path(runs / "latest" / "03_tokenize"))
    ids = torch.randint(5, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    none, once = _lora_grads(base, None, ids)
    full, twice = _lora_grads(base, 1.0, ids)
    half, mixed = _lora_grads(base, 0.5, ids)
    n = len(once)
    assert once == [1] * n and twice == [2] * n
    assert mixed == [2 if i % 2 else 1 for i in range(n)] and n >= 2
    for name in none:
        torch.testing.assert_close(full[name], none[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(half[name], none[name], rtol=1e-5, atol=1e-7)


def test_checkpoint_layers_in_training_and_its_refusals(tiny_run, tmp_path):
    """The train stage with half the layers recomputed, and with gradient_checkpointing=auto (the default), which on
    this CPU with RAM to spare recomputes none: the losses of full checkpointing, and the run says how many layers
    it recomputed. Asking for recompute with checkpointing off (or auto) is refused, naming both keys."""
    from edgar_tune.config import ConfigError, load_config

    on = {"gradient_checkpointing": True}
    out = train_variants(tiny_run, tmp_path, {"all": on, "half": on | {"checkpoint_layers": 0.5}, "auto": {}}, steps=4)
    layers = int(out["half"][0]["checkpointed_layers"].split("/")[1])
    assert out["half"][0]["checkpointed_layers"] == f"{layers // 2}/{layers}"
    assert out["all"][0]["checkpointed_layers"] == "all"
    assert out["auto"][0]["checkpointed_layers"] == "none" and out["auto"][0]["gradient_checkpointing"] is False
    assert out["half"][1] == pytest.approx(out["all"][1], rel=1e-5)
    assert out["auto"][1] == pytest.approx(out["all"][1], rel=1e-5)
    with pytest.raises(ConfigError, match="train.gradient_checkpointing=false recomputes none"):
        load_config("tiny", {"train.checkpoint_layers": 0.5, "train.gradient_checkpointing": False})
    with pytest.raises(ConfigError, match="train.gradient_checkpointing=auto may recompute none"):
        load_config("demo", {"train.checkpoint_layers": 0.5})


def test_gradient_checkpointing_auto_turns_on_when_the_plan_needs_it(tiny_run, tmp_path):
    """gradient_checkpointing=auto on the CPU: off while the memory plan fits the run without it in the budget, on
    when it does not (the budget 1% short of that need); true and false are taken as they are."""
    from edgar_tune.config import TrainConfig
    from tasks import memory
    from tasks.finetune import plan_inputs, resolve_checkpointing

    train_variants(tiny_run, tmp_path, {})  # the tokenize stage, in tmp_path
    tok = tmp_path / "03_tokenize"
    auto = TrainConfig(mode="lora", per_device_train_batch_size=4)
    shape, _, _, kw = plan_inputs(tok, auto, "fp32")
    need = memory.estimate(shape, option="none", **dict(kw, gradient_checkpointing=False)).total
    budgets = {"fits": need / memory.HEADROOM * 1.01, "short": need / memory.HEADROOM * 0.99}
    chosen = {name: resolve_checkpointing(tok, auto.model_copy(update={"memory_budget_gb": gb}), "fp32")
              for name, gb in budgets.items()}  # fmt: skip
    assert chosen["fits"].gradient_checkpointing is False and chosen["short"].gradient_checkpointing is True
    assert resolve_checkpointing(tok, auto, "fp32").gradient_checkpointing is False  # this host's RAM
    for asked in (True, False):
        cfg = auto.model_copy(update={"gradient_checkpointing": asked, "memory_budget_gb": budgets["short"]})
        assert resolve_checkpointing(tok, cfg, "fp32").gradient_checkpointing is asked


def test_memory_fit_splits_the_batch_to_fit_the_budget(tiny_run, tmp_path):
    """train.memory_fit with a budget that the plan says holds 2 blocks without recompute but not 4: the stage
    trains micro-batch 2 x 2 accumulated without checkpointing, the losses of 4 x 1 with every layer recomputed,
    and says what it chose. With no budget that fits, it refuses, naming what to try, or (memory_check=warn) runs at
    micro-batch 1 with every layer recomputed."""
    from edgar_tune.config import ConfigError, EvalConfig, TrainConfig
    from tasks import memory
    from tasks.finetune import fit_memory, plan_inputs, write_train_stage

    train_variants(tiny_run, tmp_path, {})  # the tokenize stage of blocks that span documents, in tmp_path
    tok = tmp_path / "03_tokenize"
    settings = dict(mode="lora", lora_dropout=0.0, max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                    eval_steps=0, early_stopping_patience=0, load_best_model_at_end=False, save_steps=0,
                    gradient_checkpointing=True)  # fmt: skip
    asked = TrainConfig(**settings)
    shape, _, _, kw = plan_inputs(tok, asked, "fp32")
    kw |= dict(option="none", gradient_checkpointing=False)
    need = {b: memory.estimate(shape, **dict(kw, batch=b)).total for b in (2, 4)}
    budget = need[2] / memory.HEADROOM * 1.001
    assert need[4] > budget * memory.HEADROOM

    runs = {}
    for name, extra in {"asked": {}, "fitted": {"memory_fit": True, "memory_budget_gb": budget}}.items():
        write_train_stage(tmp_path / name, tok, TrainConfig(**settings | extra), EvalConfig(max_val_samples=4))
        stats = json.loads((tmp_path / name / "stats.json").read_text())
        runs[name] = stats, [json.loads(x)["loss"] for x in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
    (fitted, fitted_losses), (plain, plain_losses) = runs["fitted"], runs["asked"]
    assert (fitted["per_device_train_batch_size"], fitted["gradient_accumulation_steps"]) == (2, 2)
    assert fitted["checkpointed_layers"] == "none" and plain["checkpointed_layers"] == "all"
    assert fitted["memory_plan"]["fit"]["planned_gb"] == pytest.approx(need[2])
    assert fitted["memory_plan"]["fit"]["budget_from"] == "train.memory_budget_gb"
    assert plain["memory_plan"]["fit"] is None
    assert fitted_losses == pytest.approx(plain_losses, rel=1e-4)

    starved = TrainConfig(**settings | {"memory_fit": True, "memory_budget_gb": need[2] / 100})
    with pytest.raises(ConfigError, match=r"train.memory_fit: nothing fits .* not even micro-batch 1 .*; try "):
        fit_memory(tok, starved, "fp32")
    warned, chosen = fit_memory(tok, starved.model_copy(update={"memory_check": "warn"}), "fp32")
    assert (warned.per_device_train_batch_size, warned.gradient_accumulation_steps) == (1, 4)
    assert warned.gradient_checkpointing and warned.checkpoint_layers == 1.0 and chosen["planned_gb"] is None


def test_attention_kernel_is_what_training_ran_and_flash_attention_is_refused_without_it(tiny_run, tmp_path):
    """train.attention reaches the model (eager attention trains the sdpa losses); flash_attention_2 on a machine
    without a GPU or flash-attn, flex_attention and varlen on the CPU (no backward there, no flash kernel), and
    varlen in fp32, are refused before anything runs."""
    from edgar_tune.config import ConfigError, load_config
    from tasks.finetune import preflight

    out = train_variants(tiny_run, tmp_path, {"sdpa": {}, "eager": {"attention": "eager"}}, steps=3)
    assert [out[k][0]["attention"] for k in ("sdpa", "eager")] == ["sdpa", "eager"]
    assert out["eager"][1] == pytest.approx(out["sdpa"][1], rel=1e-4)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.attention=flash_attention_2 needs a CUDA GPU"):
            preflight(load_config("tiny", {"train.attention": "flash_attention_2"}).train)
        with pytest.raises(ConfigError, match="FlexAttention has no backward on the CPU"):
            preflight(load_config("tiny", {"train.attention": "flex_attention"}).train)
        with pytest.raises(ConfigError, match="train.attention=varlen: it runs PyTorch's flash kernel, which needs a "
                                              "CUDA GPU; set train.attention=sdpa"):  # fmt: skip
            preflight(load_config("tiny", {"train.attention": "varlen"}).train)
    else:
        with pytest.raises(ConfigError, match="train.attention=varlen runs the flash kernel in bf16 or fp16, not fp32"):
            preflight(load_config("tiny", {"train.attention": "varlen", "train.precision": "fp32"}).train)


def test_dataloader_workers_feed_the_same_batches(tiny_run, tmp_path):
    """Batches collated in a worker process (the GPU default) train the losses of the main process's batches."""
    from tasks.finetune import dataloader_workers

    out = train_variants(tiny_run, tmp_path, {"main": {}, "worker": {"dataloader_num_workers": 1}}, steps=4)
    assert out["worker"][0]["dataloader_num_workers"] == 1 and out["main"][0]["dataloader_num_workers"] == 0
    assert out["worker"][1] == pytest.approx(out["main"][1], rel=1e-6)
    assert dataloader_workers(-1) == (2 if torch.cuda.is_available() else 0) and dataloader_workers(3) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's flash kernel needs a CUDA GPU")
def test_varlen_attention_trains_the_sdpa_losses_under_the_document_mask(tiny_run, tmp_path):
    masked = {"document_mask": True}
    out = train_variants(tiny_run, tmp_path, {"sdpa": masked, "varlen": masked | {"attention": "varlen"}}, steps=3)
    assert out["varlen"][0]["attention"] == "varlen"
    assert out["varlen"][1] == pytest.approx(out["sdpa"][1], rel=2e-2)


@pytest.mark.parametrize("scope", ["layers", "model"])
def test_varlen_attention_under_torch_compile_compiles_the_model_once(tmp_path, monkeypatch, scope):
    """`train.attention=varlen` with `train.torch_compile`: batches with different counts of packed documents go
    through the Trainer's loss (tasks.checkpoints) into one compiled model (each layer compiled in place, or the
    whole model), forward and backward, with the losses of sdpa under the document mask. Each batch's document
    bounds are a tensor of their own length, and a recompile of the model is a full compile of forward and backward
    (2.5 minutes for the 7B on a GPU); dynamo raises on any recompile here. On the CPU, which has no flash kernel
    and where training refuses bf16, the per-document sdpa as an opaque custom op
    (tests.test_kernels.varlen_stand_in) stands in for that one call, in a bf16 model."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from kernels import varlen
    from kernels.hf import resolve_backend
    from tasks.checkpoints import trainer_class
    from tasks.finetune import compile_layers
    from tests.test_kernels import varlen_stand_in

    cuda = torch.cuda.is_available()
    if not cuda:
        monkeypatch.setattr(varlen, "available", lambda: None)
        monkeypatch.setattr(varlen, "_KERNEL", varlen_stand_in())
    varlen.register()
    torch._dynamo.reset()  # dynamo's caches outlive a test: of earlier tests' models, in this process
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda" if cuda else "cpu", torch.bfloat16)
    dense = copy.deepcopy(model)  # the same weights, eager, under the dense document mask
    dense.set_attn_implementation("sdpa")
    model.set_attn_implementation("varlen")
    trainer = trainer_class()(model=model, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=not cuda))
    trainer.fused_linear_ce = resolve_backend("auto")
    compiled = torch.compile(model) if scope == "model" else model
    if scope == "layers":
        assert compile_layers(model) == 2
    eos, collate, g = 1, CausalLMCollator(0, 1, ragged=True), torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ends in (0, 2, 5, 1, 3):  # end-of-document tokens in a 3 x 32 batch
            ids = torch.randint(5, 256, (3, 32), generator=g)
            ids.view(-1)[torch.randperm(96, generator=g)[:ends]] = eos
            batch = trainer._prepare_inputs(collate([{"input_ids": row} for row in ids.tolist()]))  # to its device
            assert batch["max_length_q"] == 32
            loss = trainer.compute_loss(compiled, batch)
            loss.backward()
            with torch.no_grad():
                want = dense(**{k: batch[k] for k in ("input_ids", "labels", "position_ids")}).loss
            assert loss.item() == pytest.approx(want.item(), rel=2e-2), ends
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on the CPU")
def test_flex_attention_trains_the_sdpa_losses_under_the_document_mask(tiny_run, tmp_path):
    masked = {"document_mask": True}
    flex = masked | {"attention": "flex_attention"}
    out = train_variants(tiny_run, tmp_path, {"sdpa": masked, "flex": flex}, steps=3)
    assert out["flex"][0]["attention"] == "flex_attention"
    assert out["flex"][1] == pytest.approx(out["sdpa"][1], rel=1e-4)


def test_profile_step_writes_a_trace_and_a_summary_of_that_step(tiny_run, tmp_path):
    """train.profile_step profiles that one optimizer step: profile/ gets a gzipped Chrome trace of the step and a
    summary (wall time, the ops that took the most time; on a GPU the kernels' busy share), also in the stats. A
    step past the run's last is refused before the model loads."""
    import gzip

    from edgar_tune.config import ConfigError
    from tasks.profile import busy_seconds

    out = train_variants(tiny_run, tmp_path, {"plain": {}, "profiled": {"profile_step": 2}}, steps=3)
    stats, losses = out["profiled"]
    assert losses == pytest.approx(out["plain"][1], rel=1e-6) and out["plain"][0]["profile"] is None
    summary = json.loads((tmp_path / "profiled" / "profile" / "summary.json").read_text())
    assert stats["profile"] == summary and summary["step"] == 2 and 0 < summary["wall_s"] < 60
    assert len(summary["top"]) == 15 and summary["top"][0]["self_ms"] >= summary["top"][-1]["self_ms"] > 0
    on_gpu = torch.cuda.is_available()
    assert (summary["device_busy_s"] is not None) == on_gpu and summary["top_by"].startswith("device" if on_gpu
                                                                                          else "self CPU")  # fmt: skip
    assert (summary["device_ms"] is not None) == on_gpu
    trace = json.loads(gzip.decompress((tmp_path / "profiled" / "profile" / "trace.json.gz").read_bytes()))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("linear" in n or "mm" in n for n in names), sorted(names)[:50]
    assert sorted(p.name for p in (tmp_path / "profiled" / "profile").iterdir()) == ["summary.json", "trace.json.gz"]
    assert busy_seconds([(0, 10), (5, 20), (30, 40), (32, 35)]) == pytest.approx(30e-6)
    late = r"train.profile_step=9 but this run trains 3 steps"
    with pytest.raises(ConfigError, match=late):
        train_variants(tiny_run, tmp_path / "late", {"late": {"profile_step": 9}}, steps=3)
    # the train stage and the flow's plan refuse it before any model stage runs; max_train_samples counts
    from edgar_tune.config import TrainConfig
    from tasks.finetune import plan_training

    with pytest.raises(ConfigError, match=late):
        plan_training(tmp_path / "03_tokenize", TrainConfig(max_steps=3, profile_step=9), "fp32")
    few = TrainConfig(max_train_samples=4, per_device_train_batch_size=2, profile_step=3)  # 2 steps an epoch
    with pytest.raises(ConfigError, match=r"train.profile_step=3 but this run trains 2 steps"):
        plan_training(tmp_path / "03_tokenize", few.model_copy(update={"epoch": 1}), "fp32")
    assert plan_training(tmp_path / "03_tokenize", few.model_copy(update={"epoch": 2}), "fp32")[0].profile_step == 3


def test_profile_sorts_a_gpus_kernels_by_what_they_do():
    """On a GPU the profiled step's device time is split by kind of kernel, from the kernels' names (cuBLAS, CUTLASS
    and inductor matmuls; flash and memory-efficient attention, before matmuls: some are CUTLASS kernels too; the
    loss's softmax), and the idle rest; the bench prints it as shares of the step."""
    from tasks.profile import by_kind, kernel_kind, kinds_line

    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k": "matmul",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": "matmul",
        "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::float_e4m3_t>>": "matmul",
        "triton_tem_fused_mm_0": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>, true>": "attention",
        "void cutlass::device_kernel<flash::FlashAttnFwdSm90<cutlass::gemm::GemmShape>>": "attention",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
        "Memcpy HtoD (Pageable -> Device)": "memory",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, Epilogue>": "loss",
        "_ce_rows_kernel": "loss",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "other",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
    }
    assert {n: kernel_kind(n) for n in names} == names
    ms = by_kind([(n, 1000.0) for n in names] + [("nvjet_tst_x", 500.0)])
    assert ms == {"attention": 3.0, "loss": 2.0, "matmul": 4.5, "memory": 1.0, "other": 2.0}
    summary = {"wall_s": 0.02, "device_ms": ms | {"idle": 7.5}}
    assert kinds_line(summary) == "attention 15%, loss 10%, matmul 22%, memory 5%, other 10%, idle 38%"
    assert kinds_line({"wall_s": 1.0, "device_ms": None}) == ""


def test_validation_in_training_that_would_cost_more_than_a_quarter_of_it_is_named_with_the_fix(tiny_run, tmp_path,
                                                                                                caplog):  # fmt: skip
    """All 203 held-out blocks every 2 steps of 16 blocks would take about 6x the training's time: the run says so
    and what to set. train.eval_blocks scores that many of them, evenly spaced over the held-out documents (after
    eval.max_val_samples has taken its first ones), and the warning goes."""
    import logging

    from edgar_tune.config import TrainConfig
    from tasks.finetune import validation_blocks, validation_cost

    runs, _ = tiny_run
    tok = runs / "latest" / "03_tokenize"
    every = validation_blocks(tok, -1)["input_ids"]
    assert validation_blocks(tok, -1, 6)["input_ids"] == [every[i * len(every) // 6] for i in range(6)]
    assert validation_blocks(tok, 50, 5)["input_ids"] == [every[i * 10] for i in range(5)]

    # 1,830 held-out blocks of 2,048 tokens (about 280 MD&As of Amazon's length), 20 steps of 4 x 2 blocks between
    # validations, activations recomputed
    cfg = TrainConfig(eval_steps=20, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      gradient_checkpointing=True)  # fmt: skip
    said = validation_cost(1830, cfg, world=1, steps=1000)
    assert said.startswith("each validation during training scores 1,830 held-out blocks every 20 steps, 11.4x the "
                           "160 blocks those steps train on: about 3.8x their time (a validation forward costs about "
                           "a third of a training step here). train.eval_blocks=48 scores 48 of them"), said
    eight = validation_cost(1830, cfg, world=8, steps=1000)  # 8 processes: 8x the blocks trained, each validates 1/8
    assert eight.startswith("each validation during training scores 1,830 held-out blocks every 20 steps, 1.4x the "
                            "1,280 blocks those steps train on: about 0.5x their time"), eight  # fmt: skip
    assert validation_cost(48, cfg, world=1, steps=1000) is None  # a tenth
    assert "about 2.9x their time (a validation forward costs about a quarter" in validation_cost(
        1830, cfg.model_copy(update={"mode": "full"}), world=1, steps=1000)  # fmt: skip
    assert validation_cost(1830, cfg, world=1, steps=19) is None  # it never validates

    variants = {"all": {"eval_steps": 2, "per_device_train_batch_size": 8},
                "some": {"eval_steps": 2, "per_device_train_batch_size": 8, "eval_blocks": 4}}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tasks.finetune"):
        out = train_variants(tiny_run, tmp_path, variants, steps=4, max_val_samples=-1)
    warned = [r.getMessage() for r in caplog.records if "each validation during training" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"each validation during training scores {len(every)} held-out "
                                                     "blocks every 2 steps"), warned  # fmt: skip
    assert "train.eval_blocks=3 " in warned[0]  # LoRA, nothing recomputed here: a forward is half a step
    assert (out["all"][0]["validation_blocks"], out["some"][0]["validation_blocks"]) == (len(every), 4)
    assert len((tmp_path / "some" / "val_loss.jsonl").read_text().splitlines()) == 2
