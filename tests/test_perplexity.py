"""Stage 5: the sliding-window perplexity equals a direct computation, and every token is scored once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgar_tune.config import ModelConfig
from tasks.models import build_tiny_llama, load_causal_lm
from tasks.perplexity import cap_documents, document_nll, windows


@pytest.mark.parametrize(("n", "length", "stride"), [(10, 4, 2), (100, 32, 32), (5, 8, 3), (33, 16, 5), (2, 4, 4)])
def test_windows_score_every_token_once(n, length, stride):
    scored = []
    for begin, end, first in windows(n, length, stride):
        assert end - begin <= length and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = ["Net sales increased 22% to $469.8 billion in 2021. Operating income was $24.9 billion."] * 20
    build_tiny_llama(out, texts, ModelConfig(name="tiny-llama", tiny_vocab_size=300), seed=0)
    return load_causal_lm(str(out)).eval()


def test_loads_on_threads_at_once_keep_each_models_head_tied(tmp_path):
    """transformers builds a model with `PreTrainedModel.tie_weights` swapped for a no-op, process-wide: four loads
    of a tied model on four threads at once left 37 to 40 of 40 models with a random, untied lm_head, and the no-op
    in place for every later load. Loads take turns: each model's head is its embedding, and so is a later one's.
    In a fresh process, where the threads also import transformers' lazy names first (2 of 4 failed with
    "cannot import name 'AutoModelForCausalLM'"), all four load."""
    import subprocess
    import sys
    import threading

    from transformers.modeling_utils import PreTrainedModel

    from tests.conftest import REPO

    out = build_tiny_llama(tmp_path / "model", ["Net sales increased 22%."] * 20,
                           ModelConfig(name="tiny-llama", tiny_vocab_size=300), seed=0)  # fmt: skip
    models = []
    for _ in range(5):
        threads = [threading.Thread(target=lambda: models.append(load_causal_lm(str(out)))) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    models.append(load_causal_lm(str(out)))
    assert len(models) == 21 and PreTrainedModel.tie_weights.__name__ == "tie_weights"
    assert all(m.lm_head.weight is m.model.embed_tokens.weight for m in models)
    fresh = f"""
import threading
from tasks.models import load_causal_lm
loaded, failed = [], []
def load():
    try:
        loaded.append(load_causal_lm({str(out)!r}))
    except Exception as err:
        failed.append(repr(err))
threads = [threading.Thread(target=load) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(loaded), failed, all(m.lm_head.weight is m.model.embed_tokens.weight for m in loaded))
"""
    proc = subprocess.run([sys.executable, "-c", fresh], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "4 [] True", proc.stdout[-2000:]


def test_single_window_equals_direct_cross_entropy(tiny):
    ids = list(range(3, 40))
    nll, count = document_nll(tiny, ids, max_length=64, stride=32, dev="cpu")
    x = torch.tensor([ids])
    with torch.no_grad():
        direct = F.cross_entropy(tiny(input_ids=x).logits[0, :-1], x[0, 1:], reduction="sum").item()
    assert count == len(ids) - 1
    assert nll == pytest.approx(direct, rel=1e-5)


def test_sliding_window_equals_per_token_direct_computation(tiny):
    ids = [int(i) for i in torch.randint(0, 290, (50,), generator=torch.Generator().manual_seed(0))]
    max_length, stride = 16, 6
    nll, count = document_nll(tiny, ids, max_length, stride, dev="cpu")
    # Direct: each token t >= 1 is predicted from the window the method gives it, one forward per token.
    expected = 0.0
    for begin, end, first in windows(len(ids), max_length, stride):
        for t in range(first, end):
            ctx = torch.tensor([ids[begin:t]])
            with torch.no_grad():
                logp = torch.log_softmax(tiny(input_ids=ctx).logits[0, -1].double(), -1)
            expected -= logp[ids[t]].item()
    assert count == len(ids) - 1
    assert nll == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(math.exp(nll / count))


def test_cap_documents_keeps_the_first_tokens():
    assert cap_documents([[1] * 5, [2] * 5], 7) == [[1] * 5, [2] * 2]
    assert cap_documents([[1] * 5], -1) == [[1] * 5]


@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_batched_windows_give_the_same_nll(tiny, batch_size):
    ids = [int(i) for i in torch.randint(0, 290, (90,), generator=torch.Generator().manual_seed(1))]
    one = document_nll(tiny, ids, 16, 6, dev="cpu")
    many = document_nll(tiny, ids, 16, 6, dev="cpu", batch_size=batch_size)
    assert many[1] == one[1] and many[0] == pytest.approx(one[0], rel=1e-5)


def test_instruction_examples_score_only_the_completion(tiny):
    from tasks.perplexity import example_nll

    prompt, completion = list(range(3, 20)), list(range(40, 52))
    ids, labels = prompt + completion, [-100] * len(prompt) + completion
    nll, count = example_nll(tiny, ids, labels, "cpu")
    x = torch.tensor([ids])
    with torch.no_grad():
        per_token = F.cross_entropy(tiny(input_ids=x).logits[0, :-1], x[0, 1:], reduction="none")
    assert count == len(completion)
    assert nll == pytest.approx(per_token[len(prompt) - 1 :].sum().item(), rel=1e-5)


def test_windows_the_model_cannot_score_are_refused_naming_the_key(tiny):
    """A window past the model's context (2048 positions here) scores positions it never saw, without an error on
    RoPE models and with an IndexError on learned ones; a stride longer than the block-length window (eval.max_length
    =-1, known once tokenized) would skip tokens. Both are ConfigErrors: a run says them in one line."""
    from datasets import Dataset

    from edgar_tune.config import ConfigError, EvalConfig
    from tasks.perplexity import evaluate_model

    val = Dataset.from_dict({"input_ids": [list(range(3, 60))]})
    with pytest.raises(ConfigError, match=r"^eval.max_length=4096 is longer than the model's context \(2048 "
                                          r"positions\); set it to 2048 or less, or -1 for the block length$"):
        evaluate_model(tiny, val, EvalConfig(max_length=4096), 64, "base")
    with pytest.raises(ConfigError, match=r"^eval.stride=100 is longer than the window \(64 tokens, the block length"):
        evaluate_model(tiny, val, EvalConfig(stride=100), 64, "base")
    assert evaluate_model(tiny, val, EvalConfig(stride=64), 64, "base")["tokens"] == 56


def test_generation_past_the_context_is_refused(tiny):
    from edgar_tune.config import ConfigError, GenerateConfig
    from tasks.generate import check_length

    with pytest.raises(ConfigError, match=r"^generate.max_length=4096 is longer than the model's context \(2048"):
        check_length(GenerateConfig(max_length=4096), tiny)
    check_length(GenerateConfig(max_length=2048), tiny)


def test_an_instruction_tuned_runs_samples_are_held_out_examples_beside_the_answers_held_out(tiny):
    """A model tuned to answer in a template is sampled on held-out prompts as it will be served them (not on text
    to continue, which it was not tuned for), and the table shows the answer held out beside the two models'."""
    from datasets import Dataset

    from edgar_tune.config import GenerateConfig
    from tasks.generate import generate, held_out_prompts
    from tasks.registry import side_by_side
    from tasks.models import load_tokenizer

    tok = load_tokenizer(tiny.name_or_path)
    prompt = tok("Question: Net sales?\nAnswer:")["input_ids"]
    answer = tok(" up 22%.")["input_ids"] + [tok.eos_token_id]
    ids = [prompt + answer] * 3
    labels = [[-100] * (len(prompt) + len(answer)), [-100] * len(prompt) + answer, [-100] * len(prompt) + answer]
    val = Dataset.from_dict({"input_ids": ids, "labels": labels})
    held = held_out_prompts(val, 1)  # the first example, cut to nothing trained, is passed over
    assert held == [{"ids": prompt, "reference_ids": answer}] and len(held_out_prompts(val, 5)) == 2
    cfg = GenerateConfig(max_new_tokens=5, do_sample=False)
    rows = generate(tiny, tok, held, cfg, "base")
    assert [r["prompt"] for r in rows] == [tok.decode(prompt)] and rows[0]["reference"] == " up 22%."
    assert len(tok(rows[0]["text"], add_special_tokens=False)["input_ids"]) <= 5
    long = [{"ids": (prompt * 2048)[:2046], "reference_ids": answer}]  # 2 positions left of the model's 2048
    assert len(tok(generate(tiny, tok, long, cfg, "base")[0]["text"], add_special_tokens=False)["input_ids"]) <= 2
    table = side_by_side(rows, rows)
    assert list(table) == ["prompt", "sample", "base_model", "fine_tuned", "reference"]
    assert table["reference"] == [" up 22%."]
    assert "reference" not in side_by_side([{"prompt": "p", "sample": 0, "text": "t"}], [])



def test_samples_are_generated_together_and_draw_what_one_at_a_time_drew(tiny):
    """The evaluate stage generates its samples together (`tasks.batching`, as a served version generates), prompts
    of different lengths side by side, and each prompt's first sample draws from `sampling_seed` plus its place as
    one-at-a-time generation did: the texts transformers' own `generate` draws, seeded so."""
    import torch

    from edgar_tune.config import GenerateConfig
    from tasks.generate import generate
    from tasks.models import load_tokenizer

    tok = load_tokenizer(tiny.name_or_path)
    prompts = [{"prompt": p} for p in ("Net sales", "Operating income was $24.9 billion in", "In 2021")]
    cfg = GenerateConfig(max_length=24, do_sample=True, top_k=250, top_p=0.8, sampling_seed=3, num_return_sequences=2)
    rows = generate(tiny, tok, prompts, cfg, "base")
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p["prompt"], n) for p in prompts for n in (0, 1)]
    for i, item in enumerate(prompts):
        ids = tok(item["prompt"], return_tensors="pt")["input_ids"]
        torch.manual_seed(3 + i)
        out = tiny.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24 - ids.shape[1],
                            do_sample=True, top_k=250, top_p=0.8, pad_token_id=tok.pad_token_id)  # fmt: skip
        assert rows[2 * i]["text"] == tok.decode(out[0][ids.shape[1] :], skip_special_tokens=True), item

def test_held_out_samples_and_chat_answers_stop_where_the_templates_assistant_turn_ends(tiny):
    """A model tuned on conversations ends its answer with its chat template's end of turn (`<|im_end|>`), which
    need not be its EOS (a base model's is often `<|endoftext|>`): before, generation went on past it and the model
    wrote the next turn itself (the SmolLM2 chat version with its base's EOS answered `... driven by North
    America.\\nsystem\\n\\nuser\\nI'm planning to launch a new product, a smart`). It stops there now, whether the
    turn's end is one token (one more EOS id) or several (a stop string)."""
    import torch

    from edgar_tune.config import GenerateConfig
    from tasks.generate import generate, stop_at, turn_end
    from tasks.models import load_tokenizer
    from tests.test_textdata import CHATML

    tok = load_tokenizer(tiny.name_or_path)
    assert turn_end(tok) is None  # no chat template: nothing more to stop at
    tok.chat_template = CHATML
    assert turn_end(tok) == "<|im_end|>"
    tok.chat_template = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
                         "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                         "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")  # Llama 3's
    assert turn_end(tok) == "<|eot_id|>"
    prompt = tok("Net sales increased")["input_ids"]
    with torch.no_grad():
        free = tiny.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                             pad_token_id=tok.pad_token_id)[0][len(prompt) :].tolist()  # fmt: skip
    text = tok.decode(free, skip_special_tokens=True)
    pieces = {n: tok.decode(free[4 : 4 + n]).strip() for n in (1, 2)}  # a turn that ends in one token, or two
    cfg = GenerateConfig(max_new_tokens=12, do_sample=False)
    for n, closing in pieces.items():
        assert closing and len(tok.encode(closing, add_special_tokens=False)) == n, (n, closing)
        tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}" + closing
                             + "{% endif %}{% endfor %}")  # fmt: skip
        assert turn_end(tok) == closing
        assert set(stop_at(closing, tok, tiny)) == ({"eos_token_id"} if n == 1 else {"stop_strings", "tokenizer"})
        assert stop_at(closing, tok, tiny, ["Q:"])["stop_strings"] == (["Q:"] if n == 1 else [closing, "Q:"])
        said = generate(tiny, tok, [{"ids": prompt, "reference_ids": prompt[:1]}], cfg, "base")[0]["text"]
        assert said == text.split(closing, 1)[0] and len(said) < len(text), (closing, said, text)
        # A merged export's generation_config.json stops there too, where the turn ends in one token
        from tasks.export import stop_at_turn_end

        eos = tiny.generation_config.eos_token_id
        try:
            assert stop_at_turn_end(tiny, tok, turn_end(tok)) is (n == 1)
            assert tiny.generation_config.eos_token_id == (
                [*([eos] if isinstance(eos, int) else eos), *tok.encode(closing, add_special_tokens=False)]
                if n == 1 else eos)  # fmt: skip
        finally:
            tiny.generation_config.eos_token_id = eos
