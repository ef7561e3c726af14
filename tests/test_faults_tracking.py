"""Fault suite, tracking heals, against a real ``mlflow server`` that is stopped and restarted
(no MLflow client is patched):

- MLflow down across the end of the train stage: the stage waits ``tracking_end_wait_s``,
  exits 0, and keeps what it could not send; `kubedistill tracking sync` exits 5 while the
  server is down; once it is back, the next stage sends it, ends the run FINISHED, and the
  run's metrics in MLflow equal ``train_log.jsonl``. Before: RUNNING with part of the metrics,
  the rest in a spool file nothing ever sent.
- A stage SIGKILLed with its run open: the exit handler (close-run) ends it FAILED, with the
  metrics it logged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from kubedistill.config import Config
from kubedistill.tracking import make_tracker


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(str(tmp_path / "mlflow" / "mlflow.db"))
    os.makedirs(tmp_path / "mlflow", exist_ok=True)
    srv.start()
    yield srv
    srv.stop(kill=True)


@pytest.fixture
def quick_tracking(monkeypatch):
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_RETRY_INTERVAL", "0.5")
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_TIMEOUT", "2")
    monkeypatch.setenv("KUBEDISTILL_SYSTEM_METRICS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from _prepared import random_splits

    return random_splits(str(tmp_path_factory.mktemp("prepared")),
                         {"train": 32, "eval": 4}, length=24, prompt_len=4)


def _history(client: MlflowClient, run_id: str) -> dict[tuple[str, int], float]:
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            out[(key, m.step)] = m.value
    return out


def test_mlflow_down_across_the_end_of_train(tmp_path, server, quick_tracking, tiny_model_dir,
                                             prepared):
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "kubedistill.cli", "train", "--student_name_or_path",
           tiny_model_dir, "--prepared_path", prepared, "--kd_algorithm", "sft",
           "--num_gpus_per_node", "1", "--train_batch_size", "2", "--micro_train_batch_size",
           "1", "--num_epochs", "1", "--save_steps", "4", "--logging_steps", "1",
           "--learning_rate", "1e-3", "--work_dir", str(work), "--save_path",
           str(work / "model"), "--ckpt_path", str(work / "ckpt"), "--tracking_uri",
           server.url, "--device", "cpu", "--tracking_end_wait_s", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stage = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    latest = work / "ckpt" / "latest.json"
    deadline = time.monotonic() + 300
    while not latest.exists():  # a few steps reached MLflow; now it goes away
        assert stage.poll() is None and time.monotonic() < deadline, stage.stdout.read()
        time.sleep(0.05)
    server.stop(kill=True)
    out, _ = stage.communicate(timeout=300)
    assert stage.returncode == 0, out[-3000:]
    assert "still unreachable at the end of stage train after waiting 1s" in out
    journals = list((work / "mlflow_spool").glob("train-*.run.json"))
    assert len(journals) == 1 and json.loads(journals[0].read_text())["status"] == "FINISHED"

    sync = subprocess.run([sys.executable, "-m", "kubedistill.cli", "tracking", "sync",
                           str(work)], env=env, capture_output=True, text=True, timeout=120)
    assert sync.returncode == 5 and "Traceback" not in sync.stderr, sync.stderr[-2000:]
    assert f"MLflow at {server.url} is unreachable" in sync.stderr

    server.start()
    cfg = Config()
    cfg.storage.work_dir, cfg.tracking.tracking_uri = str(work), server.url
    nxt = make_tracker(cfg, "evaluate")  # the next stage of the same pipeline run
    nxt.close()
    assert list((work / "mlflow_spool").glob("*")) == []

    client = MlflowClient(server.url)
    journal = json.loads(journals[0].read_text()) if journals[0].exists() else None
    assert journal is None
    exp = client.get_experiment_by_name("kubedistill")
    train_runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'train'")
    assert len(train_runs) == 1
    run = train_runs[0]
    assert run.info.status == "FINISHED"
    logged = [json.loads(x) for x in (work / "train" / "train_log.jsonl").read_text().splitlines()]
    expected = {(k, r["step"]): v for r in logged for k, v in r.items() if k != "step"}
    got = {k: v for k, v in _history(client, run.info.run_id).items() if k[0] in
           {key for key, _ in expected}}
    assert len(expected) > 16 and got == pytest.approx(expected)


DEAD_STAGE = """
import os, signal, sys
from kubedistill.config import Config
from kubedistill.tracking import make_tracker
cfg = Config(name="dead")
cfg.storage.work_dir, cfg.tracking.tracking_uri = sys.argv[1], sys.argv[2]
cfg.tracking.pipeline_run_id = "pr-dead"
tracker = make_tracker(cfg, "cache-teacher")
for step in range(5):
    tracker.log_metrics({"tokens_per_s": 100.0 + step}, step=step)
print(tracker.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_run_left_running_by_a_killed_stage_is_ended_failed(tmp_path, server,
                                                            quick_tracking):
    from kubedistill.components import steps

    work = str(tmp_path / "w")
    proc = subprocess.run([sys.executable, "-c", DEAD_STAGE, work, server.url],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KUBEDISTILL_SYSTEM_METRICS": "0"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_id = proc.stdout.split()[0]
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "RUNNING"  # what the dead stage left
    steps.close_run("pr-dead", "FAILED", recipe="name: dead\n",
                    overrides=json.dumps({"tracking_uri": server.url}), work_dir=work)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    hist = client.get_metric_history(run_id, "tokens_per_s")
    assert sorted((m.step, m.value) for m in hist) == [(s, 100.0 + s) for s in range(5)]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert not os.listdir(os.path.join(work, "mlflow_spool"))
