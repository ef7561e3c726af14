"""Hugging Face Hub ids as model and dataset references (kubedistill.models.hub).

Nothing is downloaded: a real HF cache layout (``models--owner--name/snapshots/<sha>``) is
built from the tiny test model, and huggingface_hub resolves ids from it as it does offline.
The unreachable hub is a closed loopback port."""

from __future__ import annotations

import os
import shutil

import pytest

from kubedistill.errors import ConfigError, ServiceUnavailable

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def _cache_repo(cache, kind: str, repo: str, files: dict[str, str]):
    folder = cache / f"{kind}s--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / SHA
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / rel)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(SHA)
    return snap


def test_cached_hub_model_id_resolves_offline(hf_cache, tiny_model_dir, monkeypatch):
    from kubedistill.models.loading import load_tokenizer, resolve_model_path

    files = {f: os.path.join(tiny_model_dir, f) for f in os.listdir(tiny_model_dir)}
    snap = _cache_repo(hf_cache, "model", "tiny-org/tiny-llama", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("tiny-org/tiny-llama") == str(snap)
    assert load_tokenizer("tiny-org/tiny-llama").eos_token


def test_offline_hub_model_fails_in_one_line_naming_it(hf_cache, monkeypatch):
    from kubedistill.models.loading import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ServiceUnavailable, match="model 'Qwen/Qwen3-4B'.*HF_HUB_OFFLINE") as e:
        resolve_model_path("Qwen/Qwen3-4B")
    assert e.value.exit_code == 5 and "\n" not in str(e.value)


def test_unreachable_hub_fails_naming_the_id(hf_cache, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    from kubedistill.models import hub

    with pytest.raises(ServiceUnavailable, match="dataset 'org/data'.*cannot be reached"):
        hub.snapshot("org/data", "dataset")


def test_local_paths_are_never_hub_ids(tmp_path, monkeypatch):
    from kubedistill.models import hub
    from kubedistill.models.loading import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert not hub.is_hub_id("org/model") and hub.is_hub_id("Qwen/Qwen3-4B")
    assert not hub.is_hub_id("./a/b") and not hub.is_hub_id("s3://a/b")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path("/no/such/dir/anywhere")


def test_cached_hub_dataset_reads_its_split(hf_cache, tmp_path, monkeypatch):
    from kubedistill.data.formats import read_source

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')
    test.write_text('{"question": "3+3?", "answer": "6"}\n')
    _cache_repo(hf_cache, "dataset", "org/math",
                {"data/train-00000-of-00001.jsonl": str(train),
                 "data/test-00000-of-00001.jsonl": str(test), "README.md": str(test)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(read_source("org/math", "train").records) == 2
    assert [r.data["answer"] for r in read_source("org/math", "test").records] == ["6"]


def test_entry_point_offline_hub_id_exits_5_with_one_line(hf_cache, monkeypatch, tmp_path,
                                                          capsys):
    from kubedistill.cli.train_kd_off_policy import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["--student_name_or_path", "Qwen/Qwen3-4B", "--teacher_name_or_path",
                 "Qwen/Qwen3-30B-A3B", "--train_dataset_path", "packaged:gsm8k-train"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 5
    assert len(err) == 1 and "Qwen/Qwen3-4B" in err[0]
