"""What one transformer layer keeps for backward under LoRA: peft's adapters against `train.lean_lora`.

    python bench/saved_activations.py                 # Llama-2-7B's widths, eager and compiled (about 3 min on a CPU)
    python bench/saved_activations.py --no-compile --tokens 64

A 2-layer Llama at Llama-2-7B's widths (hidden 4096, MLP 11008, 32 heads) with a bf16 base and fp32 LoRA adapters
(r=8, dropout 0.05, on q_proj and v_proj, JumpStart's targets) under bf16 autocast, as the Trainer trains it with
`train.lora_half_base`. Forwards run under saved-tensor hooks, which count the distinct storages that autograd
keeps for layer 1's backward
(neither parameters nor what an earlier layer kept already, such as RoPE's cos and sin). The memory plan's count
(`tasks.memory.lora_layer_bytes`) is printed beside each. Bytes per token per hidden unit do not depend on the
sequence length or on the device, except eager PyTorch's dropout mask: fp32 on the CPU, bool on CUDA.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import write_result  # noqa: E402
from bench.gpu_engine import SHAPES  # noqa: E402


def saved_bytes_per_token(config, targets: list[str], *, r: int, dropout: float, lean: bool, tokens: int,
                          compile: bool = False, dora: bool = False) -> tuple[float, object]:  # fmt: skip
    """Bytes per token that autograd keeps for layer 1 of a bf16 LoRA Llama with fp32 adapters under bf16 autocast
    (as the Trainer trains it), and the model's `tasks.memory.ModelShape` for the plan. Measured at `tokens` and
    twice as many: the difference leaves out what does not grow with the tokens (autocast's bf16 copies of the
    adapters' weights, lean_lora's seeds, DoRA's weights). `dora`: DoRA's adapters (peft's use_dora)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from kernels.lora import lean_lora
    from tasks.memory import model_shape

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16),
                           LoraConfig(r=r, lora_dropout=dropout, target_modules=targets, use_dora=dora))  # fmt: skip
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters on a bf16 base, as train.lora_half_base loads them
    if lean:
        lean_lora(model)
    model.train()
    layers = model.get_base_model().model.layers
    if compile:  # the layers' forward compiled, their hooks below left outside the compiled code
        for layer in layers:
            layer.forward = torch.compile(layer.forward, dynamic=False)
    where = ["outside"]
    layers[1].register_forward_pre_hook(lambda *_: where.__setitem__(0, "layer"))
    layers[1].register_forward_hook(lambda *_: where.__setitem__(0, "outside"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # `before` and `kept`: the current count's, below
        # Both hold the tensor: a storage freed within forward (DoRA's weight's graph) would otherwise be reused by
        # a later tensor, which the count then takes for the freed one.
        if where[0] == "layer" and storage.data_ptr() not in before:
            kept[storage.data_ptr()] = storage.nbytes(), t
        elif where[0] == "outside":
            before[storage.data_ptr()] = t
        return t

    totals = []
    for n in (tokens, 2 * tokens):
        before = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
        where[0], kept = "outside", {}
        ids = torch.randint(0, config.vocab_size, (1, n))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        totals.append(sum(nbytes for nbytes, _ in kept.values()))
        del loss  # frees what was kept before the next count
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        shape = model_shape(folder, "lora", r, targets, dora=dora)
    return (totals[1] - totals[0]) / tokens, shape


def main() -> None:
    from transformers import LlamaConfig

    from tasks.memory import lora_layer_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    config = LlamaConfig(**SHAPES["llama-2-7b"] | {"num_hidden_layers": 2}, attn_implementation="sdpa")
    device = "cpu"  # the hooks count what is kept, which is the same on a GPU but for eager dropout masks
    rows = []
    for compiled in (False,) if args.no_compile else (False, True):
        for lean in (False, True):
            measured, shape = saved_bytes_per_token(config, ["q_proj", "v_proj"], r=8, dropout=0.05, lean=lean,
                                                    tokens=args.tokens, compile=compiled)  # fmt: skip
            planned = lora_layer_bytes(shape, act_bytes=2, compiled=compiled, lean=lean, dropout=0.05,
                                       mask_bytes=1 if compiled else 4, matmul_bytes=2, cast=True)  # fmt: skip
            rows.append({"adapters": "lean_lora" if lean else "peft", "compiled": compiled, "tokens": args.tokens,
                         "bytes_per_token_per_hidden": measured / shape.hidden,
                         "planned_bytes_per_token_per_hidden": planned / shape.hidden,
                         "layer_gb_at_4x2048": measured * 4 * 2048 / 1e9})  # fmt: skip
    record = {"device": device, "torch": torch.__version__, "model": "llama-2-7b widths, 2 layers",
              "lora": {"r": 8, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}, "rows": rows}  # fmt: skip
    write_result(args.out, "saved-activations", device, record)
    print(f"\n{'adapters':<10} {'mode':<9} {'bytes/token/hidden':>18} {'plan':>7} {'GB per layer at 4x2048':>23}")
    for row in rows:
        print(f"{row['adapters']:<10} {'compiled' if row['compiled'] else 'eager':<9} "
              f"{row['bytes_per_token_per_hidden']:>18.2f} {row['planned_bytes_per_token_per_hidden']:>7.2f} "
              f"{row['layer_gb_at_4x2048']:>23.2f}")  # fmt: skip
    for compiled in sorted({r["compiled"] for r in rows}):
        peft, lean = (next(r for r in rows if r["compiled"] == compiled and r["adapters"] == a)
                      for a in ("peft", "lean_lora"))  # fmt: skip
        print(f"lean_lora / peft, {'compiled' if compiled else 'eager'}: "
              f"{lean['bytes_per_token_per_hidden'] / peft['bytes_per_token_per_hidden']:.2f}x")


if __name__ == "__main__":
    main()
