"""`kubedistill run`: the off-policy KFP pipeline executed by kfp.local.

- plumbing, with stand-in stages (tests/test_pipelines_fakes.py): fan-out over 2 shards,
  collected merge, If-gated promote, exit handler closing the MLflow parent run FINISHED,
  one progress line per stage start/end, the summary; a failing stage closes it FAILED;
- end to end with the real stages on tiny models (2-3 layer Llamas with the SmolLM2
  tokenizer) and real GSM8K rows: manifests, model, metrics, registry aliases.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml

from kubedistill.pipelines.local import run

STAGES = ("prepare", "cache-teacher[1/2]", "cache-teacher[2/2]", "merge-cache", "train",
          "evaluate", "register", "promote")


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "KUBEDISTILL_STAGE_IMPL", "FAKE_FAIL_STAGE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def fakes(clean_env):
    from test_pipelines_fakes import impl_env

    for key, value in impl_env().items():
        clean_env.setenv(key, value)
    return clean_env


def _recipe(tmp_path: Path, body: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def _parent_runs(work_dir: Path, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`kubedistill.role` = 'parent'")


def _progress(text: str) -> dict[str, list[str]]:
    events: dict[str, list[str]] = {}
    for stage, what in re.findall(r"^  \[\d\d:\d\d:\d\d\] (\S+)\s+(started|done|FAILED)",
                                  text, re.M):
        events.setdefault(stage, []).append(what)
    return events


def test_plumbing_with_stand_in_stages(tmp_path, fakes):
    work = tmp_path / "work"
    recipe = _recipe(tmp_path, {"storage": {"work_dir": str(work)},
                                "tracking": {"experiment_name": "plumbing"}})
    out = io.StringIO()
    ok, run_dir = run(recipe, {"num_shards": 2}, out=out)
    text = out.getvalue()
    assert ok, text
    assert run_dir == work
    progress = _progress(text)
    for stage in STAGES:
        assert progress[stage] == ["started", "done"], (stage, text)
    lines = text.splitlines()  # header (2 lines), progress lines only, then the summary
    end = next(i for i, line in enumerate(lines) if "SUCCEEDED in" in line)
    assert all(re.match(r"^  \[\d\d:\d\d:\d\d\] ", line) for line in lines[2:end])
    merged = json.loads((work / "teacher_cache" / "manifest.json").read_text())
    assert merged["shards"] == ["shard-00000.manifest.json", "shard-00001.manifest.json"]
    assert (work / "registry" / "promotion.json").exists()
    assert json.loads((work / "model" / "config.json").read_text()) == {
        "algorithm": "vanilla_kd"}
    # the KFP artifacts point at the storage URIs
    artifact = next((work / "kfp").glob("*/merge-cache/teacher_cache"))
    assert json.loads(artifact.read_text())["shards"] == merged["shards"]
    parents = _parent_runs(work, "plumbing")
    assert [r.info.status for r in parents] == ["FINISHED"]
    reg = json.loads((work / "registry" / "registration.json").read_text())
    assert reg["parent_run_id"] == parents[0].info.run_id
    assert f"mlflow ui --backend-store-uri sqlite:///{work}/mlflow.db" in text
    assert (work / "pipeline.log").stat().st_size > 0


def test_failing_stage_closes_the_parent_run_failed(tmp_path, fakes):
    fakes.setenv("FAKE_FAIL_STAGE", "train")
    work = tmp_path / "work"
    recipe = _recipe(tmp_path, {"storage": {"work_dir": str(work)},
                                "tracking": {"experiment_name": "failing"}})
    out = io.StringIO()
    ok, _ = run(recipe, out=out)
    text = out.getvalue()
    assert not ok
    assert _progress(text)["train"] == ["started", "FAILED"]
    assert "evaluate" not in _progress(text)
    assert "RuntimeError: fake failure in train" in text
    assert [r.info.status for r in _parent_runs(work, "failing")] == ["FAILED"]
    assert re.search(r"^kubedistill run recipe: FAILED in \d+s$", text, re.M)


def test_off_policy_end_to_end_on_tiny_models(tmp_path, clean_env, tiny_model_dir,
                                              tiny_teacher_dir):
    from mlflow import MlflowClient

    work = tmp_path / "run"
    recipe = _recipe(tmp_path, {
        "model": {"teacher_name_or_path": tiny_teacher_dir,
                  "student_name_or_path": tiny_model_dir, "attn_implementation": "sdpa"},
        "data": {"train_dataset_path": "packaged:gsm8k-train",
                 "eval_dataset_path": "packaged:gsm8k-eval", "input_key": "question",
                 "output_key": "answer", "label_key": "label", "max_len": 256,
                 "prompt_max_len": 192, "max_samples": 12, "eval_max_samples": 4,
                 "preprocess_num_workers": 1},
        "train": {"num_gpus_per_node": 1, "device": "cpu", "train_batch_size": 4,
                  "micro_train_batch_size": 2, "learning_rate": 1e-3},
        "cache": {"cache_dtype": "fp32", "cache_rows_per_shard": 4},
        "eval": {"eval_task": "gsm8k", "eval_num_generations": 2, "eval_max_new_tokens": 8},
        "tracking": {"experiment_name": "e2e", "registered_model_name": "tiny-student"},
        "storage": {"work_dir": str(work)},
    })
    out = io.StringIO()
    ok, _ = run(recipe, {"num_shards": 2}, out=out)
    text = out.getvalue()
    assert ok, text
    progress = _progress(text)
    for stage in STAGES:
        assert progress[stage] == ["started", "done"], (stage, text)
    # manifests
    prepared = json.loads((work / "prepared" / "manifest.json").read_text())
    assert prepared["data_hash"] and (work / "prepared" / "train.parquet").exists()
    cache = json.loads((work / "teacher_cache" / "manifest.json").read_text())
    assert cache["schema_version"] == 1 and len(cache["shards"]) >= 2
    # model
    model = work / "model"
    assert (model / "config.json").exists() and list(model.glob("*.safetensors"))
    # metrics: file, KFP Metrics artifact, summary line
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert isinstance(metrics["score"], float)
    eval_out = next((work / "kfp").glob("*/evaluate/executor_output.json")).read_text()
    assert "eval_ce" in eval_out
    assert "metrics:" in text and "score=" in text
    # registry: first version is challenger and (no champion yet) champion
    reg = json.loads((work / "registry" / "registration.json").read_text())
    promo = json.loads((work / "registry" / "promotion.json").read_text())
    assert reg["name"] == "tiny-student" and promo["promoted"] is True
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    for alias in ("challenger", "champion"):
        version = client.get_model_version_by_alias("tiny-student", alias).version
        assert str(version) == reg["version"]
    assert [r.info.status for r in _parent_runs(work, "e2e")] == ["FINISHED"]
