"""Fault suite, killed late stages: `kubedistill evaluate`, `register` and `promote`, each a
real CLI subprocess SIGKILLed part-way, then rerun; the outcome equals an uninterrupted run.

Kill points are either observed from outside (evaluate: the teacher baseline file appears, so
the student is being scored / generating) or exact: a small launcher replaces one function of
the stage with one that SIGKILLs its own process when called with an argument containing a
given string, then runs ``kubedistill.cli`` as ``python -m`` would (``runpy``).

- evaluate: no ``metrics.json`` survives a kill (it is the stage's completion marker, written
  last); the rerun's ``metrics.json`` equals an uninterrupted run's.
- register: killed before the version exists and after it exists but before the alias: the
  rerun leaves exactly one version for the registration run, alias ``challenger`` on it.
- promote: killed before the alias moves, after it moved, and before ``promotion.json``: the
  rerun leaves ``champion`` on the right version with the same decision, reason and previous
  champion as an uninterrupted run.
(prepare, cache-teacher and train: tests/test_faults_kill.py and the files it names.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow_server import MlflowServer

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL")]

KILL_AT = r"""
import importlib, os, runpy, signal, sys
target, needle = sys.argv[1], sys.argv[2]
module, attr = target.split(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
def dying(*args, **kwargs):
    if needle in repr(args) + repr(kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, name, dying)
sys.argv = ["kubedistill", *sys.argv[3:]]
runpy.run_module("kubedistill.cli", run_name="__main__", alter_sys=True)
"""

ENV = {"OMP_NUM_THREADS": "1", "KUBEDISTILL_SYSTEM_METRICS": "0", "TOKENIZERS_PARALLELISM":
       "false", "KUBEDISTILL_MLFLOW_RETRIES": "2", "KUBEDISTILL_MLFLOW_BACKOFF_S": "0.1"}


def _env() -> dict[str, str]:
    env = {**os.environ, **ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _stage(stage: str, recipe: str) -> list[str]:
    return [sys.executable, "-m", "kubedistill.cli", stage, "-c", recipe]


def _killed_at(target: str, needle: str, stage: str, recipe: str) -> subprocess.CompletedProcess:
    """Run ``stage`` with ``target`` SIGKILLing the process when its arguments hold ``needle``."""
    cmd = [sys.executable, "-c", KILL_AT, target, needle, stage, "-c", recipe]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-3000:])
    return done


def _ok(stage: str, recipe: str) -> None:
    done = subprocess.run(_stage(stage, recipe), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _recipe(path, **keys) -> str:
    path.write_text(yaml.safe_dump(keys))
    return str(path)


# ---------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_model_dir, tiny_teacher_dir):
    """A prepared QA split and the metrics.json of an uninterrupted `kubedistill evaluate`."""
    from test_evaluate_stage import prepare_qa

    root = tmp_path_factory.mktemp("evalkill")
    prepared = prepare_qa(str(root / "prepared"), tiny_model_dir)

    def recipe(name: str) -> str:
        return _recipe(root / f"{name}.yaml", student_name_or_path=tiny_model_dir,
                       save_path=tiny_model_dir, teacher_name_or_path=tiny_teacher_dir,
                       prepared_path=prepared, work_dir=str(root / name),
                       teacher_cache_path=str(root / name / "no_cache"), device="cpu",
                       attn_implementation="sdpa", tracking_uri="off",
                       eval_num_generations=3, eval_max_new_tokens=6)

    clean = recipe("clean")
    _ok("evaluate", clean)
    metrics = json.loads((root / "clean" / "eval" / "metrics.json").read_text())
    generations = (root / "clean" / "eval" / "generations.jsonl").read_text()
    return recipe, root, metrics, generations


def _assert_rerun_matches(root, name: str, recipe: str, metrics: dict, generations: str):
    out = root / name / "eval"
    assert not (out / "metrics.json").exists(), "a killed evaluate left a metrics.json"
    _ok("evaluate", recipe)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "generations.jsonl").read_text() == generations


def test_sigkill_of_evaluate_while_scoring_then_rerun(eval_setup):
    """Killed from outside once the teacher baseline is written (the student is loading,
    scoring or generating): no metrics.json; the rerun reuses the baseline and equals the
    uninterrupted run."""
    recipe, root, metrics, generations = eval_setup
    killed = recipe("observed")
    out = root / "observed" / "eval"
    stage = subprocess.Popen(_stage("evaluate", killed), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (out.exists() and any(p.name.startswith("teacher_baseline-")
                                         for p in out.iterdir())):
            assert stage.poll() is None and time.monotonic() < deadline, "no baseline written"
            time.sleep(0.01)
        stage.kill()
        stage.wait()
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    assert stage.returncode == -signal.SIGKILL, "evaluate ended before it could be killed"
    _assert_rerun_matches(root, "observed", killed, metrics, generations)


@pytest.mark.parametrize("needle", ["generations.jsonl", "student generate"])
def test_sigkill_of_evaluate_before_its_outputs_then_rerun(eval_setup, needle):
    """Killed exactly while writing generations.jsonl, or as the student starts generating,
    with an earlier run's metrics.json in place: no metrics.json may look complete (neither
    this run's nor the stale one); the rerun equals the uninterrupted run."""
    recipe, root, metrics, generations = eval_setup
    name = "gen" if needle == "student generate" else "write"
    killed = recipe(name)
    (root / name / "eval").mkdir(parents=True)
    (root / name / "eval" / "metrics.json").write_text(json.dumps({**metrics, "score": 0.0}))
    target = ("kubedistill.evaluate.stage:greedy_generate" if needle == "student generate"
              else "kubedistill.storage:write_bytes_atomic")
    _killed_at(target, needle, "evaluate", killed)
    _assert_rerun_matches(root, name, killed, metrics, generations)


# ---------------------------------------------------------------------------- register/promote
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")) as srv:
        yield srv


@pytest.fixture(scope="module")
def metrics_json(eval_setup) -> dict:
    return eval_setup[2]


def _registry_recipe(tmp_path, url: str, model: str, name: str, metrics: dict,
                     tiny_model_dir: str, tiny_teacher_dir: str) -> str:
    work = tmp_path / "w"
    (work / "eval").mkdir(parents=True)
    (work / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return _recipe(tmp_path / "r.yaml", student_name_or_path=tiny_model_dir,
                   save_path=tiny_model_dir, teacher_name_or_path=tiny_teacher_dir,
                   work_dir=str(work), tracking_uri=url, registered_model_name=model,
                   pipeline_run_id=f"pr-{name}", name=name,
                   experiment_name=f"kill-late-{model}")


@pytest.mark.parametrize("target", ["mlflow:MlflowClient.log_batch",
                                    "mlflow:MlflowClient._create_model_version",
                                    "mlflow:MlflowClient.set_registered_model_alias"])
def test_sigkill_of_register_then_rerun_gives_one_version(tmp_path, server, metrics_json,
                                                          tiny_model_dir, tiny_teacher_dir,
                                                          target):
    """Killed after its run exists but before the run's metrics, after the model is logged but
    before its version exists, or after the version exists but before alias ``challenger``:
    the rerun registers exactly one version, and the run holds the metrics."""
    from mlflow import MlflowClient

    from kubedistill.tracking.registry import TAG_KEY

    model = f"kill-reg{target.rsplit('.', 1)[1]}".replace("_", "-")
    recipe = _registry_recipe(tmp_path, server.url, model, "reg", metrics_json,
                              tiny_model_dir, tiny_teacher_dir)
    client = MlflowClient(server.url, server.url)
    _killed_at(target, "", "register", recipe)
    before = client.search_model_versions(f"name='{model}'")
    assert len(before) == (1 if target.endswith("alias") else 0)
    assert not (tmp_path / "w" / "registry" / "registration.json").exists()
    _ok("register", recipe)

    reg = json.loads((tmp_path / "w" / "registry" / "registration.json").read_text())
    versions = client.search_model_versions(f"name='{model}'")
    assert [v.version for v in versions] == ["1"] and reg["version"] == "1"
    assert client.get_model_version_by_alias(model, "challenger").version == "1"
    exp = client.get_experiment_by_name(f"kill-late-{model}").experiment_id
    reg_runs = client.search_runs([exp], f"tags.`{TAG_KEY}` = '{reg['registration_key']}'")
    assert [r.info.run_id for r in reg_runs] == [reg["run_id"]] == [versions[0].run_id]
    assert reg_runs[0].info.status == "FINISHED"
    assert reg_runs[0].data.metrics["score"] == pytest.approx(metrics_json["score"])
    tags = versions[0].tags
    assert float(tags["score"]) == pytest.approx(metrics_json["score"])
    assert tags["eval_data_hash"] == metrics_json["eval_data_hash"]
    assert tags["pipeline_run_id"] == "pr-reg"
    # the rerun is complete: a third call changes nothing
    _ok("register", recipe)
    assert len(client.search_model_versions(f"name='{model}'")) == 1


def _two_versions(client, model: str) -> None:
    """v1 is champion (eval_ce 2.0), v2 (eval_ce 1.5, better) the challenger."""
    client.create_registered_model(model)
    for score in (2.0, 1.5):
        client.create_model_version(model, source="s3://kubedistill-kill-test/none", tags={
            "score": str(score), "score_metric": "eval_ce", "higher_is_better": "False",
            "eval_data_hash": "h1"})
    client.set_registered_model_alias(model, "champion", "1")
    client.set_registered_model_alias(model, "challenger", "2")


def _promote_recipe(tmp_path, url: str, model: str) -> str:
    reg = tmp_path / "w" / "registry" / "registration.json"
    reg.parent.mkdir(parents=True)
    reg.write_text(json.dumps({"name": model, "version": "2"}))
    return _recipe(tmp_path / "p.yaml", work_dir=str(tmp_path / "w"), tracking_uri=url,
                   registered_model_name=model)


PROMOTION_TAGS = ("promotion_decision", "promotion_reason", "challenger_score",
                  "champion_score")


def _outcome(client, tmp_path, model: str) -> tuple:
    promotion = json.loads((tmp_path / "w" / "registry" / "promotion.json").read_text())
    promotion.pop("name")
    tags = client.get_model_version(model, "2").tags
    return (client.get_model_version_by_alias(model, "champion").version, promotion,
            {k: tags.get(k) for k in PROMOTION_TAGS})


@pytest.mark.parametrize("target, needle", [
    ("mlflow:MlflowClient.set_registered_model_alias", "champion"),
    ("mlflow:MlflowClient.set_model_version_tag", "promotion_decision"),
    ("kubedistill.storage:write_json_atomic", "promotion.json")])
def test_sigkill_of_promote_then_rerun_matches_uninterrupted(tmp_path, server, target, needle):
    """Killed before/after champion moves or before promotion.json: the rerun's champion,
    promotion.json and decision tags equal an uninterrupted promote's."""
    from mlflow import MlflowClient

    client = MlflowClient(server.url, server.url)
    tag = re.sub(r"[^a-z0-9]+", "-", f"{target.rsplit('.', 1)[1]}-{needle}".lower())
    clean_model, killed_model = f"clean-{tag}", f"kill-{tag}"
    _two_versions(client, clean_model)
    _two_versions(client, killed_model)
    _ok("promote", _promote_recipe(tmp_path / "clean", server.url, clean_model))
    clean = _outcome(client, tmp_path / "clean", clean_model)
    assert clean[0] == "2" and clean[1]["promoted"] and clean[1]["previous_champion"] == "1"

    recipe = _promote_recipe(tmp_path / "killed", server.url, killed_model)
    _killed_at(target, needle, "promote", recipe)
    assert not (tmp_path / "killed" / "w" / "registry" / "promotion.json").exists()
    _ok("promote", recipe)
    assert _outcome(client, tmp_path / "killed", killed_model) == clean
