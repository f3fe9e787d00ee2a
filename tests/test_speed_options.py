"""The training engine's speed options besides the loss kernel: packing without cross-document attention
(`train.document_mask`) and `train.torch_compile`. Their speed is measured in bench/train_throughput.py; here,
that they compute what they claim."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tasks.finetune import CausalLMCollator, document_positions, steady_step_seconds


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


def test_document_mask_keeps_each_packed_document_to_itself(tiny_run):
    """A block [doc A, eos, doc B]: with restarted position ids, doc B's logits are those of doc B alone."""
    from tasks.blocks import base_model_path
    from tasks.models import load_causal_lm

    runs, _ = tiny_run
    model = load_causal_lm(str(base_model_path(runs / "latest" / "03_tokenize"))).eval()
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


def test_torch_compile_and_document_mask_train_through_the_pipeline_stage(tiny_run, tmp_path):
    """`edgar-tune stage train` with torch.compile (inductor, on the CPU here): same losses as eager, and the
    run records what ran; document_mask=true trains too and is recorded."""
    from tests.conftest import REPO

    runs, _ = tiny_run
    out = {}
    for name, sets in {"eager": [], "compiled": ["train.torch_compile=true"],
                       "masked": ["train.document_mask=true"]}.items():  # fmt: skip
        run = tmp_path / name
        run.mkdir()
        shutil.copy(runs / "latest" / "config.yaml", run / "config.yaml")
        _blocks_that_span_documents(runs / "latest" / "03_tokenize", run / "03_tokenize")
        cmd = [sys.executable, "-m", "edgar_tune.cli", "stage", "train", "--run", str(run), "--set", "max_steps=6",
               "--set", "logging_steps=1"] + [x for s in sets for x in ("--set", s)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        stats = json.loads((run / "04_train" / "stats.json").read_text())
        losses = [json.loads(x)["loss"] for x in (run / "04_train" / "loss.jsonl").read_text().splitlines()]
        out[name] = stats, losses
    assert out["compiled"][0]["torch_compile"] is True and out["eager"][0]["torch_compile"] is False
    assert out["masked"][0]["document_mask"] is True
    assert out["compiled"][1] == pytest.approx(out["eager"][1], rel=2e-3)
    assert out["masked"][1] != pytest.approx(out["eager"][1], rel=1e-4)  # the mask is there: other losses
    assert all(s["tokens_per_s"] > 0 and s["step_seconds"] > 0 for s, _ in out.values())


def test_lora_half_base_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(tiny_run):
    from peft import LoraConfig, get_peft_model

    from edgar_tune.config import TrainConfig
    from tasks.blocks import base_model_path
    from tasks.finetune import _load_model

    runs, _ = tiny_run
    base = str(base_model_path(runs / "latest" / "03_tokenize"))
    for half, want in ((True, torch.bfloat16), (False, torch.float32)):
        model = _load_model(base, TrainConfig(mode="lora", lora_half_base=half), "bf16")
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {want}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    fsdp = TrainConfig(mode="lora", enable_fsdp=True)  # one dtype per flat parameter: fp32 there
    assert _load_model(base, fsdp, "bf16").dtype == torch.float32


def _blocks_that_span_documents(src, dst) -> None:
    """A copy of a tokenize stage keeping only the blocks with an end-of-document inside (most of the tiny run's
    128-token blocks lie inside one Item), so that the document mask has something to mask."""
    from datasets import load_from_disk

    from tasks.blocks import base_model_path
    from tasks.models import load_tokenizer

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train"))
    eos = load_tokenizer(str(base_model_path(src))).eos_token_id
    blocks = load_from_disk(str(src / "train")).filter(lambda row: eos in row["input_ids"][:-1])
    assert len(blocks) >= 8
    blocks.save_to_disk(str(dst / "train"))
    stats = json.loads((dst / "stats.json").read_text())
    (dst / "stats.json").write_text(json.dumps(stats | {"train_blocks": len(blocks)}))
