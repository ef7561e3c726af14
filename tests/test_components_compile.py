"""Compile check: every component and pipeline imports and compiles for both targets; the
compiled YAML carries the gpu target's accelerators, /dev/shm and secrets, and the kind
target's none of them. Also the step helpers that need no KFP run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubedistill.pipelines.cli import compile_pipeline, main
from kubedistill.pipelines.definitions import PIPELINES

SECRET_ENVS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    out = tmp_path_factory.mktemp("compiled")
    docs = {}
    for target in ("kind", "gpu"):
        for name in PIPELINES:
            path = compile_pipeline(name, target, out)
            docs[(name, target)] = list(yaml.safe_load_all(path.read_text()))
    return docs


def _executors(docs: list[dict]) -> dict[str, dict]:
    return docs[0]["deploymentSpec"]["executors"]


def _platform(docs: list[dict]) -> dict[str, dict]:
    return (docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
            if len(docs) > 1 else {})


def _by_stage(executors: dict, stage: str) -> list[dict]:
    return [e for name, e in executors.items() if name == f"exec-{stage}"]


def test_every_component_is_importable_and_declared():
    from kubedistill.components import stages

    assert set(stages.ALL) == {"prepare", "cache-teacher", "merge-cache", "train", "evaluate",
                               "register", "promote", "open-run", "close-run"}
    for comp in stages.ALL.values():
        assert "kubedistill.components import steps" in "\n".join(
            comp.component_spec.implementation.container.command)


@pytest.mark.parametrize("name", PIPELINES)
def test_gpu_target_has_accelerators_shm_and_secrets(compiled, name):
    docs = compiled[(name, "gpu")]
    execs, plat = _executors(docs), _platform(docs)
    train = _by_stage(execs, "train")[0]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(train["resources"]["accelerator"]["resourceCount"]) >= 1
    assert "accelerator" not in _by_stage(execs, "register")[0]["container"].get("resources", {})
    shm = plat["exec-train"]["emptyDirMounts"][0]
    assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    envs = {m["envVar"] for s in plat["exec-train"]["secretAsEnv"] for m in s["keyToEnv"]}
    assert SECRET_ENVS <= envs
    if name == "off_policy_kd":
        cache = _by_stage(execs, "cache-teacher")[0]["container"]
        assert cache["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"


@pytest.mark.parametrize("name", PIPELINES)
def test_kind_target_has_no_accelerators_shm_or_secrets(compiled, name):
    docs = compiled[(name, "kind")]
    text = yaml.safe_dump(docs)
    for needle in ("nvidia.com/gpu", "accelerator", "/dev/shm", "emptyDirMounts",
                   "secretAsEnv", "AWS_SECRET_ACCESS_KEY"):
        assert needle not in text, needle
    train = _by_stage(_executors(docs), "train")[0]["container"]
    assert train["resources"]["cpuRequest"] > 0


def test_off_policy_shape_fan_out_collect_if_and_exit_handler(compiled):
    root = compiled[("off_policy_kd", "gpu")][0]
    tasks = root["root"]["dag"]["tasks"]
    exit_task = tasks["close-run"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    comps = root["components"]
    handler = next(v for k, v in comps.items() if k.startswith("comp-exit-handler"))
    inner = handler["dag"]["tasks"]
    loop = next(t for t in inner.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("prepare-Output")
    cond = next(t for t in inner.values() if "condition" in t.get("triggerPolicy", {}))
    assert "register-Output" in cond["triggerPolicy"]["condition"]
    merge_inputs = inner["merge-cache"]["inputs"]["artifacts"]["shards"]
    # dsl.Collected: the loop task's collected output artifact
    assert merge_inputs == {"taskOutputArtifact": {
        "outputArtifactKey": "pipelinechannel--cache-teacher-shard", "producerTask": "for-loop-2"}}


def test_retries_only_on_safe_stages(compiled):
    tasks = {}
    for comp in compiled[("off_policy_kd", "gpu")][0]["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    retried = {n for n, t in tasks.items() if "retryPolicy" in t}
    assert retried == {"prepare", "cache-teacher", "evaluate", "register"}


def test_sft_pins_its_algorithm(compiled):
    text = json.dumps(compiled[("sft", "kind")][0])
    assert '\\"kd_algorithm\\": \\"sft\\"' in text


def test_cli_compile_all_writes_both_targets(tmp_path, capsys):
    assert main(["compile", "--all", "--out", str(tmp_path), "--image", "reg/img:1"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"{n}-{t}.yaml" for n in PIPELINES for t in ("kind", "gpu"))
    assert "reg/img:1" in (tmp_path / "sft-gpu.yaml").read_text()


def test_cli_compile_tolerations_and_node_selector(tmp_path):
    main(["compile", "--pipeline", "sft", "--target", "gpu", "--out", str(tmp_path),
          "--toleration", "nvidia.com/gpu:NoSchedule", "--node-selector", "pool=a100"])
    docs = list(yaml.safe_load_all((tmp_path / "sft-gpu.yaml").read_text()))
    train = _platform(docs)["exec-train"]
    assert train["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists",
                                       "effect": "NoSchedule"}
    assert train["nodeSelector"]["labels"] == {"pool": "a100"}
    assert "nodeSelector" not in _platform(docs)["exec-register"]


def test_submit_sends_recipe_and_waits(tmp_path, monkeypatch):
    from kubedistill.pipelines import cli

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("kd:\n  kd_ratio: 0.3\n")
    calls = {}

    class FakeClient:
        def __init__(self, host):
            calls["host"] = host

        def create_run_from_pipeline_package(self, path, arguments, run_name, experiment_name):
            calls["package"] = Path(path).read_text()
            calls["arguments"] = arguments
            return type("R", (), {"run_id": "run-1"})()

        def wait_for_run_completion(self, run_id, timeout):
            return type("Run", (), {"state": "SUCCEEDED"})()

    args = cli.build_parser().parse_args(
        ["submit", "--host", "http://kfp:8888", "--recipe", str(recipe), "--wait",
         "--work-dir", "s3://b/run", "--num-shards", "4", "--set", "max_samples=8"])
    assert cli._submit(args, client_factory=FakeClient) == 0
    assert calls["host"] == "http://kfp:8888"
    assert calls["arguments"]["recipe"] == recipe.read_text()
    assert calls["arguments"]["num_shards"] == 4
    assert json.loads(calls["arguments"]["overrides"]) == {"name": "tiny", "max_samples": "8"}
    assert "pipelineInfo" in calls["package"]


def test_build_config_rebases_relative_paths_and_pins():
    from kubedistill.components.common import build_config

    cfg = build_config("train:\n  save_path: ./out/model\nkd:\n  kd_ratio: 0.2\n",
                       '{"name": "q", "kd_ratio": 0.4}', "s3://bucket/run",
                       '{"kd_algorithm": "sft"}', "parent-1")
    assert (cfg.name, cfg.kd.kd_ratio, cfg.kd.kd_algorithm) == ("q", 0.4, "sft")
    assert cfg.train.save_path == "s3://bucket/run/model"
    assert cfg.train.ckpt_path == "s3://bucket/run/checkpoints"
    assert cfg.tracking.parent_run_id == "parent-1"


@pytest.mark.parametrize("reg,expected", [
    ({"decision": "keep"}, "keep"),
    ({"beats_champion": True}, "promote"),
    ({"score": 2.0, "champion_score": 1.5, "higher_is_better": False}, "keep"),
    ({"score": 1.0, "champion_score": 1.5, "higher_is_better": False}, "promote"),
    ({"score": 0.6, "champion_score": 0.5, "higher_is_better": True,
      "min_improvement": 0.2}, "keep"),
    ({"version": "3"}, "promote"),
])
def test_promotion_decision(reg, expected):
    from kubedistill.components.steps import promotion_decision

    assert promotion_decision(reg) == expected


def test_upstream_artifacts_point_the_stage_at_their_uris():
    from types import SimpleNamespace

    from kubedistill.components.steps import _settings

    up = {"prepared": SimpleNamespace(metadata={"uri": "s3://b/prep"}),
          "teacher_cache": None, "model": SimpleNamespace(metadata={"uri": "s3://b/m"})}
    cfg = _settings({"recipe": "", "work_dir": "s3://b/run", "upstream": up})
    assert cfg.prepared_path == "s3://b/prep" and cfg.train.save_path == "s3://b/m"
    assert cfg.teacher_cache_path == "s3://b/run/teacher_cache"


def test_write_artifact_records_uri_and_scalars(tmp_path):
    from types import SimpleNamespace

    from kubedistill.components.common import read_artifact, write_artifact

    art = SimpleNamespace(path=str(tmp_path / "a" / "doc"), metadata={})
    write_artifact(art, {"rows": 3, "nested": {"x": 1}}, "s3://b/prep")
    assert art.metadata == {"uri": "s3://b/prep", "rows": 3}
    assert read_artifact(art) == {"rows": 3, "nested": {"x": 1}}
