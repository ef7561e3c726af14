"""The packaged GSM8K demo data: real rows, numeric labels, train and eval disjoint."""

from __future__ import annotations

import json
import os
import re

import pytest

from kubedistill.data.demo import ensure_demo, resolve_packaged
from kubedistill.errors import ConfigError


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_demo_split_is_disjoint_complete_and_labelled(tmp_path):
    paths = ensure_demo(str(tmp_path))
    train, held_out = load(paths["gsm8k-train"]), load(paths["gsm8k-eval"])
    assert (len(train), len(held_out)) == (1119, 200)
    questions = [r["question"] for r in train + held_out]
    assert len(set(r["question"] for r in train) & set(r["question"] for r in held_out)) == 0
    assert len(set(questions)) == 1319
    for row in train + held_out:
        assert set(row) == {"question", "answer", "label"}
        assert re.fullmatch(r"-?\d+(\.\d+)?", row["label"])
        assert row["answer"].rsplit("####", 1)[1].strip().replace(",", "") == row["label"]
        assert "<<" not in row["answer"]
    assert train[0]["label"] == "18"  # Janet's ducks, the first GSM8K test problem
    info = json.loads((tmp_path / "gsm8k-demo" / "provenance.json").read_text())
    assert info["license"].startswith("MIT") and info["rows"]["gsm8k-eval"] == 200


def test_demo_is_materialised_once(tmp_path):
    paths = ensure_demo(str(tmp_path))
    stamp = os.stat(paths["gsm8k-train"]).st_mtime_ns
    assert ensure_demo(str(tmp_path)) == paths
    assert os.stat(paths["gsm8k-train"]).st_mtime_ns == stamp
    os.remove(paths["gsm8k-eval"])  # an incomplete cache is rebuilt
    assert len(load(ensure_demo(str(tmp_path))["gsm8k-eval"])) == 200


def test_unknown_packaged_dataset():
    with pytest.raises(ConfigError, match="gsm8k-train"):
        resolve_packaged("gsm8k-test")
