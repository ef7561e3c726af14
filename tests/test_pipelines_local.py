"""`kubedistill run`: the off-policy KFP pipeline executed by kfp.local.

- end to end with the real stages on tiny models (2-3 layer Llamas with the SmolLM2
  tokenizer) and real GSM8K rows: fan-out over 2 shards, collected merge, If-gated promote,
  exit handler closing the MLflow parent run FINISHED, one progress line per stage
  start/end, the summary, manifests, model, metrics, registry aliases;
- a real failure (missing input data) closes the parent run FAILED.
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

pytestmark = pytest.mark.timeout(900)  # whole kfp.local pipelines (the sft test runs two)


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI",):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


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


def test_failing_stage_closes_the_parent_run_failed(tmp_path, clean_env):
    """A real failure (the training data does not exist): prepare fails, nothing after it
    runs, and the exit handler still closes the MLflow parent run as FAILED."""
    work = tmp_path / "work"
    recipe = _recipe(tmp_path, {
        "model": {"teacher_name_or_path": "packaged:smollm2-135m-instruct"},
        "data": {"train_dataset_path": str(tmp_path / "missing.jsonl")},
        "storage": {"work_dir": str(work)},
        "tracking": {"experiment_name": "failing"}})
    out = io.StringIO()
    ok, _ = run(recipe, out=out)
    text = out.getvalue()
    assert not ok
    assert _progress(text)["prepare"] == ["started", "FAILED"]
    assert "train" not in _progress(text)
    assert "missing.jsonl" in text
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
    assert cache["schema_version"] == 2 and len(cache["shards"]) >= 2
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
    parents = _parent_runs(work, "e2e")
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert reg["parent_run_id"] == parents[0].info.run_id
    # progress lines only between the header and the summary; KFP artifacts point at URIs
    lines = text.splitlines()
    end = next(i for i, line in enumerate(lines) if "SUCCEEDED in" in line)
    assert all(re.match(r"^  \[\d\d:\d\d:\d\d\] ", line) for line in lines[2:end])
    artifact = next((work / "kfp").glob("*/merge-cache/teacher_cache"))
    assert json.loads(artifact.read_text())["shards"] == cache["shards"]
    assert f"mlflow ui --backend-store-uri sqlite:///{work}/mlflow.db" in text
    assert (work / "pipeline.log").stat().st_size > 0


@pytest.mark.parametrize("teacher, algorithm", [("tiny_teacher_dir", "vanilla_kd"),
                                                ("qwen_tiny_teacher", "simple_ctkd")],
                         ids=["same-tokenizer", "cross-tokenizer"])
def test_on_policy_pipeline_end_to_end_on_tiny_models(tmp_path, clean_env, tiny_model_dir,
                                                      request, teacher, algorithm):
    """on_policy_kd under kfp.local: prepare -> on-policy train (hf rollout + live hf
    teacher, no cache) -> evaluate -> register -> promote, on tiny models; with a teacher
    of the same tokenizer and with one of another tokenizer (the real Qwen2.5 one)."""
    work = tmp_path / "run"
    recipe = _recipe(tmp_path, {
        "model": {"teacher_name_or_path": request.getfixturevalue(teacher),
                  "student_name_or_path": tiny_model_dir, "attn_implementation": "sdpa"},
        "data": {"train_dataset_path": "packaged:gsm8k-train",
                 "eval_dataset_path": "packaged:gsm8k-eval", "input_key": "question",
                 "output_key": "answer", "label_key": "label", "max_len": 256,
                 "prompt_max_len": 192, "max_samples": 8, "eval_max_samples": 2},
        "train": {"num_gpus_per_node": 1, "device": "cpu", "train_batch_size": 4,
                  "micro_train_batch_size": 2, "learning_rate": 1e-3},
        "kd": {"kd_algorithm": algorithm, "kd_loss_fn": "rkl", "kd_ratio": 1.0},
        "rollout": {"rollout_num_engines": 1, "rollout_batch_size": 4,
                    "generate_max_len": 6, "print_rollout_sample": True},
        "eval": {"eval_task": "gsm8k", "eval_num_generations": 1, "eval_max_new_tokens": 4},
        "tracking": {"experiment_name": "e2e-on-policy",
                     "registered_model_name": "tiny-on-policy"},
        "storage": {"work_dir": str(work)},
    })
    out = io.StringIO()
    ok, _ = run(recipe, pipeline="on_policy_kd", out=out)
    text = out.getvalue()
    assert ok, text
    progress = _progress(text)
    for stage in ("prepare", "train", "evaluate", "register", "promote"):
        assert progress[stage] == ["started", "done"], (stage, text)
    assert "cache-teacher" not in progress
    samples = (work / "train" / "rollout_samples.jsonl").read_text().splitlines()
    assert samples and all(json.loads(s)["response_len"] <= 6 for s in samples)
    assert list((work / "model").glob("*.safetensors"))
    reg = json.loads((work / "registry" / "registration.json").read_text())
    assert reg["name"] == "tiny-on-policy"
    assert json.loads((work / "registry" / "promotion.json").read_text())["promoted"] is True
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["eval_kl"] > 0 and metrics["eval_kl_space"] == (
        "shared_vocab_aligned" if algorithm == "simple_ctkd" else "full_vocab")


def test_sft_pipeline_twice_second_run_keeps_the_champion(tmp_path, clean_env, tiny_model_dir):
    """The sft pipeline end to end under kfp.local (prepare -> train -> evaluate -> register
    -> promote, no teacher), scored by a higher-is-better metric (eval_rouge_l); the same
    recipe run again into the same registry ties, so register decides 'keep': the If-branch
    skips promote, champion stays version 1 and version 2 is only challenger."""
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path}/registry.db"
    body = {
        "model": {"student_name_or_path": tiny_model_dir, "attn_implementation": "sdpa"},
        "data": {"train_dataset_path": "packaged:gsm8k-train",
                 "eval_dataset_path": "packaged:gsm8k-eval", "input_key": "question",
                 "output_key": "answer", "max_len": 192, "max_samples": 8,
                 "eval_max_samples": 3, "preprocess_num_workers": 1},
        "train": {"num_gpus_per_node": 1, "device": "cpu", "train_batch_size": 4,
                  "micro_train_batch_size": 2, "learning_rate": 1e-3, "seed": 3},
        "kd": {"kd_algorithm": "sft", "kd_ratio": 0.0},
        "eval": {"eval_task": "rouge", "eval_metric": "eval_rouge_l",
                 "eval_num_generations": 3, "eval_max_new_tokens": 6},
        "tracking": {"tracking_uri": db, "experiment_name": "sft-e2e",
                     "registered_model_name": "tiny-sft"},
    }
    runs = []
    for name in ("first", "second"):
        work = tmp_path / name
        recipe = _recipe(tmp_path, {**body, "storage": {"work_dir": str(work)}})
        out = io.StringIO()
        ok, _ = run(recipe, pipeline="sft", out=out)
        assert ok, out.getvalue()
        runs.append((work, _progress(out.getvalue())))
    (first, p1), (second, p2) = runs
    for progress in (p1, p2):
        for stage in ("prepare", "train", "evaluate", "register"):
            assert progress[stage] == ["started", "done"], stage
        assert "cache-teacher" not in progress and "merge-cache" not in progress
    assert p1["promote"] == ["started", "done"] and "promote" not in p2
    m1, m2 = (json.loads((w / "eval" / "metrics.json").read_text()) for w in (first, second))
    assert m1["score_metric"] == "eval_rouge_l" and m1["higher_is_better"] is True
    # measured: 0.0 both times (6 greedy tokens of a 2-step tiny student share no word
    # with the references); the tie is what makes the second run 'keep'
    assert m1["eval_data_hash"] == m2["eval_data_hash"] and m2["score"] == m1["score"] == 0.0
    assert "teacher_eval_ce" not in m1  # sft: no teacher anywhere
    reg2 = json.loads(next((second / "kfp").glob("*/register/registration")).read_text())
    assert reg2["version"] == "2" and reg2["decision"] == "keep"  # the If-branch's input
    assert reg2["beats_champion"] is False and "does not beat" in reg2["decision_reason"]
    assert not (second / "registry" / "promotion.json").exists()
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    assert str(client.get_model_version_by_alias("tiny-sft", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tiny-sft", "challenger").version) == "2"


def test_off_policy_pipeline_trains_from_a_top_k_only_cache(tmp_path, clean_env,
                                                             tiny_model_dir, tiny_teacher_dir):
    """teacher_signal topk under kfp.local: the cache holds top-8 ids + log-probs and no
    hidden states or head; train reads them through the top-k KD loss (kd > 0 logged)."""
    work = tmp_path / "run"
    recipe = _recipe(tmp_path, {
        "model": {"teacher_name_or_path": tiny_teacher_dir,
                  "student_name_or_path": tiny_model_dir, "attn_implementation": "sdpa"},
        "data": {"train_dataset_path": "packaged:gsm8k-train",
                 "eval_dataset_path": "packaged:gsm8k-eval", "input_key": "question",
                 "output_key": "answer", "label_key": "label", "max_len": 256,
                 "prompt_max_len": 192, "max_samples": 8, "eval_max_samples": 2,
                 "preprocess_num_workers": 1, "packing_samples": True},
        "train": {"num_gpus_per_node": 1, "device": "cpu", "train_batch_size": 4,
                  "micro_train_batch_size": 2, "learning_rate": 1e-3,
                  "use_dynamic_bsz": True, "max_token_len_per_gpu": 512},
        "kd": {"kd_loss_fn": "jsd", "kd_ratio": 0.9},
        "cache": {"teacher_signal": "topk", "cache_topk": 8, "cache_rows_per_shard": 4},
        "eval": {"eval_task": "gsm8k", "eval_num_generations": 1, "eval_max_new_tokens": 4},
        "tracking": {"experiment_name": "e2e-topk", "registered_model_name": "tiny-topk"},
        "storage": {"work_dir": str(work)},
    })
    out = io.StringIO()
    ok, _ = run(recipe, out=out)
    text = out.getvalue()
    assert ok, text
    cache = json.loads((work / "teacher_cache" / "manifest.json").read_text())
    assert cache["key"]["teacher_signal"] == "topk" and cache["key"]["topk"] == 8
    assert cache["layout"]["hidden_size"] == 0
    assert not (work / "teacher_cache" / "lm_head.safetensors").exists()
    logs = [json.loads(line) for line in
            (work / "train" / "train_log.jsonl").read_text().splitlines()]
    kd = [r["train/kd"] for r in logs if "train/kd" in r]
    assert kd and all(v > 0 for v in kd), logs
    assert list((work / "model").glob("*.safetensors"))
