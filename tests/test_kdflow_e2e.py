"""KDFlow's off-policy example script END TO END through ``python -m
kubedistill.cli.train_kd_off_policy``: the example's flag set with the models and data
swapped for local tiny ones, and sizes cut for two CPU cores (appended flags override the
example's, as a later flag does in KDFlow). Runs prepare -> cache-teacher -> merge-cache ->
train -> evaluate -> register -> promote and ends with a champion in the MLflow store that
KDFlow's ``--wandb_mode offline --wandb_dir ./output`` maps to."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_kdflow_cli import example_argv

CPU_SIZES = ["--num_gpus_per_node", "1", "--device", "cpu", "--train_batch_size", "4",
             "--micro_train_batch_size", "2", "--learning_rate", "1e-3", "--max_len", "256",
             "--prompt_max_len", "192", "--max_samples", "8", "--preprocess_num_workers", "1",
             "--input_key", "question", "--output_key", "answer", "--label_key", "label",
             "--eval_dataset_path", "packaged:gsm8k-eval", "--eval_max_samples", "2",
             "--eval_task", "gsm8k", "--eval_num_generations", "1",
             "--eval_max_new_tokens", "8", "--cache_dtype", "fp32", "--full_determinism"]


@pytest.mark.timeout(600)
def test_off_policy_example_runs_to_a_champion(tmp_path, tiny_model_dir, tiny_teacher_dir,
                                               monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prog, argv = example_argv("off_policy_kd__run_qwen3_30b_a3b_to_4b.sh", {
        "STUDENT": tiny_model_dir, "TEACHER": tiny_teacher_dir,
        "DATA": "packaged:gsm8k-train"})
    assert prog == "train_kd_off_policy" and "--use_wandb" in argv
    proc = subprocess.run([sys.executable, "-m", f"kubedistill.cli.{prog}", *argv,
                           *CPU_SIZES], cwd=tmp_path, capture_output=True, text=True,
                          timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "W&B flags mapped onto MLflow" in proc.stderr
    assert "SUCCEEDED" in proc.stdout and "promotion: champion" in proc.stdout
    model = tmp_path / "output" / "qwen3_30b_a3b_to_4b"  # KDFlow's --save_path
    assert (model / "config.json").exists() and list(model.glob("*.safetensors"))
    work = tmp_path / "runs" / "qwen3_30b_a3b_to_4b"
    assert (work / "teacher_cache" / "manifest.json").exists()
    reg = json.loads((work / "registry" / "registration.json").read_text())
    assert reg["name"] == "qwen3_30b_a3b_to_4b"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'output'}/mlflow.db")
    champion = client.get_model_version_by_alias("qwen3_30b_a3b_to_4b", "champion")
    assert str(champion.version) == reg["version"]
    exp = client.get_experiment_by_name("KDFlow")  # --wandb_project KDFlow
    runs = client.search_runs([exp.experiment_id], "tags.group = 'off_policy_kd'")
    assert runs and any(r.info.run_name == "qwen3_30b_a3b_to_4b_vanilla_kd" for r in runs)
    log = (work / "train" / "train_log.jsonl").read_text().splitlines()
    assert log and json.loads(log[-1])
