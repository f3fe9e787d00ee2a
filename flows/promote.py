"""A promotion by hand from the Prefect UI: the `edgar-tune-promote` flow (prefect.yaml's `promote` deployment).

What `edgar-tune promote` does, for a team that works in the Prefect UI: give a registered version an alias (a
rollback, a challenger kept), tagged with who, when and why, then `edgar-tune.model.promoted`, which starts the
`export-champion` deployment when the alias is `champion`.
"""

from __future__ import annotations

from tasks.progress import settle_console

settle_console()  # before Prefect and MLflow are imported: see tasks.progress

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.logs import logs_into_the_flow_run

logs_into_the_flow_run()


@flow(name="edgar-tune-promote", log_prints=True)
def edgar_tune_promote(version: str, reason: str = "", alias: str = "champion", model: str = "edgar-tune-10k",
                       tracking_uri: str | None = None) -> dict:  # fmt: skip
    """Give version `version` of `model` the alias `alias` (default champion), as a person decided.

    Args:
        version: The version to promote (`edgar-tune models` lists them, with their perplexities).
        reason: Why: kept in the version's `promoted_by_hand` tag, with the flow run that moved it.
        alias: The alias to move; a challenger promoted to champion loses `challenger`.
        model: The registered model (`registry.model_name` of the runs).
        tracking_uri: The MLflow store; else $MLFLOW_TRACKING_URI, else runs/mlflow.db under the worker's working
            directory (this checkout).
    """
    import mlflow

    from flows.artifacts import announce_promotion
    from tasks.registry import existing_store, one_writer, promote_by_hand, promotion_lines

    uri = existing_store(tracking_uri, Path("runs"), "set tracking_uri to the store the runs registered in")
    with one_writer(uri, Path("edgar-tune-promote")):  # not in the middle of a registration's champion decision
        done = promote_by_hand(mlflow.MlflowClient(uri), model, version, alias, reason,
                               by=f"Prefect flow run {flow_run.get_name()}")  # fmt: skip
    print("\n".join(promotion_lines(model, done)))
    if done["record"] and (said := announce_promotion(model, done, uri)):
        if said[0] == "warning":  # the run fails where it is seen: the export did not start
            raise RuntimeError(f"{said[1]} (the alias has moved)")
        print(f"{said[0]}: {said[1]}")
    return done
