"""Promotion is gated on a real MLflow store (sqlite): `champion` moves only to a version with lower perplexity
on the same validation data; otherwise the new version is the `challenger`."""

from __future__ import annotations

import mlflow


def test_champion_moves_only_on_lower_perplexity_on_the_same_validation_data(tmp_path):
    from tasks.registry import CHALLENGER, CHAMPION, _promote

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")

    def version(ppl: float, val_sha: str) -> str:
        v = client.create_model_version("m", source=(tmp_path / "weights").as_uri()).version
        client.set_model_version_tag("m", v, "val_sha256", val_sha)
        client.set_model_version_tag("m", v, "val_perplexity", repr(ppl))
        return str(v)

    v1 = version(10.0, "mdna-a")
    assert _promote(client, "m", v1, 10.0, "mdna-a") == CHAMPION
    v2 = version(12.0, "mdna-a")  # worse: challenger, the champion stays
    assert _promote(client, "m", v2, 12.0, "mdna-a") == CHALLENGER
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == v1
    v3 = version(8.0, "mdna-a")  # better on the same data: takes the champion alias
    assert _promote(client, "m", v3, 8.0, "mdna-a") == CHAMPION
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == v3
    v4 = version(2.0, "mdna-b")  # lower, but on other validation text: not comparable, so challenger
    assert _promote(client, "m", v4, 2.0, "mdna-b") == CHALLENGER
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == v3
    assert _promote(client, "m", v3, 8.0, "mdna-a") == CHAMPION  # a retry of the champion keeps it
    assert str(client.get_model_version_by_alias("m", CHALLENGER).version) == v4
