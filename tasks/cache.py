"""Stage cache keys: what a stage reads (its config, the artifacts of the stages before it) and its code version.

A stage's key is the sha256 of
- the part of the config it reads (`STAGE_CONFIG`; the task receives exactly that view, nothing more),
- the content of the stage folders it reads (`READS`; each file's sha256, remembered by `FileDigests`),
- its code version: the source of its modules (`CODE`) and the versions of the libraries that compute it,
- the run's name (`RunFolder.keyed_as`: an s3:// run's URL, a local run's first path, which a moved folder keeps).

Prefect persists each stage's result under its key, so a second run with the same inputs is `Cached` without
executing. A record alone is not enough to skip a stage: the run folder must still hold the outputs that the
record describes. After a stage runs, its key is stamped into the run folder (`.stages/STAGE.json`), with the
config and the folder digests it read; a stage whose stamp is missing, stale (another run wrote the folder since)
or whose outputs are gone is recomputed, and a registration refuses outputs whose stamps no longer match the run's
config.yaml and folders (`made_otherwise`).
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import cache
from importlib import metadata
from pathlib import Path

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from edgar_tune.config import (REPO_ROOT, TINY, TRAINING_EVAL_KEYS, ConfigError, PipelineConfig, flat_params,
                               load_run_config)  # fmt: skip
from tasks.io import (DOWNLOAD, EVALUATE, PARSE, REGISTER, TOKENIZE, TRAIN, atomic_write_json, joined, litter,
                      read_json, sha256_file)  # fmt: skip

# The stages in order, with the stages each one needs (its upstream).
STAGES = ("download", "parse", "tokenize", "evaluate-base", "train", "evaluate", "register")
NEEDS = {
    "download": (),
    "parse": ("download",),
    "tokenize": ("parse",),
    "evaluate-base": ("tokenize",),
    "train": ("tokenize",),
    "evaluate": ("tokenize", "train"),
    "register": ("parse", "tokenize", "train", "evaluate-base", "evaluate"),
}
# Tokenize's account of the data, which only the registration reads (it logs them): a rewording of a report (a
# parse warning, a reason) leaves the blocks as they were, and must not train or score them again.
REPORTS = ("data_report.json", "data_report.md")
_BLOCKS = f"{TOKENIZE} less its reports"
PARTS = {_BLOCKS: (TOKENIZE, REPORTS)}  # a name in READS that is a folder less some files: (folder, files left)
# The stage folders whose content goes into the key.
READS = {
    "download": (),
    "parse": (DOWNLOAD,),
    "tokenize": (PARSE,),
    "evaluate-base": (DOWNLOAD, _BLOCKS),  # the manifest names the companies the samples ask about
    "train": (_BLOCKS,),
    "evaluate": (DOWNLOAD, _BLOCKS, TRAIN),
    "register": (PARSE, TOKENIZE, TRAIN, EVALUATE),
}
# What they read in keys made before 2026-12-04 (whole folders): a stage stamped then stands as it was (`decide`).
READ_BEFORE = {"evaluate-base": (DOWNLOAD, TOKENIZE), "train": (TOKENIZE,), "evaluate": (DOWNLOAD, TOKENIZE, TRAIN)}
# What must still be in the run folder for a cached result to stand.
OUTPUTS = {
    "download": f"{DOWNLOAD}/manifest.json",
    "parse": f"{PARSE}/report.json",
    "tokenize": f"{TOKENIZE}/stats.json",
    "evaluate-base": f"{EVALUATE}/base.json",
    "train": f"{TRAIN}/stats.json",
    "evaluate": f"{EVALUATE}/finetuned.json",
    "register": f"{REGISTER}/registration.json",
}
# The config each stage reads: whole sections, or single keys of a section.
STAGE_CONFIG = {
    "download": ("data",),
    "parse": ("data", "parse", "train.instruction_tuned", "train.train_data_split_seed"),
    "tokenize": ("data", "parse", "model", "tokenize", "train.seed", "train.instruction_tuned",
                 "train.train_data_split_seed"),  # fmt: skip
    "evaluate-base": ("eval", "generate"),
    "train": ("train", *(f"eval.{k}" for k in TRAINING_EVAL_KEYS)),  # its validations' share of eval
    "evaluate": ("eval", "generate"),
    "register": ("preset", "data", "parse", "model", "tokenize", "train", "eval", "generate", "registry"),
}
# What the stages run: tokenize's blocks and data report (tasks/blocks.py, tasks/datareport.py) reach training and
# the evaluations as the blocks themselves (`READS`), so a change there that leaves the blocks alone moves only
# tokenize (a reworded report trained and scored again before).
CODE = {
    "download": ("tasks/download.py", "tasks/textdata.py"),
    "parse": ("tasks/split.py", "tasks/sections.py", "tasks/textdata.py"),
    "tokenize": ("tasks/textdata.py", "tasks/models.py", "tasks/blocks.py", "tasks/datareport.py"),
    "evaluate-base": ("tasks/perplexity.py", "tasks/generate.py", "tasks/batching.py", "kernels", "tasks/models.py"),
    "train": ("tasks/finetune.py", "tasks/train_worker.py", "tasks/checkpoints.py", "tasks/memory.py",
              "tasks/allocator.py", "tasks/profile.py", "kernels", "tasks/models.py"),  # fmt: skip
    "evaluate": ("tasks/perplexity.py", "tasks/generate.py", "tasks/batching.py", "kernels", "tasks/models.py"),
    "register": ("tasks/registry.py", "tasks/batching.py", "tasks/pyfunc_model.py"),
}
_LIBS = {
    "download": ("sec-edgar-downloader", "requests"),
    "parse": ("beautifulsoup4", "lxml"),
    "tokenize": ("tokenizers", "transformers", "datasets"),
    "evaluate-base": ("torch", "transformers", "peft", "triton"),
    "train": ("torch", "transformers", "peft", "deepspeed", "accelerate", "bitsandbytes", "triton"),
    "evaluate": ("torch", "transformers", "peft", "triton"),
    "register": ("mlflow",),
}


def downstream(stage: str) -> list[str]:
    """`stage` and every stage that depends on it, in pipeline order."""
    out = {stage}
    for s in STAGES:  # NEEDS only points backwards, so one pass in order closes the set
        if out & set(NEEDS[s]):
            out.add(s)
    return [s for s in STAGES if s in out]


def needing(stage: str, todo: list[str] | tuple[str, ...]) -> str | None:
    """The first stage of `todo` that reads the outputs of `stage` (`NEEDS`, or a folder of it in `READS`)."""
    folder = OUTPUTS[stage].split("/")[0]
    return next((t for t in STAGES if t in todo and (stage in NEEDS[t] or folder in {_part(r)[0] for r in READS[t]})),
                None)  # fmt: skip


def lacking(run_dir: Path, todo: list[str] | tuple[str, ...], ref: str, alone: bool = False) -> str | None:
    """Why the stages `todo` cannot run in `run_dir` (named `ref`), or None: a stage they read that has not left
    its outputs there (never run, or its folder removed), which the message says to run first. A run of some
    stages needs every other one's outputs (registration reads them all); `alone`, for `edgar-tune stage`, only
    those the stage reads."""
    for stage in STAGES:
        if stage not in todo and not (Path(run_dir) / OUTPUTS[stage]).exists():
            if (by := needing(stage, todo)) is None and alone:
                continue
            by = by or next(t for t in STAGES if t in todo)
            first = f"`edgar-tune stage {stage} --run {ref}` runs it alone, " if alone else ""
            return (f"{ref} has no {OUTPUTS[stage]}, which `{by}` reads; run `{stage}` first: {first}`edgar-tune "
                    f"rerun {stage} --run {ref}` runs it and what depends on it")  # fmt: skip
    return None


# The two perplexities, before and after: compared, so scored alike.
EVALUATIONS = ("evaluate-base", "evaluate")


def stage_reads(stage: str, cfg: PipelineConfig) -> tuple[str, ...]:
    """The config `stage` reads (`STAGE_CONFIG`): tokenize reads `train.seed` only to build tiny-llama, so a
    seed sweep of another model keeps its blocks and its base's perplexity."""
    keep = STAGE_CONFIG[stage]
    if stage == "tokenize" and cfg.model.name != TINY:
        keep = tuple(k for k in keep if k != "train.seed")
    return keep


def reads_key(stage: str, cfg: PipelineConfig, key: str) -> bool:
    """Whether `stage` reads the config key `key` (`section.name`), alone or with its whole section."""
    return any(key == k or key.startswith(f"{k}.") for k in stage_reads(stage, cfg))


def rerun_stages(stage: str) -> tuple[list[str], list[str]]:
    """What `edgar-tune rerun STAGE` runs: (every stage, in order; those forced): `stage` and its dependents,
    forced, and where that holds one of the two evaluations the other one too, through the cache (Cached when
    its key is unchanged), so that the perplexities before and after are always scored with the same settings."""
    forced = downstream(stage)
    todo = set(forced) | (set(EVALUATIONS) if set(forced) & set(EVALUATIONS) else set())
    return [s for s in STAGES if s in todo], forced


def rerun_refusal(stage: str, before: PipelineConfig, after: PipelineConfig, run: str) -> str | None:
    """Why `edgar-tune rerun STAGE` with the changes from `before` (the run's config.yaml) to `after` would
    record what it did not do, or None: a changed key that a stage the rerun does not run reads (register only
    records it) would stand in config.yaml and the registered version's params beside outputs made without it.
    Says which rerun would make it: the last stage whose rerun runs every stage that reads it."""
    todo, _ = rerun_stages(stage)
    old, new = flat_params(before), flat_params(after)
    for key in [k for k in new if new[k] != old.get(k)]:
        readers = {s for s in STAGES if s != "register" and any(reads_key(s, c, key) for c in (before, after))}
        missed = [s for s in STAGES if s in readers - set(todo)]
        if missed:
            named = joined(missed)
            start = next(s for s in reversed(STAGES) if readers <= set(rerun_stages(s)[0]))
            return (f"`{key}` is read by {named}, which `rerun {stage}` does not run: the run's config.yaml and "
                    f"registered version would say {new[key]!r} of outputs made with {old.get(key)!r}. Rerun from "
                    f"`{start}` with the same change (edgar-tune rerun {start} --run {run} --set ...), or start a "
                    "new run")  # fmt: skip
    return None


def stage_overrides(stage: str, before: PipelineConfig, after: PipelineConfig) -> dict[str, tuple]:
    """What `edgar-tune stage STAGE --set ...` changes from `before` (the run's config.yaml) to `after` that the
    stage's key reads: {key: (old, new)}. Outputs made so are left unstamped (config.yaml does not hold them).

    Raises:
        ConfigError: a changed key the stage does not read, which would change nothing it does (register reads only
            `registry`: it records the rest as config.yaml has it; train reads it too, for its live curves).
    """
    old, new = flat_params(before), flat_params(after)
    moved = {k: (old.get(k), new[k]) for k in new if new[k] != old.get(k)}
    for key in moved:
        logs = key.startswith("registry.") and stage in ("train", "register")  # train's live curves go to MLflow too
        if logs or (stage != "register" and reads_key(stage, after, key)):
            continue
        readers = [s for s in STAGES[:-1] if reads_key(s, after, key)] or ["register"]
        raise ConfigError(f"`{key}` is not read by `{stage}`, so --set would change nothing it does; {joined(readers)} "
                          f"{'read' if len(readers) > 1 else 'reads'} it (`edgar-tune stage {readers[0]} --set "
                          f"...`, or `edgar-tune rerun` to record the change in config.yaml)")  # fmt: skip
    return {k: v for k, v in moved.items() if reads_key(stage, after, k)}


def rerun_config(stage: str, run_dir: Path, overrides: dict | list[str] | None, ref: str) -> PipelineConfig:
    """The config `rerun STAGE` runs with: the run's, with `overrides`.

    Raises:
        ConfigError: a bad key or value, or a change that the rerun would record without making it
            (`rerun_refusal`).
    """
    cfg = load_run_config(run_dir, overrides)
    if overrides and (why := rerun_refusal(stage, load_run_config(run_dir), cfg, ref)):
        raise ConfigError(why)
    return cfg


def at_commit(cfg: PipelineConfig, commit: str | None) -> PipelineConfig:
    """The config the tokenize stage runs with: a hub id's `model.revision` as the commit it names now. That
    stage's key holds the commit, so a run whose branch has moved since the folder's last run tokenizes (and
    trains) again, and one whose branch has not keeps every stage; config.yaml keeps what the user asked for."""
    if commit is None or commit == cfg.model.revision:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"revision": commit})})


def _flat(view: dict) -> dict:
    """A config view as `section.key` -> value (`preset` as itself)."""
    return {f"{section}.{k}" if isinstance(keys, dict) else section: v
            for section, keys in view.items() for k, v in (keys.items() if isinstance(keys, dict) else [(None, keys)])}


def _moved(stage: str, cfg: PipelineConfig, recorded: dict, lacking_at_default: bool = True,
           ) -> list[tuple[str, object, object]]:  # fmt: skip
    """The config keys `stage` reads whose value in `cfg` is not the one its stamp `recorded`: (key, then, now). A
    key gone since it ran (another edgar-tune) is not compared; one new since, that it ran without, was at its
    default (`lacking_at_default`; else it is not compared either)."""
    now, then = _flat(stage_config(cfg, stage)), _flat(recorded)
    if lacking_at_default:
        then = _flat(PipelineConfig.model_construct().model_dump(mode="json")) | then
    return [(k, then[k], now[k]) for k in now if k in then and now[k] != then[k]]


def made_otherwise(run_dir: Path, cfg: PipelineConfig, stages: list[str] | tuple[str, ...] = STAGES[:-1],
                   ) -> str | None:  # fmt: skip
    """Why the run folder's outputs (those of `stages`; default: all a registration reads) are not what
    registering them would say they are, or None.

    A registration records the run's config (`cfg`, its config.yaml) beside the weights and the perplexities. Each
    stage before it must have made its outputs with that config, from the stage folders as they are now: its stamp
    (`record`) says what it read. `edgar-tune stage STAGE --set ...` leaves none (it ran with other settings),
    an edit of config.yaml moves the config away from a stamp's, and a stage run again by hand moves the folders
    that later stages read (a `stage train` after which `05_evaluate` still scores the weights before it). The code
    version is not compared, nor a config key that one of the two sides lacks: a run made before an upgrade of
    edgar-tune registers as it was made. A stamp written before stamps recorded their inputs is taken as it is."""
    tok = Path(run_dir) / OUTPUTS["tokenize"]
    pinned = at_commit(cfg, read_json(tok)["base_model"].get("revision")) if tok.exists() else cfg
    files = run_digests(run_dir)
    why: dict[str, str] = {}
    for stage in stages:
        if not (Path(run_dir) / OUTPUTS[stage]).exists():
            continue  # nothing to vouch for: what reads it says it is missing (the flow before its first stage)
        if not _stamp(run_dir, stage).exists():
            why[stage] = (f"`{stage}`'s outputs carry no record of what made them (`edgar-tune stage {stage} --set "
                          "...` leaves none, as does a stage stopped part-way)")  # fmt: skip
            continue
        stamp = read_json(_stamp(run_dir, stage))
        if "config" not in stamp:
            continue
        # tokenize ran at the commit it recorded, or as asked where the hub named none when the run began
        moved = min((_moved(stage, at, stamp["config"], lacking_at_default=False)
                     for at in ([cfg, pinned] if stage == "tokenize" else [cfg])), key=len)  # fmt: skip
        if moved:
            why[stage] = (f"`{stage}` ran with " + ", ".join(f"{k}={then!r}" for k, then, _ in moved) + ", where "
                          "config.yaml says " + ", ".join(f"{k}={now!r}" for k, _, now in moved))  # fmt: skip
        elif moved := [n for n, was in stamp["reads"].items() if read_digest(run_dir, n, files) != was]:
            why[stage] = f"`{stage}` read {' and '.join(moved)} as {'they were' if len(moved) > 1 else 'it was'} " \
                         "before a later change (a stage run again by hand, or a file written there since)"
    files.save()
    if not why:
        return None
    start = next(s for s in reversed(STAGES) if set(why) <= set(rerun_stages(s)[0]))
    return (f"this run cannot be registered as it stands: {'; '.join(why.values())}. Its registered version would "
            "name settings, data or perplexities its weights were not made with. Rerun from "
            f"`{start}` (`edgar-tune rerun {start} --run RUN`), which makes it and the stages after it again")


def why_it_runs(run_dir: Path, stage: str, cfg: PipelineConfig, inputs: dict) -> str:
    """Why `stage`, whose key (of `inputs`, `stage_inputs`) is not the one its stamp holds, would run: no outputs,
    no stamp, the config keys it reads that moved since it ran (then -> now), the stage folders it reads that
    changed, or else its code or a library it runs on."""
    if not (Path(run_dir) / OUTPUTS[stage]).exists():
        return "it has not run in this folder (or its outputs are gone)"
    if not _stamp(run_dir, stage).exists():
        return "its outputs carry no record of what made them"
    stamp = read_json(_stamp(run_dir, stage))
    if "config" in stamp:
        if moved := _moved(stage, cfg, stamp["config"]):
            return ", ".join(f"{k} {then!r} -> {now!r}" for k, then, now in moved)
        if moved := [n for n, was in stamp["reads"].items() if inputs["reads"].get(n) != was]:
            return f"what it reads changed ({', '.join(moved)})"
    return "edgar-tune's code for it, or a library it runs on, changed since it ran"


def kept_otherwise(run_dir: Path, cfg: PipelineConfig, todo: list[str] | tuple[str, ...]) -> str | None:
    """Why running `todo` in the run folder would end in a registration refused (`made_otherwise`) for an output of
    a stage it does not run (config.yaml edited by hand since, a stage run again by hand), or None: said before
    any stage runs for nothing."""
    if "register" not in todo:
        return None
    return made_otherwise(run_dir, cfg, [s for s in STAGES[:-1] if s not in todo])


def stage_config(cfg: PipelineConfig, stage: str) -> dict:
    """What `stage`'s key holds of the config: the keys it reads (`stage_reads`), by section, and nothing of the
    other sections. Before 2026-12-04 it held `config_view`'s whole dump, the other sections at their defaults, so a
    key added to any section (another edgar-tune) moved every stage's key: the first run after an upgrade trained
    and scored again (`decide` keeps stages stamped so)."""
    out: dict = {}
    for section, keys in config_view(cfg, stage).model_dump(mode="json").items():
        if not isinstance(keys, dict):
            if reads_key(stage, cfg, section):
                out[section] = keys
        elif picked := {k: v for k, v in keys.items() if reads_key(stage, cfg, f"{section}.{k}")}:
            out[section] = picked
    return out


def config_view(cfg: PipelineConfig, stage: str) -> PipelineConfig:
    """The config with only what `stage` reads; everything else at its default (so it cannot leak in unkeyed)."""
    keep = stage_reads(stage, cfg)
    parts = {}
    for name, field in PipelineConfig.model_fields.items():
        value = getattr(cfg, name)
        if name in keep:
            parts[name] = value
        elif singles := [k.split(".", 1)[1] for k in keep if k.startswith(f"{name}.")]:
            parts[name] = type(value).model_construct(**{k: getattr(value, k) for k in singles})
        else:
            parts[name] = field.get_default(call_default_factory=True)
    return PipelineConfig.model_construct(**parts)


# A file changed within this many seconds may change again inside its timestamps' resolution: it is not memoized.
_SETTLED_NS = 2_000_000_000


def file_stamp(path: Path) -> tuple[int, int, int, int]:
    """(size, mtime, ctime, inode): what moves when a file's bytes are edited in place or replaced."""
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class FileDigests:
    """sha256 of files, remembered in a JSON memo by (size, mtime, ctime, inode) so an unchanged file is read once.

    Fully fine-tuned weights run to tens of GB (GPT-J 6B: 24 GB in fp32), and evaluate and register both read
    them: without the memo every run, all-cached or not, re-reads them. An edit always moves ctime (no file API
    can set it back), an atomic rewrite moves the inode, and a file whose stamps are younger than `_SETTLED_NS` is
    hashed again every time (as git does with its index), so a remembered digest stands only for bytes that have
    not changed since they were read.

    Files under `root` (the run folder) are remembered by their path in it, so that a run folder moved on its
    disk (which keeps its files' stamps) does not read its weights again; others by their full path.
    """

    def __init__(self, memo: Path | None = None, root: Path | None = None):
        self.memo = memo
        self.root = Path(root).resolve() if root is not None else None
        self.entries: dict[str, dict] = {}
        if memo is not None and memo.exists():
            try:
                entries = read_json(memo)
                self.entries = {self._name(Path(n)) if Path(n).is_absolute() else n: e for n, e in entries.items()}
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # a damaged memo only costs a re-read
        self.changed = False

    def _name(self, path: Path) -> str:
        """A file's name in the memo (a memo written before names were relative to `root` reads the same)."""
        path = path.resolve()
        return str(path.relative_to(self.root)) if self.root and path.is_relative_to(self.root) else str(path)

    def _path(self, name: str) -> Path:
        return self.root / name if self.root and not Path(name).is_absolute() else Path(name)

    def __call__(self, path: Path) -> str:
        stamp = file_stamp(path)
        name = self._name(Path(path))
        if (entry := self.entries.get(name)) and entry["stat"] == list(stamp):
            return entry["sha256"]
        sha = sha256_file(path)
        if time.time_ns() - max(stamp[1], stamp[2]) > _SETTLED_NS:
            self.entries[name] = {"stat": stamp, "sha256": sha}
            self.changed = True
        return sha

    def save(self) -> None:
        """Write the memo if it gained entries or holds files that are gone (deleted checkpoints, a retrained run)."""
        if self.memo is None:
            return
        kept = {name: entry for name, entry in self.entries.items() if self._path(name).is_file()}
        if self.changed or len(kept) < len(self.entries):
            self.entries = kept
            atomic_write_json(self.memo, self.entries)
            self.changed = False


def run_digests(run_dir: Path) -> FileDigests:
    """The run folder's memo of file digests (`.stages/digests.json`): the stage keys and the download stage's
    description of users' text files hash through it."""
    return FileDigests(Path(run_dir) / ".stages" / "digests.json", root=run_dir)


def stage_files(folder: Path, leave: tuple[str, ...] = ()) -> list[Path]:
    """The files of a stage folder that its readers read, sorted: all of them but what is left there by looking:
    - the cache files that datasets writes beside a saved dataset (`cache-*.arrow`) when a notebook maps or
      filters it there, which `load_from_disk` never reads (it reads what the folder's state.json names);
    - what other programs leave in a folder someone opens (`litter`);
    - the files named in `leave` (top-level names: a stage that does not read them, `PARTS`).
    Counted, such a file made the next run train again on the same blocks (and register the same weights as a new
    version)."""
    folder = Path(folder)
    found = sorted(p for p in folder.rglob("*") if p.is_file() and not litter(p.relative_to(folder))
                   and p.relative_to(folder).parts[0] not in leave)  # fmt: skip
    saved = {p.parent: names for p in found if p.name == "state.json" and (names := _saved_dataset(p)) is not None}
    return [p for p in found if p.parent not in saved or p.name in saved[p.parent]]


def _saved_dataset(state: Path) -> set[str] | None:
    """The files `datasets.load_from_disk` reads in the folder of `state` (a saved dataset's state.json), or None
    where `state` is not one."""
    try:
        named = {f["filename"] for f in read_json(state)["_data_files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return named | {"state.json", "dataset_info.json"}


def _part(name: str) -> tuple[str, tuple[str, ...]]:
    """What a READS name stands for: (a stage folder, the files of it left out) (`PARTS`)."""
    return PARTS.get(name, (name, ()))


def read_digest(run_dir: Path, name: str, files: FileDigests | None = None) -> str:
    """`folder_digest` of what a READS name stands for: a stage folder, or one less some files."""
    folder, leave = _part(name)
    return folder_digest(Path(run_dir) / folder, files, leave)


def folder_digest(folder: Path, files: FileDigests | None = None, leave: tuple[str, ...] = ()) -> str:
    """sha256 over every file of a folder that its readers read (`stage_files`: relative path and the sha256 of its
    bytes), in sorted order; "absent" if the folder is missing. `files` hashes each file (a memo of earlier reads;
    none: read every byte).

    The download manifest is hashed without the filings' `root` (where this machine keeps them): the filings
    are identified by their sha256, so another worker's copy of the same filings gives the same digest.
    """
    folder = Path(folder)
    if not folder.exists():
        return "absent"
    files = files or FileDigests()
    digest = hashlib.sha256()
    for path in stage_files(folder, leave):
        digest.update(str(path.relative_to(folder)).encode() + b"\x00")
        if folder.name == DOWNLOAD and path.name == "manifest.json":
            manifest = read_json(path)
            manifest["filings"] = [{k: v for k, v in f.items() if k != "root"} for f in manifest["filings"]]
            digest.update(json.dumps(manifest, sort_keys=True).encode())
        else:
            digest.update(files(path).encode())
    return digest.hexdigest()


@cache
def code_version(stage: str) -> str:
    """sha256 of the stage's source files and the versions of the libraries it runs on."""
    digest = hashlib.sha256()
    for rel in CODE[stage]:
        path = REPO_ROOT / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(f.relative_to(REPO_ROOT)).encode() + b"\x00")
            digest.update(sha256_file(f).encode())
    for lib in _LIBS[stage]:
        digest.update(_lib_line(lib).encode())
    return digest.hexdigest()[:16]


def _lib_line(lib: str) -> str:
    """What a code version holds of `lib`: its version, or that it is absent. Triton counts only under a torch
    built for GPUs: a CPU torch runs none of its kernels (kernels/hf.py refuses them), so installing it there
    (`make test` does, for the kernel tests under TRITON_INTERPRET) leaves every key as it was, and a demo run
    before `make test` is not trained again after it."""
    if lib == "triton":
        import torch

        if not (torch.version.cuda or torch.version.hip):
            return "triton absent"
    try:
        return f"{lib}=={metadata.version(lib)}"
    except metadata.PackageNotFoundError:
        return f"{lib} absent"


def stage_inputs(stage: str, run_ref: str, run_dir: Path, cfg: PipelineConfig,
                 reads: tuple[str, ...] | None = None) -> dict:  # fmt: skip
    """What `stage` of the run named `run_ref` (`RunFolder.keyed_as`: its URL, or the path it first ran at) reads,
    from `run_dir` as it is now: the config it reads, the digests of the stage folders it reads (`READS`, or
    `reads`), and its code version (what `key_of` hashes)."""
    files = run_digests(run_dir)
    parts = {
        "stage": stage,
        "run": run_ref,
        "config": stage_config(cfg, stage),
        "reads": {name: read_digest(run_dir, name, files) for name in (reads or READS[stage])},
        "code": code_version(stage),
    }
    if stage == "train" and (engine := engine_files(cfg)):
        parts["engine"] = engine
    files.save()
    return parts


def engine_files(cfg: PipelineConfig) -> dict:
    """What the files `train.deepspeed` and `train.hostfile` name hold (the DeepSpeed config, the hosts' slots): the
    config holds their names only, so an edited ZeRO config or a node more would stand as cached. Nothing when
    neither is set, so those runs' keys are as they were."""
    if not (cfg.train.deepspeed or cfg.train.hostfile):
        return {}
    from tasks.finetune import deepspeed_config, hostfile_slots

    engine = {"deepspeed": deepspeed_config(cfg.train.deepspeed)} if cfg.train.deepspeed else {}
    return engine | ({"hostfile": hostfile_slots(cfg.train.hostfile)} if cfg.train.hostfile else {})


def decide(stage: str, run_ref: str, run_dir: Path, cfg: PipelineConfig, force: bool) -> tuple[bool, str, dict]:
    """Whether `stage` must run (rather than stand as cached), its cache key and what it reads (`stage_inputs`).
    A stage stamped by an earlier edgar-tune, whose key held other parts of the config (`stage_config`) or the
    whole tokenize folder (`READ_BEFORE`), stands under the key it was stamped with where that key still describes
    what it reads (`_as_stamped`): an upgrade of edgar-tune does not train again for it."""
    inputs = stage_inputs(stage, run_ref, run_dir, cfg)
    key = key_of(inputs)
    if force or is_current(run_dir, stage, key):
        return force, key, inputs
    if stood := _as_stamped(stage, run_ref, run_dir, cfg):
        return False, *stood
    return True, key, inputs


def _as_stamped(stage: str, run_ref: str, run_dir: Path, cfg: PipelineConfig) -> tuple[str, dict] | None:
    """The key and inputs `stage` was stamped with by an earlier edgar-tune, where they still describe what it
    reads: its recorded config holds the keys it reads as they are now (one it ran without, at its default), and
    its key is that of the recorded config with the folders (as read now, or as read before, `READ_BEFORE`), the
    code and the libraries as they are now. A stamp that recorded no config is tried with the config as
    `config_view` dumped it whole. None otherwise."""
    if not _stamp(run_dir, stage).exists():
        return None
    stamp = read_json(_stamp(run_dir, stage))
    if "config" in stamp and _moved(stage, cfg, stamp["config"]):
        return None
    recorded = stamp.get("config", config_view(cfg, stage).model_dump(mode="json"))
    for reads in (READS[stage], READ_BEFORE.get(stage)):
        if reads is not None:
            was = stage_inputs(stage, run_ref, run_dir, cfg, reads) | {"config": recorded}
            if is_current(run_dir, stage, key_of(was)):
                return key_of(was), was
    return None


def key_of(inputs: dict) -> str:
    """The cache key of a stage's `stage_inputs`."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return f"edgar-tune-{inputs['stage']}-{hashlib.sha256(blob).hexdigest()}"


def stage_key(stage: str, run_ref: str, run_dir: Path, cfg: PipelineConfig) -> str:
    """The cache key of `stage` in the run named `run_ref` (`RunFolder.keyed_as`), read from `run_dir` as it is
    now."""
    return key_of(stage_inputs(stage, run_ref, run_dir, cfg))


def read_stamps(run_dir: Path, stage: str) -> dict[str, tuple[int, int, int, int]]:
    """`file_stamp` of every file read in the folders `stage` reads (`stage_files`): taken before and after it
    runs, they show a stage that changed its inputs (its recorded key would then never match again)."""
    files = (p for folder, leave in map(_part, READS[stage]) for p in stage_files(Path(run_dir) / folder, leave))
    return {str(p.relative_to(run_dir)): file_stamp(p) for p in files}


def changed(before: dict, after: dict) -> list[str]:
    """The files added, removed or rewritten between two `read_stamps`."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def _stamp(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / ".stages" / f"{stage}.json"


def is_current(run_dir: Path, stage: str, key: str) -> bool:
    """The run folder holds the outputs that `key`'s record describes (so a cached result may stand)."""
    stamp = _stamp(run_dir, stage)
    if not stamp.exists() or not (Path(run_dir) / OUTPUTS[stage]).exists():
        return False
    if stage == "download" and not _filings_on_disk(Path(run_dir) / OUTPUTS[stage]):
        return False  # the manifest names filings this machine does not have (another worker downloaded them)
    return read_json(stamp).get("key") == key


def _filings_on_disk(manifest: Path) -> bool:
    return all(Path(f["root"], rel).exists() for f in read_json(manifest)["filings"] for rel in f["files"].values())


def record(run_dir: Path, stage: str, key: str, inputs: dict | None = None) -> None:
    """Stamp `stage`'s outputs with the key they were made under, and what it read (`stage_inputs`): the config
    and the stage folders' digests, which `made_otherwise` compares with the run as it stands."""
    stamp = {"stage": stage, "key": key}
    if inputs is not None:
        stamp |= {"config": inputs["config"], "reads": inputs["reads"]}
    atomic_write_json(_stamp(run_dir, stage), stamp)


def forget(run_dir: Path, stage: str) -> None:
    """The stage's outputs are about to change outside the flow: its cached result no longer describes them."""
    _stamp(run_dir, stage).unlink(missing_ok=True)


class StageKey(CachePolicy):
    """Cache on the `cache_key` argument the flow computed with `stage_key` (no key: no caching)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict, flow_parameters: dict, **kwargs) -> str | None:
        return inputs.get("cache_key")
