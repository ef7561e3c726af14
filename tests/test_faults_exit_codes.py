"""`kubedistill run` exits with the documented code of the stage that failed, end to end
under kfp.local: 3 bad data, 4 a corrupt teacher-cache shard (a flipped byte, found by the
train stage's checksum), 5 the object store unreachable, 130 interrupted (and nothing it
started outlives it). Before: 1 for every failure. Tiny models, real stages, real
subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _prepared import gsm8k
from _procs import alive, descendants
from conftest import free_port


def _dataset(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path: Path, teacher: str, student: str, dataset: str) -> Path:
    body = {
        "model": {"teacher_name_or_path": teacher, "student_name_or_path": student,
                  "attn_implementation": "sdpa"},
        "data": {"train_dataset_path": dataset, "input_key": "question",
                 "output_key": "answer", "max_len": 256, "prompt_max_len": 192,
                 "eval_ratio": 0.25, "preprocess_num_workers": 1},
        "train": {"num_gpus_per_node": 1, "train_batch_size": 4, "micro_train_batch_size": 2,
                  "learning_rate": 1e-3, "device": "cpu", "save_steps": -1},
        "cache": {"cache_dtype": "fp32", "teacher_backend": "hf", "cache_rows_per_shard": 8},
        "eval": {"eval_task": "none"},
        "tracking": {"tracking_uri": "off"},
        "storage": {"work_dir": str(tmp_path / "work")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _env(**over: str) -> dict[str, str]:
    env = {**os.environ, "KUBEDISTILL_SYSTEM_METRICS": "0", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", **over}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(recipe: Path, env: dict[str, str] | None = None, timeout: int = 420):
    out = subprocess.run([sys.executable, "-m", "kubedistill.cli", "run", str(recipe)],
                         capture_output=True, text=True, env=env or _env(), timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def test_bad_data_exits_3(tmp_path, tiny_model_dir, tiny_teacher_dir):
    data = _dataset(tmp_path / "d.jsonl", [{"question": None, "answer": "a"}] * 4)
    code, text = _run(_recipe(tmp_path, tiny_teacher_dir, tiny_model_dir, data))
    assert code == 3, text[-3000:]
    assert "error: DataError: prepare produced no train rows" in text
    assert "traceback" not in text.split("kubedistill run tiny:")[-1].lower()


def test_object_store_down_exits_5(tmp_path, tiny_model_dir, tiny_teacher_dir):
    endpoint = f"http://127.0.0.1:{free_port()}"
    recipe = _recipe(tmp_path, tiny_teacher_dir, tiny_model_dir, "s3://data/train.jsonl")
    code, text = _run(recipe, _env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="k",
                                   AWS_SECRET_ACCESS_KEY="s", AWS_MAX_ATTEMPTS="1"))
    assert code == 5, text[-3000:]
    assert f"object store at {endpoint} is unreachable (s3://data/train.jsonl)" in text


def test_flipped_byte_in_a_shard_exits_4(tmp_path, tiny_model_dir, tiny_teacher_dir):
    """prepare and cache-teacher run here with the pipeline's own config (so the pipeline
    finds them complete); one byte of a shard is flipped; train refuses it."""
    from kubedistill.components.common import build_config
    from kubedistill.data.prepare import prepare
    from kubedistill.teacher.cache import cache_teacher

    data = _dataset(tmp_path / "d.jsonl", gsm8k(16))
    recipe = _recipe(tmp_path, tiny_teacher_dir, tiny_model_dir, data)
    work = str(tmp_path / "work")
    cfg = build_config(recipe.read_text(), json.dumps({"name": "tiny"}), work)
    prepare(cfg)
    cache_teacher(cfg)
    shard = sorted(Path(cfg.teacher_cache_path).glob("train-*.arrow"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    code, text = _run(recipe)
    assert code == 4, text[-3000:]
    assert f"{shard.name}: sha256" in text and "corrupt shard" in text
    assert not (tmp_path / "work" / "model" / "model.safetensors").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_interrupt_exits_130_and_leaves_no_process(tmp_path, tiny_model_dir, tiny_teacher_dir):
    data = _dataset(tmp_path / "d.jsonl", gsm8k(64))
    recipe = _recipe(tmp_path, tiny_teacher_dir, tiny_model_dir, data)
    proc = subprocess.Popen([sys.executable, "-m", "kubedistill.cli", "run", str(recipe)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    log = tmp_path / "work" / "pipeline.log"
    deadline = time.monotonic() + 300
    try:
        while not (log.exists() and '"stage": "prepare", "event": "start"' in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        started = descendants(proc.pid)
        assert started, "the prepare stage runs in a process of its own"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, text[-3000:]
    end = time.monotonic() + 30
    while any(alive(p) for p in started) and time.monotonic() < end:
        time.sleep(0.2)
    assert [p for p in started if alive(p)] == []
