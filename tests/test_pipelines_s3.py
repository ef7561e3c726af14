"""The off-policy pipeline under kfp.local with its ``work_dir`` on moto's S3 server and a
real ``mlflow server`` (artifacts proxied to the same S3 server).

The first pipeline run is SIGKILLed in train as soon as its first checkpoint is committed
on S3 (``checkpoints/latest.json``): the pipeline fails, and nothing after train ran. The
rerun (``resume: true``) finds prepare's and the fanned-out cache's outputs on S3, resumes
train from the S3 checkpoint at the right step, then evaluates, registers and promotes, every
stage reading and writing the S3 work_dir.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import yaml
from _procs import descendants
from mlflow_server import MlflowServer

from kubedistill import storage

pytestmark = pytest.mark.timeout(900)


def _torchrun_pids() -> list[int]:
    """This test's torchrun launchers (and their workers), found under this process."""
    out = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"torch.distributed.run" in cmd:
            out += [pid, *descendants(pid)]
    return out


class KillAtFirstCheckpoint(threading.Thread):
    """Polls ``latest`` on S3; SIGKILLs torchrun and its workers once it exists."""

    def __init__(self, latest: str, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.latest, self.deadline = latest, time.monotonic() + timeout_s
        self.step: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        fs, path = storage.filesystem(self.latest)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            fs.invalidate_cache()
            if fs.exists(path):
                for pid in _torchrun_pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.step = json.loads(fs.cat_file(path))["step"]
                return
            time.sleep(0.02)


def _train_log(work: str) -> list[dict]:
    text = storage.read_bytes(storage.join(work, "train", "train_log.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines() if "train/loss" in line]


def test_off_policy_pipeline_on_s3_killed_in_train_resumes_and_promotes(
        s3_server, s3_bucket, tmp_path, tiny_model_dir, tiny_teacher_dir, monkeypatch):
    from kfp import local
    from mlflow import MlflowClient

    from kubedistill.pipelines.definitions import build
    from kubedistill.pipelines.targets import get_target

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KUBEDISTILL_SYSTEM_METRICS", "0")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    work = f"{s3_bucket}/run"
    server = MlflowServer(str(tmp_path / "mlflow.db"),
                          artifacts_destination=f"{s3_bucket}/mlartifacts",
                          s3_endpoint=s3_server).start()
    try:
        recipe = yaml.safe_dump({
            "model": {"teacher_name_or_path": tiny_teacher_dir,
                      "student_name_or_path": tiny_model_dir, "attn_implementation": "sdpa"},
            "data": {"train_dataset_path": "packaged:gsm8k-train",
                     "eval_dataset_path": "packaged:gsm8k-eval", "input_key": "question",
                     "output_key": "answer", "label_key": "label", "max_len": 256,
                     "prompt_max_len": 192, "max_samples": 24, "eval_max_samples": 4,
                     "preprocess_num_workers": 1},
            "train": {"num_gpus_per_node": 1, "device": "cpu", "train_batch_size": 4,
                      "micro_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 1},
            "cache": {"cache_dtype": "fp32", "cache_rows_per_shard": 8},
            "eval": {"eval_task": "gsm8k", "eval_num_generations": 2,
                     "eval_max_new_tokens": 8},
            "logging": {"logging_steps": 1},
            "tracking": {"tracking_uri": server.url, "experiment_name": "s3-e2e",
                         "registered_model_name": "s3-student"},
        })
        local.init(runner=local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
        job = build("off_policy_kd", get_target("local"))

        killer = KillAtFirstCheckpoint(storage.join(work, "checkpoints", "latest.json"))
        killer.start()
        try:
            with pytest.raises(RuntimeError):
                job(recipe=recipe, overrides=json.dumps({"name": "s3run"}), work_dir=work,
                    num_shards=2)
        finally:
            killer.stop.set()
            killer.join()
        assert killer.step == 1, "train was not killed at its first checkpoint"
        assert storage.exists(storage.join(work, "teacher_cache", "manifest.json"))
        assert not storage.exists(storage.join(work, "model", "train_summary.json"))
        assert not storage.exists(storage.join(work, "eval", "metrics.json"))

        job(recipe=recipe, overrides=json.dumps({"name": "s3run", "resume": True}),
            work_dir=work, num_shards=2)

        # step 1 was logged by the killed attempt, 2..6 by the resumed one (a fresh start
        # would have logged step 1 twice)
        steps = [r["step"] for r in _train_log(work)]
        assert steps == [1, 2, 3, 4, 5, 6]
        summary = storage.read_json(storage.join(work, "model", "train_summary.json"))
        prepared = storage.read_json(storage.join(work, "prepared", "manifest.json"))
        assert summary["world_size"] == 1 and summary["steps"] == 6
        assert summary["samples"] == prepared["splits"]["train"]["rows"]
        assert storage.exists(storage.join(work, "model", "model.safetensors"))
        latest = storage.read_json(storage.join(work, "checkpoints", "latest.json"))
        assert latest["step"] == 6
        metrics = storage.read_json(storage.join(work, "eval", "metrics.json"))
        assert metrics["teacher_signal"] == "cache"
        reg = storage.read_json(storage.join(work, "registry", "registration.json"))
        promo = storage.read_json(storage.join(work, "registry", "promotion.json"))
        assert reg["name"] == "s3-student" and reg["version"] == "1"
        assert promo["promoted"] is True and promo["champion"] == "1"
        client = MlflowClient(server.url, server.url)
        assert client.get_model_version_by_alias("s3-student", "champion").version == "1"
        tags = client.get_model_version("s3-student", "1").tags
        assert float(tags["score"]) == pytest.approx(metrics["score"])
    finally:
        server.stop()
