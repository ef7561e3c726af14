"""The register component's gate (what `dsl.If` tests before promote): the registry's own
rule applied to the new version and the current champion, on a real local MLflow store."""

from __future__ import annotations

from kubedistill.components.steps import promotion_decision, registry_verdict
from kubedistill.config import Config


def _version(client, name: str, score: float) -> str:
    tags = {"score": str(score), "score_metric": "eval_ce", "higher_is_better": "false",
            "eval_data_hash": "h1"}
    mv = client.create_model_version(name, source="file:///tmp/none", tags=tags)
    return str(mv.version)


def test_gate_follows_the_registry_rule(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    v1 = _version(client, "m", 2.0)
    cfg = Config()
    first = registry_verdict(cfg, {"tracking_uri": uri, "name": "m", "version": v1})
    assert first == (True, "first version: no champion yet")
    client.set_registered_model_alias("m", "champion", v1)
    worse = _version(client, "m", 2.5)
    beats, reason = registry_verdict(cfg, {"tracking_uri": uri, "name": "m", "version": worse})
    assert beats is False and "does not beat" in reason
    assert promotion_decision({"beats_champion": beats}) == "keep"
    better = _version(client, "m", 1.5)
    beats, _ = registry_verdict(cfg, {"tracking_uri": uri, "name": "m", "version": better})
    assert beats is True


def test_gate_unknown_when_the_registry_cannot_be_asked(tmp_path):
    assert registry_verdict(Config(), {"name": "m", "version": "1"}) is None
