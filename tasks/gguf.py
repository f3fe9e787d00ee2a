"""A merged model as one GGUF file, the format llama.cpp, Ollama and LM Studio run: `edgar-tune export --gguf TYPE`.

It writes what llama.cpp's own converter (`convert_hf_to_gguf.py`) writes for the models edgar-tune trains, with
the `gguf` package of the same project (a dependency already: transformers reads GGUF with it): the llama
architecture's tensors under llama.cpp's names (the query and key projections permuted from transformers' rotate-half
layout to llama.cpp's interleaved one), the hyperparameters llama.cpp reads, and the tokenizer. A byte-level BPE
tokenizer (SmolLM2's, Llama-3's, GPT-2's) goes in with its merges and the name of the pre-tokenizer llama.cpp must
split text with before them; on SmolLM2 the tensors and the tokenizer are those llama.cpp's converter writes, to
the byte, for f32, f16, bf16 and q8_0. A SentencePiece-style one (Llama-2's, Mistral's) goes in as llama.cpp's
SentencePiece tokenizer: pieces, types and scores. llama.cpp's converter reads those scores from tokenizer.model,
which transformers 5 does not save (nor does a run, nor an export), and without it writes -1000 for every piece, so
llama.cpp splits 10-K text differently from the tokenizer the model was trained with; here the scores are read off
the merges in tokenizer.json (`spm_scores`), and llama.cpp splits it as transformers does. tests/test_serving.py
checks both against llama.cpp where a llama.cpp checkout is built; the README's quick start has the figures.

What it does not know it refuses before writing anything, naming the way that works: another architecture, rope
scaling, biases in the projections, a tokenizer that is neither kind, a split it cannot name, or merges that are
not a SentencePiece model's: export merged (without --gguf) and run llama.cpp's converter on that folder. Tensors
are converted and written one at a time, so the file is never held in memory.

`write_lora_gguf` writes a peft LoRA adapter alone as a GGUF adapter (`export --adapter --gguf TYPE`), what
llama.cpp's convert_lora_to_gguf.py writes, for llama.cpp (`--lora`) and Ollama (`ADAPTER`) to apply to a GGUF of the
base.
"""

from __future__ import annotations

import json
import logging
import math
from hashlib import sha256
from pathlib import Path

import numpy as np

from edgar_tune.config import ConfigError

log = logging.getLogger(__name__)
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # "This GGUF file is for Little Endian only", ...
# Llama-2's tokenizer.json puts <s> between the texts of a pair; gguf reads pairs for encoders' separators only
logging.getLogger("gguf.vocab").addFilter(lambda record: "TemplateProcessing<pair>" not in record.getMessage())

TYPES = ("f32", "f16", "bf16", "q8_0")
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 and an f16 scale a block
# transformers' model_type: llama.cpp's LLM_ARCH_LLAMA (SmolLM2, tiny-llama, Llama-2, Llama-3; Mistral's tensors
# are Llama's, and llama.cpp's converter writes them so)
ARCHITECTURES = ("llama", "mistral")

# llama.cpp names the pre-tokenizer of a BPE vocabulary by the sha256 of the ids its tokenizer gives this text
# (convert_hf_to_gguf.py's get_vocab_base_pre, llama.cpp 0c1e570); these are its rows for llama-architecture models.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
              'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 '
              '?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s '
              'there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')  # fmt: skip
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


WAY = "export it merged (without --gguf) and convert that folder with llama.cpp's convert_hf_to_gguf.py"
SPACE = "\u2581"  # SentencePiece's stand-in for a space


def check_model(config) -> None:
    """Refuse, before anything is merged or written, a model whose GGUF this writer would get wrong.

    Raises:
        ConfigError: another architecture, rope scaling, or biases in the attention or MLP projections.
    """
    if config.model_type not in ARCHITECTURES:
        raise ConfigError(f"--gguf writes the llama architecture (SmolLM2, Llama-2, Llama-3, Mistral, tiny-llama); "
                          f"this model is {config.model_type!r}: {WAY}")  # fmt: skip
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"--gguf: this model's rope scaling ({rope['rope_type']}) needs tensors this writer does "
                          f"not make: {WAY}")  # fmt: skip
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError(f"--gguf: this model has biases in its projections, which this writer does not map: {WAY}")


def _rope(config) -> dict:
    """The rope parameters, as transformers 5 holds them (`rope_parameters`) or as before (`rope_theta`, ...)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None))
    return rope


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half query/key rows to llama.cpp's interleaved pairs (LlamaModel.permute)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2)
            .reshape(weights.shape))  # fmt: skip


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens such as <|im_start|> are control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))  # fmt: skip


def pre_tokenizer(tokenizer, folder: Path) -> str:
    """llama.cpp's name for how `tokenizer` (saved in `folder`) splits text before its merges: by llama.cpp's hash
    of its ids on CHECK_TEXT, else by its tokenizer.json (`_split_named`); `default` for a SentencePiece-style
    tokenizer (Llama-2's, Mistral's), whose merges are checked to be SentencePiece's (`spm_scores`).

    Raises:
        ConfigError: no tokenizer.json, neither byte-level BPE nor SentencePiece-style BPE, or a split or merges
            this writer cannot carry over.
    """
    tokenizer_json = _tokenizer_json(folder)
    if space_prefix(tokenizer_json) is not None:
        spm_scores(tokenizer_json["model"])
        return "default"
    model = tokenizer_json.get("model", {})
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or tokenizer_json.get("normalizer"):
        raise ConfigError(f"--gguf writes byte-level BPE tokenizers (SmolLM2's, Llama-3's, GPT-2's) and "
                          f"SentencePiece-style BPE ones (Llama-2's, Mistral's); this one is {model.get('type')}"
                          f"{' with byte fallback' if model.get('byte_fallback') else ''}"
                          f"{' with a normalizer' if tokenizer_json.get('normalizer') else ''}"
                          f" (pre-tokenizer {json.dumps(pre)[:120]}): {WAY}")  # fmt: skip
    ids = tokenizer.encode(CHECK_TEXT)
    if name := PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest()):
        return name
    if name := _split_named(pre):
        return name
    raise ConfigError(f"--gguf: llama.cpp would not know how to split text for this tokenizer (its pre-tokenizer: "
                      f"{json.dumps(pre)[:200]}): {WAY}")  # fmt: skip


def _tokenizer_json(folder: Path) -> dict:
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"--gguf reads the tokenizer's tokenizer.json, and {folder} has none (a slow tokenizer "
                          f"only): {WAY}")  # fmt: skip
    return json.loads((folder / "tokenizer.json").read_text())


def space_prefix(tokenizer_json: dict) -> bool | None:
    """Whether a SentencePiece-style tokenizer puts `▁` before the text (llama.cpp's `add_space_prefix`); None for
    a tokenizer that is not one. SentencePiece-style: BPE over `▁`-for-space text with byte fallback, the spaces
    replaced by transformers' Metaspace (transformers 5 saves Llama-2's and Mistral's so) or by the normalizer of
    older tokenizer.json files (Prepend `▁`, Replace ` ` by `▁`), and no other split."""
    model, pre, norm = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer"), tokenizer_json.get(
        "normalizer")  # fmt: skip
    if model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("ignore_merges"):
        return None
    if (norm is None and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE
            and not pre.get("split", True)):  # fmt: skip
        return pre.get("prepend_scheme", "always") != "never"
    steps = (norm or {}).get("normalizers", [norm]) if (norm or {}).get("type") == "Sequence" else [norm]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if pre is None and steps and steps[-1] == replace:
        if steps[:-1] == [{"type": "Prepend", "prepend": SPACE}]:
            return True
        if not steps[:-1]:
            return False
    return None


def spm_scores(model: dict) -> dict[str, float]:
    """A score for each piece a merge makes, for llama.cpp's SentencePiece tokenizer: minus the rank of the first
    merge that makes it.

    llama.cpp's SentencePiece tokenizer merges, of the adjacent pairs whose concatenation is a piece of the
    vocabulary, the one whose piece scores highest (the leftmost of equals); transformers' BPE merges the pair its
    merges rank first. They split text alike when every split of a piece into two pieces of the vocabulary is among
    the merges, ranked as the pieces they make: transformers writes them so when it converts a SentencePiece model
    (Llama-2's and Mistral's tokenizer.json files were made so), in the order of the pieces' scores or of their ids,
    the same order in a SentencePiece BPE model but for Llama-2's runs of spaces, all scored -1e9. Those split alike
    either way: 200 texts of 10-K words between runs of up to 40 spaces, tabs and newlines (the README has it).

    Raises:
        ConfigError: merges of another kind (learned by a BPE trainer, not converted from SentencePiece), naming the
            first split of a piece that is not among them.
    """
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    scores, known = {}, set(merges)
    for rank, (a, b) in enumerate(merges):
        scores.setdefault(a + b, float(-rank))
    missing = next(((p[:i], p[i:]) for p in vocab for i in range(1, len(p))
                    if p[:i] in vocab and p[i:] in vocab and (p[:i], p[i:]) not in known), None)  # fmt: skip
    if missing:
        piece = missing[0] + missing[1]
        raise ConfigError(f"--gguf: this tokenizer's merges are not a SentencePiece model's ({piece!r} is in its "
                          f"vocabulary, the merge {missing} is not), so llama.cpp's SentencePiece tokenizer would "
                          f"split text differently: {WAY}")  # fmt: skip
    return scores


# Llama-3's split, as its tokenizer.json has it (llama.cpp's `llama-bpe` runs its own adaptation of it)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip


def _split_named(pre: dict) -> str | None:
    """llama.cpp's name for a pre-tokenizer read off tokenizer.json, for a tokenizer whose hash it does not know (a
    tokenizer trained for a run, or one rebuilt from a GGUF): GPT-2's byte-level split alone is `gpt-2`; Llama-3's
    split before a byte-level mapping without its own split is `llama-bpe`."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2:
        split, byte_level = steps
        if (split.get("type") == "Split" and split.get("pattern", {}).get("Regex") == LLAMA3_SPLIT
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)):  # fmt: skip
            return "llama-bpe"
    return None


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token and llama.cpp's type for it (convert_hf_to_gguf.py's get_vocab_base)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp takes added tokens as normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def spm_vocabulary(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Every id's piece, score and llama.cpp type for a SentencePiece-style tokenizer, as convert_hf_to_gguf.py's
    _create_vocab_sentencepiece gives them from a tokenizer.model and tokenizer_config.json (byte pieces `<0xNN>`,
    the unknown piece, added tokens as control or user-defined at -1000, ids past the vocabulary `[PADn]`), the
    scores from the merges (`spm_scores`) where it reads tokenizer.model's."""
    import gguf

    scores = spm_scores(tokenizer_json["model"])
    unknown = tokenizer_json["model"].get("unk_token")
    reverse = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    rows = []  # (piece, score, type)
    for i in range(vocab_size):
        if i in added:
            token = added[i]["content"]
            if added[i]["special"] or _looks_special(token):
                rows.append((token, -1000.0, gguf.TokenType.CONTROL))
            else:  # pre-normalized, as llama.cpp's converter writes it
                rows.append((token.replace(SPACE, " "), -1000.0, gguf.TokenType.USER_DEFINED))
        elif i not in reverse:
            rows.append((f"[PAD{i}]", -10000.0, gguf.TokenType.UNUSED))
        else:
            token = reverse[i]
            byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            kind = gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL
            rows.append((token, scores.get(token, 0.0), gguf.TokenType.UNKNOWN if token == unknown else kind))
    tokens, scores, types = (list(column) for column in zip(*rows, strict=True))
    return tokens, scores, types


def _qtype(name: str, shape: tuple[int, ...], wanted):
    """The GGML type a tensor is written in: norms and vectors in f32 (llama.cpp reads them so), a q8_0 matrix
    whose rows are not whole blocks of 32 in f16, as llama.cpp's converter falls back."""
    import gguf

    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        return gguf.GGMLQuantizationType.F16
    return wanted


def write_gguf(model, tokenizer_dir: Path, path: Path, gguf_type: str, metadata: dict) -> dict:
    """Write `model` (a merged transformers causal LM of the llama architecture) and the tokenizer saved in
    `tokenizer_dir` into the GGUF file `path`, its matrices in `gguf_type` (f32, f16, bf16 or q8_0). `metadata`:
    `name` and `tags` (general.*), then keys written as `edgar_tune.KEY` (provenance; llama.cpp passes over them).
    Returns the file's tensor count, size and parameter count, and the pre-tokenizer it names.

    Raises:
        ConfigError: see `check_model` and `pre_tokenizer`.
    """
    import gguf
    import torch
    from transformers import AutoTokenizer

    config = model.config
    check_model(config)
    if (window := getattr(config, "sliding_window", None)) and window < config.max_position_embeddings:
        log.warning("this model attends over the last %d tokens only (a sliding window, as Mistral-7B-v0.1's); a "
                    "GGUF file has no place for it (llama.cpp's converter leaves it out too), so llama.cpp attends "
                    "over the whole context: the same outputs up to %d tokens of context, not past them", window,
                    window)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pre = pre_tokenizer(tokenizer, tokenizer_dir)
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]  # F32, F16, BF16, Q8_0
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]  # fmt: skip

    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reads the token embedding for it, as save_pretrained drops it
    plan = []  # (gguf name, hf name, shape, type): every tensor's header comes before any tensor's data
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"--gguf: the tensor {hf_name} has no name in llama.cpp's llama architecture: export "
                              "it merged (without --gguf) and convert that folder with llama.cpp's "
                              "convert_hf_to_gguf.py")  # fmt: skip
        plan.append((name, hf_name, tuple(tensor.shape), _qtype(name, tuple(tensor.shape), wanted)))

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    params = sum(math.prod(shape) for _, _, shape, _ in plan)
    writer.add_type(gguf.GGUFType.MODEL)
    _add_metadata(writer, metadata, path)
    writer.add_size_label(gguf.size_label(params, 0, 0, 0))
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokenizer_json = _tokenizer_json(tokenizer_dir)
    prefix = space_prefix(tokenizer_json)
    if prefix is None:  # byte-level BPE: the merges go in the file, the split is named
        tokens, types = vocabulary(tokenizer, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
    else:  # SentencePiece-style: llama.cpp's own tokenizer for it, pieces scored
        tokens, scores, types = spm_vocabulary(tokenizer_json, config.vocab_size)
        writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if prefix is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if prefix is not None:
        writer.add_add_space_prefix(prefix)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=prefix is None, n_vocab=config.vocab_size)
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around text, said outright: llama.cpp's defaults
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)

    def data(name: str, hf_name: str):
        tensor = state[hf_name].detach()
        array = tensor.to(torch.float32 if tensor.dtype != torch.float16 else torch.float16).cpu().numpy()
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            return _permute(array, heads)
        return _permute(array, kv_heads) if name.endswith(("attn_k.weight", "attn_k.bias")) else array

    _write_tensors(writer, [(name, shape, qtype, lambda n=name, h=hf: data(n, h), state[hf].element_size())
                            for name, hf, shape, qtype in plan], f"write GGUF ({gguf_type})")  # fmt: skip
    return {"tensors": len(plan), "bytes": path.stat().st_size, "pre_tokenizer": pre, "parameters": params,
            "tokenizer": "gpt2" if prefix is None else "llama"}


def _add_metadata(writer, metadata: dict, path: Path) -> None:
    """general.name and general.tags, general.base_model.0.* for `base_model` (its last path part, and
    `base_model_repo_url` where it is a hub id, as llama.cpp's converters write them), then the other keys as
    `edgar_tune.KEY` (provenance; llama.cpp passes over them)."""
    writer.add_name(str(metadata.get("name", path.stem)))
    writer.add_tags(list(metadata.get("tags", ["edgar-tune", "text-generation"])))
    if metadata.get("base_model"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, Path(metadata["base_model"]).name)
        if metadata.get("base_model_repo_url"):
            writer.add_base_model_repo_url(0, metadata["base_model_repo_url"])
    for key, value in metadata.items():
        if key not in ("name", "tags", "base_model_repo_url") and value is not None:
            (writer.add_float32 if isinstance(value, float) else writer.add_string)(f"edgar_tune.{key}", value)


def _write_tensors(writer, tensors: list, what: str) -> None:
    """Every tensor's header, then each tensor's data as `make()` returns it (float32 or float16, in llama.cpp's
    layout), converted to its type one at a time, under a progress bar over the bytes read (`itemsize` each);
    closes the file. `tensors`: (name, shape, GGML type, make, itemsize)."""
    import gguf

    from tasks.progress import Progress

    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    for name, shape, qtype, *_ in tensors:  # as gguf.quants.quantize returns them: floats, or the bytes of blocks
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        stored = shape if qtype in floats else gguf.quant_shape_to_byte_shape(shape, qtype)
        nbytes = math.prod(shape) // block * type_size
        writer.add_tensor_info(name, stored, np.dtype(floats.get(qtype, np.uint8)), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(math.prod(shape) * itemsize for _, shape, _, _, itemsize in tensors)
    bar, done = Progress(what, total >> 20, "MB", logger=log, quiet_s=10), 0
    for _, shape, qtype, make, itemsize in tensors:
        writer.write_tensor_data(gguf.quants.quantize(make(), qtype))
        done += math.prod(shape) * itemsize
        bar.update(done >> 20)
    bar.close()
    writer.close()


def write_lora_gguf(adapter_dir: Path, config, path: Path, gguf_type: str, metadata: dict) -> dict:
    """Write the peft LoRA adapter saved in `adapter_dir` (of a base whose transformers config is `config`) as a
    GGUF adapter, what llama.cpp's convert_lora_to_gguf.py writes: each adapted projection's A and B under the
    base tensor's llama.cpp name (`blk.0.attn_q.weight.lora_a`, `.lora_b`), B of the query and key projections
    permuted as their weights are, and the adapter's alpha (llama.cpp scales B·A by alpha / r, as peft does).
    llama.cpp applies it to any GGUF of that base (`llama-server -m BASE.gguf --lora FILE`, Ollama's `ADAPTER`).
    Returns the file's tensor count, size and the adapter's rank and alpha.

    Raises:
        ConfigError: see `check_model`; or an adapter llama.cpp cannot apply as trained: DoRA, per-module alphas,
            rsLoRA with per-module ranks, biases, whole modules or token rows saved beside it, or a tensor that is not a
            projection's A or B.
    """
    import gguf
    import torch
    from safetensors import safe_open

    check_model(config)
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    refused = [why for why, bad in (
        ("DoRA's magnitudes", lora.get("use_dora")), ("per-module alphas", lora.get("alpha_pattern")),
        ("biases", lora.get("bias", "none") != "none" or lora.get("lora_bias")),
        (f"whole modules saved beside it ({lora.get('modules_to_save')})", lora.get("modules_to_save")),
        ("token rows trained beside it (train.trainable_tokens)", lora.get("trainable_token_indices")),
        (f"a {lora.get('peft_type')} adapter, not LoRA", lora.get("peft_type", "LORA") != "LORA"),
        ("rsLoRA's scale with per-module ranks", lora.get("use_rslora") and lora.get("rank_pattern")),
    ) if bad]  # fmt: skip
    if refused:
        raise ConfigError(f"--gguf: llama.cpp applies plain LoRA; this adapter has {', '.join(refused)}: export it "
                          f"merged (drop --adapter) for one GGUF file")  # fmt: skip
    # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r: the alpha written makes the two the same
    alpha = float(lora["lora_alpha"]) * (math.sqrt(lora["r"]) if lora.get("use_rslora") else 1.0)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]  # F32, F16, BF16, Q8_0
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as weights:
        plan = []  # (gguf name, shape, type, make, itemsize)
        for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
            module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            known = part in ("A.weight", "B.weight")
            name = names.get_name(module + ".weight", try_suffixes=(".weight",)) if known else None
            if name is None:
                raise ConfigError(f"--gguf: the adapter's tensor {key} is not a LoRA A or B of a projection llama.cpp "
                                  "knows: export it merged (drop --adapter) for one GGUF file")  # fmt: skip
            suffix = ".lora_a" if part == "A.weight" else ".lora_b"
            shape = tuple(weights.get_slice(key).get_shape())
            rows = heads if name.endswith("attn_q.weight") else kv_heads if name.endswith("attn_k.weight") else None

            def make(key=key, rows=rows if suffix == ".lora_b" else None):
                array = weights.get_tensor(key).to(torch.float32).numpy()
                return _permute(array, rows) if rows else array

            itemsize = {"F32": 4, "F16": 2, "BF16": 2}.get(weights.get_slice(key).get_dtype(), 4)
            plan.append((name + suffix, shape, _qtype(name + suffix, shape, wanted), make, itemsize))
        ranks = {shape[0] for name, shape, *_ in plan if name.endswith(".lora_a")}
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        _add_metadata(writer, metadata, path)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tensors(writer, plan, f"write GGUF adapter ({gguf_type})")
    return {"tensors": len(plan), "bytes": path.stat().st_size, "rank": max(ranks), "alpha": alpha}
