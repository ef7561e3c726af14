"""The register component's gate (what `dsl.If` tests before promote): the registry's own
rule applied to the new version and the current champion, on a real local MLflow store."""

from __future__ import annotations

from kubedistill.components.steps import promotion_decision, registry_verdict
from kubedistill.config import Config


def _version(client, name: str, score: float, source: str = "file:///tmp/none") -> str:
    tags = {"score": str(score), "score_metric": "eval_ce", "higher_is_better": "false",
            "eval_data_hash": "h1"}
    mv = client.create_model_version(name, source=source, tags=tags)
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
    assert beats is False and reason == ("eval_ce 2.5 does not beat champion 2 by at least "
                                         "min_improvement=0 (lower is better)")
    assert promotion_decision({"beats_champion": beats}) == "keep"
    better = _version(client, "m", 1.5)
    beats, _ = registry_verdict(cfg, {"tracking_uri": uri, "name": "m", "version": better})
    assert beats is True


def test_gate_with_a_higher_is_better_metric_and_min_improvement(tmp_path):
    """eval_accuracy (higher is better): a lower score keeps the champion, a higher one by
    less than min_improvement keeps it too, one by more promotes."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("acc")

    def version(score: float) -> str:
        tags = {"score": str(score), "score_metric": "eval_accuracy", "higher_is_better": "true",
                "eval_data_hash": "h1"}
        return str(client.create_model_version("acc", source="file:///tmp/none",
                                               tags=tags).version)

    client.set_registered_model_alias("acc", "champion", version(0.50))
    cfg = Config()
    cfg.eval.min_improvement = 0.05

    def verdict(score: float) -> tuple[bool, str]:
        return registry_verdict(cfg, {"tracking_uri": uri, "name": "acc",
                                      "version": version(score)})

    lower, small, large = verdict(0.40), verdict(0.53), verdict(0.60)
    assert lower[0] is False and "(higher is better)" in lower[1]
    assert small[0] is False and "min_improvement=0.05" in small[1]
    assert large == (True, "eval_accuracy 0.6 beats champion 0.5 by 0.1")
    assert [promotion_decision({"beats_champion": v[0]}) for v in (lower, small, large)] == \
        ["keep", "keep", "promote"]


def test_gate_unknown_when_the_registry_cannot_be_asked(tmp_path):
    assert registry_verdict(Config(), {"name": "m", "version": "1"}) is None


NO_FILES = "s3://kubedistill-gate-test/none"  # a server refuses local sources outside a run


def test_unreachable_registry_gate_runs_promote_which_exits_5_and_keeps_champion(
        tmp_path, monkeypatch):
    """A real ``mlflow server``, stopped after registration: the register component cannot
    ask the registry (verdict unknown), so its If-branch says 'promote'; the promote stage
    re-checks, stays unreachable, exits 5 (ServiceUnavailable) and writes no promotion.json;
    ``champion`` has not moved when the server is back, and a promote then does move it (the
    challenger really is better, so only the outage kept it back)."""
    import json
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient
    from mlflow_server import MlflowServer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the verdict's own client
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    server = MlflowServer(str(tmp_path / "mlflow.db")).start()
    try:
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        client.create_registered_model("gate")
        v1 = _version(client, "gate", 2.0, NO_FILES)
        client.set_registered_model_alias("gate", "champion", v1)
        v2 = _version(client, "gate", 1.5, NO_FILES)  # better: eval_ce, lower is better
        work = tmp_path / "work"
        (work / "registry").mkdir(parents=True)
        reg = {"tracking_uri": server.url, "name": "gate", "version": v2, "score": 1.5}
        (work / "registry" / "registration.json").write_text(json.dumps(reg))
        server.stop()

        assert registry_verdict(Config(), reg) is None
        assert promotion_decision(reg) == "promote"
        env = dict(KUBEDISTILL_MLFLOW_RETRIES="2", KUBEDISTILL_MLFLOW_BACKOFF_S="0.05",
                   KUBEDISTILL_SYSTEM_METRICS="0")
        cmd = [sys.executable, "-m", "kubedistill.cli", "promote", "--work_dir", str(work),
               "--tracking_uri", server.url]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 5, proc.stderr[-2000:]
        assert "unreachable while promoting" in proc.stderr
        assert not (work / "registry" / "promotion.json").exists()

        server.start()
        assert client.get_model_version_by_alias("gate", "champion").version == v1
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert client.get_model_version_by_alias("gate", "champion").version == v2
    finally:
        server.stop()
