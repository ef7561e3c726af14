"""Models at an ``s3://`` URI (moto's S3 server): the local copy is keyed by content and
revalidated, so a model retrained to the same URI is never served stale and a copy that lost a
file (a download that died after ``config.json``) is fetched again."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from kubedistill import storage
from kubedistill.errors import ConfigError
from kubedistill.models import resolve_model_path


def _build(tmp_path, name: str, seed: int, tokenizer_ref: str) -> str:
    from kubedistill.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path / name), tokenizer_ref=tokenizer_ref, seed=seed)


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_model_retrained_to_the_same_uri_is_not_served_stale(s3_bucket, tmp_path,
                                                             tiny_model_dir):
    """Failed before the fix: the copy was keyed by the URI alone and reused as soon as its
    config.json existed, so the second resolve returned the first model's weights."""
    uri = f"{s3_bucket}/models/student"
    first = _build(tmp_path, "first", 1, tiny_model_dir)
    second = _build(tmp_path, "second", 2, tiny_model_dir)
    assert not torch.equal(_weights(first)["model.embed_tokens.weight"],
                           _weights(second)["model.embed_tokens.weight"])

    storage.upload_dir(first, uri)
    copy1 = resolve_model_path(uri)
    _assert_same(_weights(copy1), _weights(first))
    assert resolve_model_path(uri) == copy1  # unchanged content: reused

    fs, path = storage.filesystem(uri)
    fs.rm(path, recursive=True)
    storage.upload_dir(second, uri)  # "retrained" to the same URI
    copy2 = resolve_model_path(uri)
    assert copy2 != copy1
    _assert_same(_weights(copy2), _weights(second))
    assert not os.path.exists(copy1)  # the stale copy is gone


def test_copy_that_lost_a_file_is_fetched_again(s3_bucket, tmp_path, tiny_model_dir):
    """Failed before the fix: a local copy with config.json but without its weights (a
    download that died part-way) was served as complete."""
    uri = f"{s3_bucket}/models/partial"
    model = _build(tmp_path, "model", 3, tiny_model_dir)
    storage.upload_dir(model, uri)
    copy = resolve_model_path(uri)
    os.remove(os.path.join(copy, "model.safetensors"))
    again = resolve_model_path(uri)
    _assert_same(_weights(again), _weights(model))
    assert not [d for d in os.listdir(os.path.dirname(again)) if ".partial-" in d]


def test_remote_path_without_a_model_is_a_clear_error(s3_bucket):
    storage.write_json_atomic(f"{s3_bucket}/not_a_model/notes.json", {"a": 1})
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(f"{s3_bucket}/not_a_model")
