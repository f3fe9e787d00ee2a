"""The training engine's speed options besides the loss kernel: packing without cross-document attention
(`train.document_mask`) and `train.torch_compile`. Their speed is measured in bench/train_throughput.py; here,
that they compute what they claim."""

from __future__ import annotations

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


def test_document_mask_reaches_the_model_in_training(tiny_run, tmp_path):
    """document_mask=true changes the training losses (no token sees the previous document), and the run records
    it and its steady-state speed."""
    out = train_variants(tiny_run, tmp_path, {"eager": {}, "masked": {"document_mask": True}})
    assert out["masked"][0]["document_mask"] is True and out["eager"][0]["document_mask"] is False
    assert out["masked"][1] != pytest.approx(out["eager"][1], rel=1e-4)
    assert all(s["tokens_per_s"] > 0 and s["step_seconds"] > 0 for s, _ in out.values())


@pytest.mark.slow  # inductor compiles for about 40 s on this CPU
def test_torch_compile_trains_the_eager_losses(tiny_run, tmp_path):
    out = train_variants(tiny_run, tmp_path, {"eager": {}, "compiled": {"torch_compile": True}})
    assert out["compiled"][0]["torch_compile"] is True and out["eager"][0]["torch_compile"] is False
    assert out["compiled"][1] == pytest.approx(out["eager"][1], rel=2e-3)
