"""The CPU runtime image, run for real (``container`` marker; skipped where Docker cannot run).

- the image runs as uid 1000 on a read-only root with no network: a CPU torch, the packaged
  SmolLM2 model and GSM8K data inside, the root filesystem not writable;
- ``kubedistill run --runner docker``: the quickstart pipeline, shrunk, with every stage in
  its own container (kfp.local's DockerRunner), to a champion in the run's MLflow registry.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from docker_env import DockerUnavailable, docker_client, ensure_image, runtime_image  # noqa: E402

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parents[1]
# The quickstart recipe at the smallest size that still runs every stage.
TINY = {"data": {"max_samples": 16, "eval_max_samples": 8, "max_len": 160,
                 "prompt_max_len": 128},
        "train": {"train_batch_size": 8, "micro_train_batch_size": 4, "save_steps": -1},
        "eval": {"eval_num_generations": 2, "eval_max_new_tokens": 8}}


@pytest.fixture(scope="module")
def image() -> str:
    try:
        client = docker_client()
    except DockerUnavailable as exc:
        pytest.skip(f"Docker cannot run here: {exc}")
    try:
        return ensure_image(client, runtime_image())
    finally:
        client.close()


def _run(image: str, script: str) -> tuple[int, str]:
    client = docker_client()
    try:
        box = client.containers.run(
            image, ["python", "-c", script], detach=True, network_mode="none",
            read_only=True, tmpfs={"/tmp": ""}, environment={"HOME": "/tmp"},
            cap_drop=["ALL"], security_opt=["no-new-privileges"])
        code = box.wait(timeout=300)["StatusCode"]
        logs = box.logs().decode()
        box.remove()
        return code, logs
    finally:
        client.close()


def test_image_is_non_root_read_only_offline_and_carries_its_assets(image):
    code, logs = _run(image, """
import json, os, torch
from kubedistill.data.demo import ensure_demo
from kubedistill.models.packaged import ensure_imported
root_writable = True
try:
    open("/opt/kubedistill/probe", "w")
except OSError:
    root_writable = False
open("/tmp/probe", "w").write("ok")
print(json.dumps({"uid": os.getuid(), "cuda": torch.version.cuda, "torch": torch.__version__,
                  "model": ensure_imported("smollm2-135m-instruct"),
                  "data": sorted(ensure_demo()), "root_writable": root_writable}))
""")
    assert code == 0, logs
    facts = json.loads(logs.strip().splitlines()[-1])
    assert facts["uid"] == 1000
    assert facts["cuda"] is None and facts["torch"].startswith("2.13.0")
    assert facts["model"] == "/opt/kubedistill/models/smollm2-135m-instruct"
    assert facts["data"] == ["gsm8k-eval", "gsm8k-train"]
    assert facts["root_writable"] is False


def test_quickstart_pipeline_runs_every_stage_in_a_container(image, tmp_path, monkeypatch):
    from kubedistill.pipelines.local import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for group, values in TINY.items():
        recipe[group].update(values)
    work = tmp_path / "run"
    recipe["storage"]["work_dir"] = str(work)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = io.StringIO()
    ok, run_dir = run(str(path), out=out, runner="docker", image=image)
    log = (run_dir / "pipeline.log").read_text()
    assert ok, out.getvalue() + log[-4000:]
    # kfp.local's DockerRunner prints this once per task it starts in a container.
    started = log.count(f"Found image '{image}'")
    # open-run, prepare, cache-teacher (1 shard), merge-cache, train, evaluate, register,
    # promote, close-run
    assert started == 9, log[-4000:]
    promotion = json.loads((work / "registry" / "promotion.json").read_text())
    assert promotion.get("promoted", promotion.get("decision")) in (True, "champion", "promote")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    champion = client.get_model_version_by_alias("smollm2-gsm8k-student", "champion")
    assert str(champion.version) == "1"
    assert (work / "model" / "config.json").exists()
    assert "SUCCEEDED" in out.getvalue()
