"""Against a real ``mlflow server`` (sqlite, artifacts proxied to moto's S3 server), shared by
the module: evaluate -> register -> promote, the champion loads and generates; a worse second
run leaves champion alone and tags the decision; the server killed in the middle of logging
loses no metric; an unreachable registry fails with ServiceUnavailable after bounded retries."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid

import pytest
import torch
from mlflow import MlflowClient
from mlflow_server import MlflowServer, free_port
from test_evaluate_stage import make_cfg, prepare_qa

from kubedistill.config import Config
from kubedistill.errors import ServiceUnavailable
from kubedistill.models import load_tokenizer
from kubedistill.tracking import make_tracker

NAME = "kd-tiny-student"

pytestmark = pytest.mark.timeout(900)  # the evaluate/register test trains first


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    import s3fs

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    srv = MlflowServer(str(tmp_path_factory.mktemp("mlflow") / "mlflow.db"),
                       artifacts_destination=f"s3://{bucket}/mlartifacts", s3_endpoint=s3_server)
    srv.bucket = bucket
    with srv:
        yield srv


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("KUBEDISTILL_SYSTEM_METRICS", "0")
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_RETRIES", "3")
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_BACKOFF_S", "0.05")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@contextlib.contextmanager
def _outage(server: MlflowServer, seconds: float):
    """Stop the real server now; start it again ``seconds`` later, in the background, while
    the block runs; the block's end waits for the restart."""
    server.stop(kill=True)
    restart = threading.Timer(seconds, server.start)
    restart.start()
    try:
        yield
    finally:
        restart.join()
        server.start()  # no-op when the timer already did


def _worse_copy(model_dir: str, out: str) -> str:
    """Same model with logits sharpened 30x: a much higher cross-entropy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def _cfg(tmp, name, prepared, student, teacher, url, pipeline_run):
    cfg = make_cfg(tmp / name, prepared, student, teacher=teacher, n_gen=2, max_new=4)
    cfg.tracking.tracking_uri = url
    cfg.tracking.registered_model_name = NAME
    cfg.tracking.pipeline_run_id = pipeline_run
    return cfg


def _chain_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in (
        "kubedistill.data.prepare", "kubedistill.teacher.cache", "kubedistill.train.launch"))


def _train_student(cfg, tiny_model_dir) -> str:
    """prepare -> cache-teacher -> train (2 steps, 1 CPU process) on packaged GSM8K rows,
    tracked on the server; the trained student replaces ``cfg.train.save_path``."""
    from kubedistill.data.prepare import prepare
    from kubedistill.teacher.cache import cache_teacher
    from kubedistill.train.launch import train

    wd = cfg.storage.work_dir
    for k, v in dict(student_name_or_path=tiny_model_dir, prepared_path=f"{wd}/prepared",
                     teacher_cache_path=f"{wd}/teacher_cache",
                     train_dataset_path="packaged:gsm8k-train",
                     eval_dataset_path="packaged:gsm8k-eval", input_key="question",
                     output_key="answer", label_key="label", max_len=320, prompt_max_len=256,
                     max_samples=8, eval_max_samples=4, teacher_backend="hf",
                     cache_dtype="fp32", num_gpus_per_node=1, train_batch_size=4,
                     micro_train_batch_size=2, max_steps=2, logging_steps=1,
                     learning_rate=1e-3, save_path=f"{wd}/model", ckpt_path=f"{wd}/ckpt",
                     eval_task="gsm8k").items():
        cfg.set(k, v)
    prepare(cfg)
    cache_teacher(cfg)
    return train(cfg)


def test_evaluate_register_promote(tmp_path, server, fast, tiny_model_dir, tiny_teacher_dir,
                                   monkeypatch):
    """(prepare -> cache-teacher -> train ->) evaluate -> register -> promote; a worse run."""
    from kubedistill.evaluate.stage import evaluate
    from kubedistill.tracking.registry import promote, register

    prepared = prepare_qa(str(tmp_path / "prepared"), tiny_model_dir)
    client = MlflowClient(server.url, server.url)

    # run 1: first version becomes champion
    cfg1 = _cfg(tmp_path, "run1", prepared, tiny_model_dir, tiny_teacher_dir, server.url, "pr-1")
    chain = _chain_available()
    if chain:
        _train_student(cfg1, tiny_model_dir)
    metrics1 = evaluate(cfg1)
    assert metrics1["teacher_signal"] == ("cache" if chain else "live")
    reg1 = register(cfg1)
    assert reg1["version"] == "1" and reg1["score"] == metrics1["score"]
    again = register(cfg1)  # idempotent: same version, no second one
    assert again["version"] == "1" and again["run_id"] == reg1["run_id"]
    prom1 = promote(cfg1)
    assert prom1["promoted"] and "first version" in prom1["reason"]
    champ = client.get_model_version_by_alias(NAME, "champion")
    assert champ.version == "1"
    assert client.get_model_version_by_alias(NAME, "challenger").version == "1"
    tags = champ.tags
    assert tags["teacher"] == tiny_teacher_dir and tags["pipeline_run_id"] == "pr-1"
    assert tags["data_hash"] == metrics1["data_hash"] and tags["score_metric"] == "eval_ce"
    assert float(tags["score"]) == pytest.approx(metrics1["score"])
    assert tags["eval_data_hash"] == metrics1["eval_data_hash"]
    assert tags["promotion_decision"] == "promoted"
    saved = json.loads((tmp_path / "run1" / "registry" / "registration.json").read_text())
    assert saved["version"] == "1"

    # every stage logged its own nested run under the pipeline's parent run
    parent = json.loads((tmp_path / "run1" / "mlflow_parent_run.json").read_text())["run_id"]
    kids = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    assert {"evaluate", "register"} <= set(kids)
    ev = kids["evaluate"]
    assert ev.data.metrics["eval_ce"] == pytest.approx(metrics1["eval_ce"])
    assert {a.path for a in client.list_artifacts(ev.info.run_id, "eval")} == \
        {"eval/metrics.json", "eval/generations.jsonl"}
    if chain:  # the trainer logs through make_tracker; its run carries its inputs' manifests
        tr = kids["train"].info.run_id
        assert len(client.get_metric_history(tr, "train/loss")) == 2
        arts = {a.path for d in ("plots", "prepared", "teacher_cache")
                for a in client.list_artifacts(tr, d)}
        assert {"plots/train_curves.png", "prepared/manifest.json", "prepared/bad_rows.jsonl",
                "teacher_cache/manifest.json"} <= arts

    # artifacts went through the server to S3
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.s3_endpoint})
    assert any(p.endswith("model.safetensors") for p in fs.find(f"{server.bucket}/mlartifacts"))

    # the champion loads through the alias and generates
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)  # for the fluent loader only
    pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    out = pipe("What is 2 + 3?", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and len(out[0]["generated_text"]) > 0

    # run 2: a worse student (same eval data) is registered as challenger but not promoted
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    worse = _worse_copy(cfg1.train.save_path, str(tmp_path / "worse"))
    cfg2 = _cfg(tmp_path, "run2", cfg1.prepared_path, worse, tiny_teacher_dir, server.url,
                "pr-2")
    cfg2.eval.eval_task = cfg1.eval.eval_task
    cfg2.storage.teacher_cache_path = cfg1.teacher_cache_path
    metrics2 = evaluate(cfg2)
    assert metrics2["score"] > metrics1["score"]  # CE: lower is better
    assert metrics2["eval_data_hash"] == metrics1["eval_data_hash"]
    # the REAL server is down when register starts and comes back a few seconds later
    # (same port, same sqlite file): the bounded retries finish the registration
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_RETRIES", "6")
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_BACKOFF_S", "1")
    with _outage(server, seconds=3.0):
        reg2 = register(cfg2)
    assert reg2["version"] == "2"
    # a rerun after another outage (a retried pod) reuses the same registration: no third
    # version and no second logged model
    with _outage(server, seconds=3.0):
        again2 = register(cfg2)
    assert again2["version"] == "2" and again2["run_id"] == reg2["run_id"]
    exp_id = client.get_run(reg2["run_id"]).info.experiment_id
    logged = client.search_logged_models([exp_id], f"source_run_id = '{reg2['run_id']}'")
    assert len(logged) == 1
    prom2 = promote(cfg2)
    assert not prom2["promoted"] and "does not beat" in prom2["reason"]
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    assert client.get_model_version_by_alias(NAME, "challenger").version == "2"
    v2 = client.get_model_version(NAME, "2").tags
    assert v2["promotion_decision"] == "rejected"
    assert float(v2["champion_score"]) == pytest.approx(metrics1["score"])
    assert float(v2["challenger_score"]) == pytest.approx(metrics2["score"])
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
    promo = json.loads((tmp_path / "run2" / "registry" / "promotion.json").read_text())
    assert promo["promoted"] is False and promo["champion"] == "1"


def test_server_killed_mid_training(tmp_path, server, monkeypatch, caplog):
    """Kill the server (SIGKILL) while a training loop logs, keep logging, restart it on the
    same port and sqlite file: every metric arrives and the user saw exactly one warning."""
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_RETRY_INTERVAL", "0.5")
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_TIMEOUT", "2")
    monkeypatch.setenv("KUBEDISTILL_SYSTEM_METRICS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(name="killtest")
    cfg.storage.work_dir = str(tmp_path / "work")
    cfg.tracking.tracking_uri = server.url
    tracker = make_tracker(cfg, "train")
    caplog.set_level(logging.INFO)
    caplog.clear()
    spooled = 0
    for step in range(40):
        if step == 10:
            server.stop(kill=True)
        if step == 25:
            with open(tracker.spool_path) as f:  # the outage's metrics are on disk too
                spooled = len(f.readlines())
            t0 = time.monotonic()
            server.start()
            restart_s = time.monotonic() - t0
        t0 = time.monotonic()
        tracker.log_metrics({"loss": 10.0 - 0.1 * step, "grad_norm": 1.0}, step=step)
        assert time.monotonic() - t0 < 5  # a step is never held up for long
        time.sleep(0.05)
    assert spooled == 2 * 15
    assert not os.path.exists(tracker.spool_path)  # flushed after the restart
    tracker.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"MLflow at {server.url} unreachable; buffering" in warnings[0].getMessage()

    client = MlflowClient(server.url)
    hist = client.get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(40)), restart_s
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_registry_unreachable(tmp_path, fast, tiny_model_dir, caplog):
    from kubedistill.tracking.registry import promote, register

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    cfg = make_cfg(tmp_path / "w", tmp_path / "prepared", tiny_model_dir)
    cfg.tracking.tracking_uri = url
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="unreachable while registering.*3 attempts"):
        register(cfg)
    assert time.monotonic() - t0 < 20
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2
    assert not os.path.exists(tmp_path / "w" / "registry" / "registration.json")

    os.makedirs(tmp_path / "w" / "registry")
    (tmp_path / "w" / "registry" / "registration.json").write_text(
        json.dumps({"name": NAME, "version": "1"}))
    with pytest.raises(ServiceUnavailable, match="promoting"):
        promote(cfg)
    assert not os.path.exists(tmp_path / "w" / "registry" / "promotion.json")
