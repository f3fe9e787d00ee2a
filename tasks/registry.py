"""Stage 6: log the run to MLflow and register the model, with a gated alias.

The registered version holds the LoRA adapter and tokenizer plus a reference to the base model (a hub id or
a built-in name), not a copy of the base weights; a full fine-tune registers its weights; the tiny test model
ships whole because it exists only inside its run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

from edgar_tune.config import REPO_ROOT, PipelineConfig, flat_params
from tasks.io import EVALUATE, PARSE, TOKENIZE, TRAIN, read_json, read_jsonl

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
# The registered model's code (MLflow models-from-code); its version carries `tasks/` and `edgar_tune/` beside it.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def tracking_uri(cfg_uri: str | None, runs_root: Path) -> str:
    """Explicit config, else $MLFLOW_TRACKING_URI, else an sqlite store beside the run folders."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class EdgarTuneLM(mlflow.pyfunc.PythonModel):
    """pyfunc: base model + adapter (or full weights); input a DataFrame with a `prompt` column.

    Registered as source through `MODEL_CODE`. Versions registered before that hold a pickle of this class by
    its name here, so it stays in this module."""

    def load_context(self, context) -> None:
        from tasks.models import load_causal_lm, load_tokenizer, resolve_base_ref

        cfg = context.model_config
        weights = context.artifacts["weights"]
        if cfg["weights"] == "adapter":
            base = context.artifacts.get("base") or resolve_base_ref(cfg["base_model"])
            self.model = load_causal_lm(base, adapter=weights)
        else:
            self.model = load_causal_lm(weights)
        self.tokenizer = load_tokenizer(weights)
        self.model.eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        if isinstance(model_input, str):
            prompts = [model_input]
        elif hasattr(model_input, "columns") or isinstance(model_input, dict):  # DataFrame or {"prompt": [...]}
            prompts = [str(p) for p in model_input["prompt"]]
        else:
            prompts = [str(p) for p in model_input]
        params = params or {}
        out = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                gen = self.model.generate(**ids, max_new_tokens=int(params.get("max_new_tokens", 40)),
                                          do_sample=False, pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
            out.append(self.tokenizer.decode(gen[0][ids["input_ids"].shape[1] :], skip_special_tokens=True))
        return out


# What the pyfunc imports when it loads and generates; pinned to the versions that trained and registered it.
SERVING_PACKAGES = ("torch", "transformers", "peft", "safetensors", "mlflow", "pyyaml", "pydantic")


def pip_requirements() -> list[str]:
    """`name==version` for each serving package as installed here, without local labels such as `+cpu`:
    a served copy loads the adapter with the transformers and peft it was saved with."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def _signature():
    """A `prompt` column in, generated text out, `max_new_tokens` as a request parameter (also when served)."""
    import pandas as pd
    from mlflow.models import infer_signature

    return infer_signature(pd.DataFrame({"prompt": ["This Form 10-K report shows that"]}), ["text"],
                           params={"max_new_tokens": 40})  # fmt: skip


def _plots(tmp: Path, losses: list[dict], before: dict, after: dict, val_losses: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, values = [r["step"] for r in losses], [r["loss"] for r in losses]
    ax.plot(steps, values, alpha=0.35, label="training loss (per step)")
    window = max(1, len(values) // 10)  # blocks differ a lot (tables vs prose): show the trend too
    smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
              for i in range(len(values))]  # fmt: skip
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    if val_losses:
        ax.plot([r["step"] for r in val_losses], [r["val_loss"] for r in val_losses], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(tmp / "loss_curve.png", dpi=110)
    plt.close(fig)

    filings = all("ticker" in d for d in before["documents"])  # 10-Ks: one bar per MD&A; users' text: overall
    per_doc = before["documents"] if filings else []
    names = [f"{d['ticker']} FY{d['fiscal_year']}" for d in per_doc] + ["overall"]
    b = [d["perplexity"] for d in per_doc] + [before["perplexity"]]
    a = [d["perplexity"] for d in after["documents"]][: len(per_doc)] + [after["perplexity"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], b, width=0.4, label="before fine-tuning")
    ax.bar([i + 0.2 for i in x], a, width=0.4, label="after fine-tuning")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("perplexity on held-out MD&A" if filings else "perplexity on held-out text")
    ax.set_title("Validation perplexity (Item 7, MD&A)" if filings else "Validation perplexity")
    ax.set_ylim(0, max(b + a) * 1.25)
    ax.legend(loc="upper center", ncols=2)
    fig.tight_layout()
    fig.savefig(tmp / "perplexity_before_after.png", dpi=110)
    plt.close(fig)
    return [tmp / "loss_curve.png", tmp / "perplexity_before_after.png"]


def _experiment_id(client, name: str, runs_root: Path, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (runs_root / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def _promote(client, name: str, version: str, ppl: float, val_sha: str) -> str:
    """`champion` moves only to a version with lower perplexity on the same validation data."""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        return CHAMPION  # a retried registration of the champion itself
    beats = current is None or (
        current.tags.get("val_sha256") == val_sha and ppl < float(current.tags.get("val_perplexity", "inf"))
    )
    alias = CHAMPION if beats else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    return alias


RUN_KEY = "edgar_tune.run_key"


def run_key(run_dir: Path) -> str:
    """What identifies one registration: the run folder and the training that published its weights (the train
    stage's stats.json is written once per training, so a retrained stage gets a new key)."""
    stats = (run_dir / TRAIN / "stats.json").read_bytes()
    return hashlib.sha256(str(run_dir.resolve()).encode() + b"\0" + stats).hexdigest()


def _registered_before(client, exp_id: str, name: str, key: str) -> tuple[str, str] | None:
    """(run id, version) of an earlier registration of the same weights, e.g. by a retried task."""
    for run in client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY}` = '{key}'"):
        for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            if version.name == name:
                return run.info.run_id, str(version.version)
    return None


def register_run(run_dir: Path, runs_root: Path, cfg: PipelineConfig, flow_run_id: str | None) -> dict:
    """Log params, metrics, plots and the data report; register the model; set its alias.

    Idempotent: a retry that finds a version registered from the same run folder and weights (the run key tag)
    returns that version instead of creating a second one.
    """
    uri = tracking_uri(cfg.registry.tracking_uri, runs_root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    report = read_json(run_dir / PARSE / "report.json")
    tok_stats = read_json(run_dir / TOKENIZE / "stats.json")
    train_stats = read_json(run_dir / TRAIN / "stats.json")
    before = read_json(run_dir / EVALUATE / "base.json")
    after = read_json(run_dir / EVALUATE / "finetuned.json")
    losses = read_jsonl(run_dir / TRAIN / "loss.jsonl")
    filings = [{k: f[k] for k in ("ticker", "form", "fiscal_year", "accession")} for f in report.get("filings", [])]
    exp_id = _experiment_id(client, cfg.registry.experiment, runs_root, uri)
    weights_dir = run_dir / TRAIN / train_stats["weights"]
    base_ref = cfg.model.name
    artifacts = {"weights": str(weights_dir)}
    if tok_stats["base_model"]["kind"] == "run_local" and train_stats["weights"] == "adapter":
        artifacts["base"] = str(run_dir / TOKENIZE / tok_stats["base_model"]["path"])
    key = run_key(run_dir)
    # data_sha256 covers the training and the validation text; val_sha256 alone is what the promotion gate compares.
    data_sha = hashlib.sha256(f"{report['train_sha256']}:{report['val_sha256']}".encode()).hexdigest()
    tags = {"base_model": base_ref, "data_sha256": data_sha, "train_sha256": report["train_sha256"],
            "val_sha256": report["val_sha256"],
            "git_commit": git_commit(), "filings": json.dumps(filings),
            "val_perplexity": repr(after["perplexity"]), "prefect_flow_run_id": str(flow_run_id), RUN_KEY: key}  # fmt: skip
    name = cfg.registry.model_name
    earlier = _registered_before(client, exp_id, name, key)
    if earlier is not None:
        run_id, version = earlier
        log.info("already registered as %s version %s (run %s); not registering again", name, version, run_id)
        return _finish(client, name, version, tags, after["perplexity"], report["val_sha256"], uri, run_id)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{cfg.preset}-{run_dir.name}") as run:
        mlflow.set_tags({k: v for k, v in tags.items() if k != "val_perplexity"} | {"mlflow.source.git.commit": tags["git_commit"]})
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flat_params(cfg).items()})
        fitted = train_stats.get("memory_plan", {}).get("fit")
        if fitted:  # what train.memory_fit chose, beside what the run asked for
            keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "recomputed_layers", "planned_gb",
                    "budget_gb")  # fmt: skip
            mlflow.log_params({f"memory_fit.{k}": fitted[k] for k in keys})
        mlflow.log_metrics({"ppl_before": before["perplexity"], "ppl_after": after["perplexity"],
                            "train_tokens": tok_stats["train_tokens"], "val_tokens": after["tokens"],
                            "train_seconds": train_stats["seconds"]})  # fmt: skip
        for row in losses:
            mlflow.log_metric("train_loss", row["loss"], step=int(row["step"]))
        val_file = run_dir / TRAIN / "val_loss.jsonl"
        val_losses = read_jsonl(val_file) if val_file.exists() else []
        for row in val_losses:
            mlflow.log_metric("val_loss", row["val_loss"], step=int(row["step"]))
        with tempfile.TemporaryDirectory() as tmp:
            for png in _plots(Path(tmp), losses, before, after, val_losses):
                mlflow.log_artifact(str(png), artifact_path="plots")
        mlflow.log_dict(read_json(run_dir / TOKENIZE / "data_report.json"), "data/report.json")
        mlflow.log_text((run_dir / TOKENIZE / "data_report.md").read_text(), "data/report.md")
        mlflow.log_dict({"before": before, "after": after}, "eval/perplexity.json")
        samples = [run_dir / EVALUATE / f"{n}.samples.json" for n in ("base", "finetuned")]
        if all(p.exists() for p in samples):
            from tasks.generate import side_by_side

            base_rows, tuned_rows = (read_json(p)["rows"] for p in samples)
            mlflow.log_table(side_by_side(base_rows, tuned_rows), artifact_file="eval/generations.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),  # logged as source: loading a version unpickles nothing
            artifacts=artifacts,
            model_config={"base_model": base_ref, "weights": train_stats["weights"]},
            code_paths=[str(REPO_ROOT / "tasks"), str(REPO_ROOT / "edgar_tune")],
            pip_requirements=pip_requirements(),
            registered_model_name=cfg.registry.model_name,
            signature=_signature(),
        )
        version = str(info.registered_model_version)
    return _finish(client, name, version, tags, after["perplexity"], report["val_sha256"], uri, run.info.run_id)


def _finish(client, name: str, version: str, tags: dict, ppl: float, val_sha: str, uri: str, run_id: str) -> dict:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    alias = _promote(client, name, version, ppl, val_sha)
    return {"tracking_uri": uri, "registered_model": name, "model_version": version, "model_alias": alias,
            "mlflow_run_id": run_id, "model_uri": f"models:/{name}/{version}"}  # fmt: skip
