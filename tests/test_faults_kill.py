"""Fault suite, killed stages: every process a stage starts dies with it, and a rerun
finishes the work as if nothing happened.

- SIGKILL of `kubedistill train`'s whole process group: torchrun starts its workers in a
  session of their own, so before the fix the worker lived on (reparented to init) and kept
  writing checkpoints where a resumed run would write. Now no descendant survives.
- SIGKILL of the prepare stage's process alone, while its data-prep workers build rows: the
  workers die too, and a rerun gives the same prepared data as an uninterrupted run.
(cache-teacher and train SIGKILL + rerun: tests/test_teacher_cache_stage.py and
tests/test_train_runs.py; evaluate, register and promote: tests/test_faults_kill_late.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _procs import alive, cmdline, descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG and /proc are Linux")






def _wait_gone(pids: list[int], seconds: float = 30) -> list[int]:
    """The pids still alive after waiting up to ``seconds`` for them to exit."""
    end = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from _prepared import random_splits

    return random_splits(str(tmp_path_factory.mktemp("prepared")),
                         {"train": 64, "eval": 4}, length=40, prompt_len=8)


def test_group_sigkill_of_train_leaves_no_worker(tmp_path, tiny_model_dir, prepared):
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "kubedistill.cli", "train", "--student_name_or_path",
           tiny_model_dir, "--prepared_path", prepared, "--kd_algorithm", "sft",
           "--num_gpus_per_node", "1", "--train_batch_size", "2", "--micro_train_batch_size",
           "1", "--num_epochs", "500", "--save_steps", "2", "--learning_rate", "1e-3",
           "--work_dir", str(work), "--save_path", str(work / "model"), "--ckpt_path",
           str(work / "ckpt"), "--tracking_uri", "off", "--device", "cpu", "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBEDISTILL_SYSTEM_METRICS": "0"}
    stage = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    latest = work / "ckpt" / "latest.json"
    deadline = time.monotonic() + 300
    try:
        while not latest.exists():
            assert stage.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        tree = descendants(stage.pid)
        workers = [p for p in tree if "kubedistill.train" in cmdline(p)
                   and "torch.distributed.run" not in cmdline(p)]
        assert workers, [cmdline(p) for p in tree]
        assert os.getsid(workers[0]) != os.getsid(stage.pid)  # torchrun's own session
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait()
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
    left = _wait_gone(tree)
    for pid in left:  # do not leave a stray trainer behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == [], [cmdline(p) for p in left]
    step = json.loads(latest.read_text())["step"]
    time.sleep(1.0)  # nothing may move the run's checkpoints after the kill
    assert json.loads(latest.read_text())["step"] == step


PREPARE = """
import sys
from kubedistill.config import load_config
from kubedistill.data import parallel
from kubedistill.data.prepare import prepare
parallel.MIN_PARALLEL_ROWS, parallel.MAX_CHUNK_ROWS = 1, 4
parallel.available_cpus = lambda: 2
prepare(load_config(sys.argv[1]))
"""


def _prepare_recipe(tmp_path, model: str, work: str) -> str:
    import yaml
    from _prepared import gsm8k

    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k(400)))
    recipe = tmp_path / "prep.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher_name_or_path": model, "kd_algorithm": "sft", "input_key": "question",
        "output_key": "answer", "train_dataset_path": str(data), "preprocess_num_workers": 2,
        "max_len": 512, "prompt_max_len": 384, "work_dir": work, "tracking_uri": "off"}))
    return str(recipe)


def test_sigkill_of_prepare_kills_its_workers_and_a_rerun_completes(tmp_path, tiny_model_dir):
    from kubedistill.config import load_config
    from kubedistill.data.prepare import prepare

    recipe = _prepare_recipe(tmp_path, tiny_model_dir, str(tmp_path / "killed"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    stage = subprocess.Popen([sys.executable, "-c", PREPARE, recipe], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while True:  # both pool workers up and building
            workers = [p for p in descendants(stage.pid) if "spawn_main" in cmdline(p)]
            if len(workers) >= 2:
                break
            assert stage.poll() is None and time.monotonic() < deadline, "no workers started"
            time.sleep(0.05)
        stage.kill()  # the stage's process only, as the OOM killer would
        stage.wait()
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    left = _wait_gone(workers)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []
    killed_cfg = load_config(recipe)
    assert not os.path.exists(os.path.join(killed_cfg.prepared_path, "manifest.json"))
    rerun = prepare(killed_cfg)
    clean = prepare(load_config(recipe, {"work_dir": str(tmp_path / "clean")}))
    assert rerun["data_hash"] == clean["data_hash"]
    assert rerun["splits"] == clean["splits"]
