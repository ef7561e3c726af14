"""The MLflow tracker on the embedded sqlite store: parent + nested runs, params without
secrets, tags, artifacts, curves, system metrics; tracking off. (The server tests, including
the server killed in the middle of logging, are in test_tracking_server.py.)"""

from __future__ import annotations

import json
import os
import time

import pytest
from mlflow import MlflowClient

from kubedistill.config import Config
from kubedistill.tracking import NullTracker, make_tracker


def _cfg(work_dir, uri=None) -> Config:
    cfg = Config(name="tracktest")
    cfg.storage.work_dir = str(work_dir)
    cfg.tracking.tracking_uri = uri
    cfg.model.teacher_name_or_path = "packaged:smollm2-135m-instruct"
    return cfg


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_RETRY_INTERVAL", "0.5")
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_TIMEOUT", "2")
    monkeypatch.setenv("KUBEDISTILL_SYSTEM_METRICS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_embedded_store_parent_and_stage_runs(tmp_path, quick_retries, monkeypatch):
    monkeypatch.setenv("KUBEDISTILL_SYSTEM_METRICS", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = _cfg(tmp_path / "work")
    os.makedirs(tmp_path / "work" / "prepared")
    (tmp_path / "work" / "prepared" / "manifest.json").write_text('{"data_hash": "abc123"}')
    (tmp_path / "work" / "prepared" / "bad_rows.jsonl").write_text('{"row": 3}\n')
    tracker = make_tracker(cfg, "prepare")
    tracker.log_params({"hf_token": "s3cr3t", "extra": 1})
    for step in range(5):
        tracker.log_metrics({"train/loss": 5.0 - step, "lr": 1e-4}, step=step)
    time.sleep(0.5)  # let the system sampler log a sample or two
    tracker.close()
    second = make_tracker(cfg, "train")  # same work_dir: same parent run
    second.close("FAILED")

    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent_id = json.loads((tmp_path / "work" / "mlflow_parent_run.json").read_text())["run_id"]
    children = client.search_runs([tracker.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["prepare", "train"]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_run(second.run_id).info.status == "FAILED"
    params = run.data.params
    assert params["kd_ratio"] == "0.5" and params["extra"] == "1"
    assert "hf_token" not in params and not any("AWS" in k for k in params)
    tags = run.data.tags
    assert tags["data_hash"] == "abc123" and tags["teacher"] == cfg.model.teacher_name_or_path
    assert tags["kubedistill.version"] and tags["kubedistill.stage"] == "prepare"
    hist = client.get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in hist] == [0, 1, 2, 3, 4] and hist[-1].value == 1.0
    assert any(k.startswith("system/") for k in run.data.metrics)
    arts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config", "plots", "prepared"} <= arts
    names = {a.path for a in client.list_artifacts(tracker.run_id, "prepared")}
    assert names == {"prepared/manifest.json", "prepared/bad_rows.jsonl"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == \
        ["plots/metrics.png"]
    assert str(tmp_path / "work" / "mlartifacts") in run.info.artifact_uri


def test_tracking_off(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert isinstance(make_tracker(_cfg(tmp_path, "none"), "train"), NullTracker)
    monkeypatch.setenv("RANK", "1")
    assert isinstance(make_tracker(_cfg(tmp_path), "train"), NullTracker)


def test_plot_curves_from_train_log_records(tmp_path):
    from kubedistill.tracking.plots import curves, plot_curves, read_records

    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "train/loss": 3.0, "lr": 1e-3, "phase": "train"},
        {"step": 2, "train/loss": 2.5, "lr": 1e-3},
        {"step": 2, "eval/loss": 2.7},
        {"no_step": 1}]) + "\nnot json\n")
    records = read_records(str(log))
    assert len(records) == 4
    data = curves(records)
    assert data["train/loss"] == ([1.0, 2.0], [3.0, 2.5]) and "phase" not in data
    assert data["eval/loss"] == ([2.0], [2.7])
    out = plot_curves(records, str(tmp_path / "c.png"))
    assert out and (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([{"step": 1, "note": "x"}], str(tmp_path / "none.png")) is None
