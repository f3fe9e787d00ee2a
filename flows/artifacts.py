"""A run's result in Prefect: artifacts on its flow run, and an event when it registers a version.

A run started from the UI (a deployment's Custom run, a schedule) shows there what the console's summary says:
- `<model>-summary` (markdown): perplexity before and after, the registered version and alias, what it was
  compared with, links to the MLflow run and model version when the tracking server is a URL, time per stage.
- `<model>-perplexity` (table): each held-out document's tokens and perplexity before and after.
- the data report (markdown, this run only): each filing's Items, their status, characters and tokens, and which
  set they went to.

The first two are keyed by the registered model's name, so the UI's Artifacts page holds one timeline per model:
every run that registered a version of it, scheduled or not, newest first.

A run whose register stage ran emits `edgar-tune.model.registered` (`REGISTERED`), its resource the registered model
with the version and alias as labels, so an automation can act on a new champion (a notification, a deployment that
serves or exports it) by matching `edgar-tune.alias: champion`. `edgar-tune promote` emits `edgar-tune.model.promoted`
(`HAND_PROMOTED`) on the same resource: a rollback by hand makes a new champion too.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import quote

from tasks.io import EVALUATE, TOKENIZE, read_json

log = logging.getLogger(__name__)

REGISTERED = "edgar-tune.model.registered"
HAND_PROMOTED = "edgar-tune.model.promoted"
TABLE_ROWS = 500  # the per-document table's rows in the UI (instruction tuning can hold out thousands); MLflow has all
REPORT_LINES = 2000  # the data report's lines (a hundred companies' filings are about 2,000 Items)


def artifact_key(model: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for `what` of the registered model `model`."""
    return re.sub(r"[^a-z0-9]+", "-", f"{model}-{what}".lower()).strip("-")


def mlflow_links(uri: str, run_id: str, model: str, version: str) -> str | None:
    """Markdown links to the run and the model version in the MLflow UI, when the tracking server is a URL (a
    sqlite or file store has no UI to link to)."""
    if not uri.startswith(("http://", "https://")):
        return None
    base = uri.rstrip("/")
    return (f"[run {run_id[:8]}]({base}/#/runs/{run_id}) · "
            f"[{model} v{version}]({base}/#/models/{quote(model, safe='')}/versions/{version}) at {base}")  # fmt: skip


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(summary: dict) -> str:
    """The run summary as a markdown table, headed by its one line of result."""
    from flows.pipeline import summary_rows

    s = summary
    rows = summary_rows(s)
    links = mlflow_links(s["mlflow_tracking_uri"], s["mlflow_run_id"], s["registered_model"], s["model_version"])
    rows = [(k, (links or f"`{v}`") if k == "MLflow" else v) for k, v in rows]
    head = (f"**{s['registered_model']} v{s['model_version']} @{s['model_alias']}**: perplexity {s['ppl_before']:.3f} "
            f"→ {s['ppl_after']:.3f} ({s['ppl_change_pct']:+.1f}%) on {s['validation']}")  # fmt: skip
    table = "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows)
    return f"{head}\n\n| | |\n|---|---|\n{table}\n"


def per_document_rows(run_dir: Path) -> list[dict]:
    """Each held-out document's tokens and perplexity before and after, as the MLflow table has them."""
    from tasks.registry import per_document_table

    columns = per_document_table(read_json(run_dir / EVALUATE / "base.json"),
                                 read_json(run_dir / EVALUATE / "finetuned.json"))  # fmt: skip
    rounded = {k: [round(x, 3) if isinstance(x, float) else x for x in v] for k, v in columns.items()}
    return [dict(zip(rounded, values, strict=True)) for values in zip(*rounded.values(), strict=True)]


def _first_lines(text: str, most: int, what: str) -> str:
    lines = text.splitlines()
    if len(lines) <= most:
        return text
    return "\n".join(lines[:most]) + f"\n\n(the first {most} of {len(lines)} lines; all of them in {what})\n"


def publish_run(summary: dict, run_dir: Path) -> None:
    """Create the run's artifacts on its flow run. A server that does not take them costs a warning (naming how
    many it took): the run's result is already in its folder and in MLflow."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    model, where = summary["registered_model"], summary["run"]
    made = 0
    try:
        key = artifact_key(model, "summary")
        description = f"edgar-tune run {where}: perplexity before and after, registration"
        create_markdown_artifact(summary_markdown(summary), key=key, description=description)
        made += 1
        rows = per_document_rows(run_dir)
        shown = rows[:TABLE_ROWS]
        key = artifact_key(model, "perplexity")
        description = f"perplexity per held-out document, run {where}"
        if len(shown) < len(rows):
            description += f" (the first {len(shown)} of {len(rows)}; all in MLflow's eval/per_document.json)"
        create_table_artifact(shown, key=key, description=description)
        made += 1
        report = (run_dir / TOKENIZE / "data_report.md").read_text()
        description = f"data report of run {where}: Items, characters, tokens, and the set each went to"
        create_markdown_artifact(_first_lines(report, REPORT_LINES, f"{where}/{TOKENIZE}/data_report.md"),
                                 description=description)  # fmt: skip
        made += 1
    except Exception as err:  # noqa: BLE001 (whatever the API said, the result is safe on disk and in MLflow)
        log.warning("Prefect took %d of the run's 3 artifacts: %s: %s. The result is in %s/summary.json and MLflow.",
                    made, type(err).__name__, err, where)  # fmt: skip


def model_resource(model: str, version: str, alias: str) -> dict[str, str]:
    """The resource of edgar-tune's events: the registered model, labelled with a version and the alias it has now."""
    return {"prefect.resource.id": f"edgar-tune.model.{model}", "prefect.resource.name": model,
            "edgar-tune.version": str(version), "edgar-tune.alias": alias}  # fmt: skip


def registered_event(summary: dict) -> tuple[dict[str, str], dict]:
    """(resource, payload) of the event that announces the version a run registered."""
    s = summary
    resource = model_resource(s["registered_model"], s["model_version"], s["model_alias"])
    payload = {key: s[key] for key in ("model_version", "model_alias", "ppl_before", "ppl_after", "ppl_change_pct",
                                       "validation", "val_tokens", "champion_comparison", "mlflow_tracking_uri",
                                       "mlflow_run_id", "run")}  # fmt: skip
    return resource, payload


def announce_registration(summary: dict) -> None:
    """Emit `REGISTERED` for the version this run registered (Prefect relates it to the flow run and deployment)."""
    from prefect.events import emit_event

    resource, payload = registered_event(summary)
    try:
        emit_event(REGISTERED, resource=resource, payload=payload)
    except Exception as err:  # noqa: BLE001 (an event too large, say: the version is registered all the same)
        log.warning("Prefect did not take the %s event: %s: %s", REGISTERED, type(err).__name__, err)


def announce_promotion(model: str, done: dict, uri: str) -> tuple[str, str] | None:
    """Send `HAND_PROMOTED` for a version `edgar-tune promote` gave an alias (`done`: what
    `tasks.registry.promote_by_hand` returned) to the Prefect server configured, and wait until it is sent. Returns
    ("note" or "warning", a line for the console) when no event reached a server: none is configured (automations
    run on a server only; an embedded one would start for this event and stop with it), or the server did not take
    it. The alias has moved either way."""
    import asyncio

    from tasks.limits import shared_server

    if not shared_server():
        return "note", f"no {HAND_PROMOTED} event sent: no Prefect server is configured (PREFECT_API_URL)"
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    from tasks.registry import sqlite_file

    if (db := sqlite_file(uri)) is not None:  # the store as an automation's flow run elsewhere finds it
        uri = f"sqlite:///{db.resolve()}"
    record = done["record"]
    payload = {"model_version": done["version"], "model_alias": done["alias"], "before": done["before"],
               "by": record["by"], "reason": record["reason"], "time": record["time"], "note": done["note"],
               "mlflow_tracking_uri": uri}  # fmt: skip
    event = Event(event=HAND_PROMOTED, resource=model_resource(model, done["version"], done["alias"]), payload=payload)

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    try:
        asyncio.run(send())
    except Exception as err:  # noqa: BLE001 (the server is gone, say: the alias has moved all the same)
        return "warning", (f"Prefect did not take the {HAND_PROMOTED} event ({type(err).__name__}: {err}); no "
                           "automation saw this promotion")  # fmt: skip
    return None
