"""GPU requests follow the recipe: the compiled YAML of target gpu for several recipes, the
TrainJob of a 2-node recipe, and recipes that cannot fit rejected naming their keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubedistill.components import sizing
from kubedistill.components.common import build_config
from kubedistill.components.trainjob import trainjob_manifest
from kubedistill.errors import ConfigError
from kubedistill.pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
TP4_DP2 = "kd:\n  teacher_tp_size: 4\n  teacher_dp_size: 2\ntrain:\n  num_gpus_per_node: 8\n"
ON_POLICY_COLOCATED = """\
kd:
  teacher_tp_size: 2
train:
  num_gpus_per_node: 1
  enable_sleep: true
rollout:
  rollout_num_engines: 2
  rollout_tp_size: 2
"""
TWO_NODES = "kd:\n  teacher_tp_size: 1\ntrain:\n  num_nodes: 2\n  num_gpus_per_node: 4\n"


def _compile(tmp_path: Path, pipeline: str, recipe_text: str | None, *extra: str) -> dict:
    args = ["compile", "--pipeline", pipeline, "--target", "gpu", "--out", str(tmp_path)]
    if recipe_text is not None:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(recipe_text)
        args += ["--recipe", str(recipe)]
    assert main([*args, *extra]) == 0
    docs = list(yaml.safe_load_all((tmp_path / f"{pipeline}-gpu.yaml").read_text()))
    return docs[0]["deploymentSpec"]["executors"]


def _gpus(executors: dict, stage: str) -> int:
    res = executors[f"exec-{stage}"]["container"].get("resources", {})
    acc = res.get("accelerator")
    if not acc:
        return 0
    assert acc["resourceType"] == "nvidia.com/gpu"
    return int(acc["resourceCount"])


def test_default_off_policy_recipe_requests_the_teacher_tp_for_cache_and_evaluate(tmp_path):
    """The defaults (KDFlow's): teacher_tp_size 8, num_gpus_per_node 8."""
    execs = _compile(tmp_path, "off_policy_kd", None)
    assert (_gpus(execs, "cache-teacher"), _gpus(execs, "evaluate"), _gpus(execs, "train")) \
        == (8, 8, 8)
    assert _gpus(execs, "prepare") == 0 and _gpus(execs, "register") == 0


def test_quickstart_recipe_sizes_from_its_keys(tmp_path):
    execs = _compile(tmp_path, "off_policy_kd", (ROOT / "recipes/quickstart.yaml").read_text(),
                     "--set", "teacher_tp_size=1")
    assert (_gpus(execs, "cache-teacher"), _gpus(execs, "train")) == (1, 1)


def test_tp4_dp2_teacher_requests_eight_gpus(tmp_path):
    execs = _compile(tmp_path, "off_policy_kd", TP4_DP2.replace("8\n", "2\n"))
    assert (_gpus(execs, "cache-teacher"), _gpus(execs, "evaluate")) == (8, 8)
    assert _gpus(execs, "train") == 2


def test_hf_teacher_needs_one_gpu_whatever_tp_says(tmp_path):
    execs = _compile(tmp_path, "off_policy_kd", TP4_DP2 + "cache:\n  teacher_backend: hf\n")
    assert _gpus(execs, "cache-teacher") == 1


def test_on_policy_colocated_pod_holds_teacher_rollout_and_student(tmp_path):
    execs = _compile(tmp_path, "on_policy_kd", ON_POLICY_COLOCATED)
    # max(student 1, teacher 2, rollout 2 x 2 = 4)
    assert _gpus(execs, "train") == 4
    assert _gpus(execs, "evaluate") == 2
    assert "exec-cache-teacher" not in execs


def test_two_node_recipe_uses_a_trainjob_of_per_node_gpus(tmp_path):
    execs = _compile(tmp_path, "off_policy_kd", TWO_NODES)
    assert _gpus(execs, "train") == 0  # the launcher
    assert execs["exec-train"]["container"]["resources"]["memoryLimit"] <= 4 * 2**30
    cfg = build_config(TWO_NODES)
    plan = sizing.gpu_plan(cfg, 8)
    assert plan.uses_trainjob and plan.train_gpus_per_node == 4
    job = trainjob_manifest(cfg, name="kd-x", image="img:1")
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 4}


def test_two_node_on_policy_trainjob_pods_hold_the_engines():
    cfg = build_config(ON_POLICY_COLOCATED, '{"num_nodes": 2}')
    assert cfg.train.num_nodes == 2
    job = trainjob_manifest(cfg, name="kd-x", image="img:1")
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 4}
    assert job["spec"]["trainer"]["numProcPerNode"] == "1"  # student ranks, not pod GPUs


def test_cpu_recipe_requests_no_gpus():
    cfg = build_config("train:\n  device: cpu\n")
    assert sizing.gpu_plan(cfg, 8) == sizing.GpuPlan(0, 0, 0, 1)


@pytest.mark.parametrize("recipe,keys", [
    ("kd:\n  teacher_tp_size: 16\n", ["teacher_tp_size", "16", "a node has 8"]),
    ("kd:\n  teacher_tp_size: 4\n  teacher_dp_size: 4\n", ["teacher_dp_size", "= 16"]),
    ("kd:\n  teacher_tp_size: 1\ntrain:\n  num_gpus_per_node: 16\n", ["num_gpus_per_node"]),
    ("kd:\n  teacher_tp_size: 1\ntrain:\n  num_gpus_per_node: 2\nrollout:\n"
     "  rollout_num_engines: 3\n  rollout_tp_size: 4\n",
     ["rollout_tp_size x rollout_num_engines", "4 x 3 = 12"]),
])
def test_a_recipe_that_cannot_fit_is_an_error_naming_its_keys(recipe, keys):
    with pytest.raises(ConfigError) as info:
        sizing.gpu_plan(build_config(recipe), 8)
    for key in keys:
        assert key in str(info.value)


def test_compile_refuses_a_recipe_that_cannot_fit(tmp_path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("kd:\n  teacher_tp_size: 8\n")
    with pytest.raises(ConfigError, match="teacher_tp_size"):
        main(["compile", "--pipeline", "off_policy_kd", "--target", "gpu", "--out",
              str(tmp_path), "--recipe", str(recipe), "--gpus-per-node", "4"])


def test_submit_sizes_the_run_it_submits(tmp_path):
    """submit compiles for the recipe and its --set overrides, then hands that package over."""
    from kubedistill.pipelines import cli

    recipe = tmp_path / "tp.yaml"
    recipe.write_text(TP4_DP2)
    sent = {}

    class Client:
        def __init__(self, host):
            pass

        def create_run_from_pipeline_package(self, path, arguments, run_name, experiment_name):
            sent["docs"] = list(yaml.safe_load_all(Path(path).read_text()))
            return type("R", (), {"run_id": "run-1"})()

    args = cli.build_parser().parse_args(
        ["submit", "--host", "http://kfp:8888", "--recipe", str(recipe),
         "--set", "teacher_dp_size=1"])
    assert cli._submit(args, client_factory=Client) == 0
    execs = sent["docs"][0]["deploymentSpec"]["executors"]
    assert (_gpus(execs, "cache-teacher"), _gpus(execs, "train")) == (4, 8)
