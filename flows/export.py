"""The champion as a folder to serve, kept in step with the registry: the `edgar-tune-export` flow.

prefect.yaml's `export-champion` deployment runs it whenever a version becomes the champion: its trigger matches
`edgar-tune.model.registered` (a run registered a new champion) and `edgar-tune.model.promoted` (`edgar-tune
promote`, a rollback) labelled `edgar-tune.alias: champion`, and passes the event's model and MLflow store. So
`exports/<model>/champion` holds the champion, merged, in the form vLLM, TGI and transformers load, with its model
card. It is replaced whole once the new one is written; what reads it sees the old folder or the new one.
"""

from __future__ import annotations

from tasks.progress import settle_console

settle_console()  # before Prefect, transformers and MLflow are imported: see tasks.progress

from pathlib import Path
from typing import Literal

from prefect import flow

from edgar_tune.reaper import watch_embedded_server
from edgar_tune.signals import run_body
from flows.logs import logs_into_the_flow_run

logs_into_the_flow_run()


@flow(name="edgar-tune-export", log_prints=True)
def edgar_tune_export(model: str = "edgar-tune-10k", alias: str = "champion", out: str = "exports/{model}/{alias}",
                      tracking_uri: str | None = None, adapter: bool = False,
                      dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
                      gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = None,
                      base: bool = False) -> dict:  # fmt: skip
    """Export the version of `model` that holds `alias` into the folder `out`, unless it holds it already.

    Args:
        model: The registered model (`registry.model_name` of the runs).
        alias: Whose version to export. It is read when the export starts, so exports started by two champions in
            a row both end with the newer one in `out`.
        out: The folder; `{model}` and `{alias}` are filled in. A relative path is under the worker's working
            directory (this checkout). It holds an earlier export or nothing: other files are never written over.
            Or an s3:// URL: each export under its own prefix, `OUT@v7-merged/`, and the pointer `OUT.json` (its
            provenance and `url`) switched to it once it is whole (workers on several hosts, serving from S3).
        tracking_uri: The MLflow store (the trigger passes the event's); else $MLFLOW_TRACKING_URI, else
            runs/mlflow.db under the working directory.
        adapter: Write the LoRA adapter alone (for a server that applies adapters to a shared base) instead of the
            merged model.
        dtype: The merged weights' dtype: auto (the base's), float32, bfloat16 or float16.
        gguf: Instead, the merged model as one GGUF file of this type (f32, f16, bf16, q8_0), for llama.cpp,
            Ollama or LM Studio; with `adapter`, the adapter alone as a GGUF adapter, which llama.cpp (`--lora`) and
            Ollama (`ADAPTER`) apply to a GGUF of the base.
        base: Instead, the base the version was trained on, unchanged (a transformers folder, or with `gguf` the
            GGUF file llama.cpp applies GGUF adapters to). Exported again only when the alias moves to a version
            trained on another base. Give each form its own `out`: two deployments writing one folder in two forms
            replace each other's export on every champion.
    """
    import mlflow

    from tasks.export import export_alias, form
    from tasks.limits import in_prefect_run
    from tasks.registry import existing_store

    watch_embedded_server()
    with run_body():  # a signal is not lost (edgar_tune/signals.py)
        uri = existing_store(tracking_uri, Path("runs"), "set tracking_uri to the store the runs registered in")
        target = out.format(model=model, alias=alias)
        try:
            done = export_alias(mlflow.MlflowClient(uri), model, alias, target, adapter, dtype, gguf, base)
        except LookupError as err:  # no such model or alias: in which store
            raise LookupError(f"{uri}: {err.args[0]}") from err
        where = f"{target}.json -> {done['url']}" if "url" in done else Path(target).absolute()
        line = f"{where} holds {model} v{done['version']} ({form(done)}), @{alias} in {uri}"
        print(line + ("" if done["written"] else "; it did already"))
        if done["written"] and in_prefect_run():  # the UI's Artifacts page: a timeline of what the folder held, when
            from prefect.artifacts import create_markdown_artifact

            from flows.artifacts import artifact_key

            try:
                create_markdown_artifact(f"`{line}`, exported {done['exported']}", key=artifact_key(model, "export"),
                                         description=f"what {target} holds")  # fmt: skip
            except Exception as err:  # noqa: BLE001 (the folder is written all the same)
                print(f"Prefect did not take the export's artifact: {type(err).__name__}: {err}")
        return done
