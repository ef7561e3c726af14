"""The VLM pipelines end to end under kfp.local, on tiny VLMs and the real tuxpaint captions
(``packaged:captions-train`` / ``-eval``; skipped without the stamps: ``make tuxpaint``):

- off-policy, both families: prepare (images stored, hashed) -> cache-teacher (the teacher
  reads the images) -> train -> evaluate (image metrics) -> register -> promote; the
  champion alias lands on the registered version;
- on-policy (Idefics3): prepare -> on-policy train (hf rollout with pixels, live teacher
  with the images) -> evaluate -> register -> promote.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from kubedistill.data.demo_vlm import stamps_dir
from kubedistill.models.tiny_vlm import build_tiny_vlm

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(stamps_dir() is None, reason="the tuxpaint stamps are not "
                                 "unpacked (run `make tuxpaint`)")]


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KUBEDISTILL_DATA_CACHE", str(tmp_path / "data-cache"))
    return monkeypatch


def _recipe(tmp_path: Path, family: str, **extra) -> tuple[str, Path]:
    teacher = build_tiny_vlm(str(tmp_path / "teacher"), family, seed=0)
    student = build_tiny_vlm(str(tmp_path / "student"), family, seed=1)
    work = tmp_path / "run"
    body = {
        "model": {"teacher_name_or_path": teacher, "student_name_or_path": student,
                  "attn_implementation": "sdpa"},
        "data": {"train_dataset_path": "packaged:captions-train",
                 "eval_dataset_path": "packaged:captions-eval", "input_key": "messages",
                 "image_key": "image", "max_len": 160, "max_samples": 8,
                 "eval_max_samples": 4, "preprocess_num_workers": 1},
        "train": {"num_gpus_per_node": 1, "device": "cpu", "train_batch_size": 4,
                  "micro_train_batch_size": 2, "learning_rate": 1e-3},
        "cache": {"cache_dtype": "fp32"},
        "eval": {"eval_task": "rouge", "eval_metric": "eval_ce", "eval_num_generations": 2,
                 "eval_max_new_tokens": 4},
        "tracking": {"experiment_name": f"vlm-{family}",
                     "registered_model_name": f"vlm-{family}"},
        "storage": {"work_dir": str(work)},
    }
    for section, values in extra.items():
        body.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path), work


def _check_outputs(work: Path, name: str, text: str) -> dict:
    from mlflow import MlflowClient

    prepared = json.loads((work / "prepared" / "manifest.json").read_text())
    assert prepared["data_hash"]
    import pyarrow.parquet as pq

    table = pq.read_table(work / "prepared" / "train.parquet").to_pylist()
    assert table and all(r["images"] and len(r["image_sha256"]) == 1 for r in table)
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["eval_image_samples"] == metrics["eval_samples"] == 4
    assert metrics["eval_images"] == 4
    for key in ("eval_ce", "eval_kl", "eval_top1_agreement", "eval_rouge_l",
                "teacher_eval_rouge_l"):
        assert isinstance(metrics[key], float), (key, metrics)
    assert metrics["eval_kl"] > 0  # two different random models
    reg = json.loads((work / "registry" / "registration.json").read_text())
    promo = json.loads((work / "registry" / "promotion.json").read_text())
    assert reg["name"] == name and promo["promoted"] is True, text
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    assert str(client.get_model_version_by_alias(name, "champion").version) == reg["version"]
    return metrics


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_vlm_off_policy_pipeline(tmp_path, env, family):
    from kubedistill.pipelines.local import run

    recipe, work = _recipe(tmp_path, family)
    out = io.StringIO()
    ok, _ = run(recipe, out=out)
    assert ok, out.getvalue()
    cache = json.loads((work / "teacher_cache" / "manifest.json").read_text())
    assert cache["shards"]
    metrics = _check_outputs(work, f"vlm-{family}", out.getvalue())
    assert metrics["teacher_signal"] == "cache"


def test_vlm_on_policy_pipeline(tmp_path, env):
    from kubedistill.pipelines.local import run

    recipe, work = _recipe(tmp_path, "idefics3",
                           kd={"kd_algorithm": "vanilla_kd", "kd_loss_fn": "rkl",
                               "kd_ratio": 1.0},
                           rollout={"rollout_num_engines": 1, "rollout_batch_size": 4,
                                    "generate_max_len": 6})
    out = io.StringIO()
    ok, _ = run(recipe, pipeline="on_policy_kd", out=out)
    assert ok, out.getvalue()
    assert not (work / "teacher_cache" / "manifest.json").exists()
    _check_outputs(work, "vlm-idefics3", out.getvalue())
