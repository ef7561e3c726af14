"""``preprocess_num_workers``: building rows in worker processes gives byte-identical output.

The parallel path is forced on small inputs by lowering :data:`MIN_PARALLEL_ROWS` and
:data:`MAX_CHUNK_ROWS` (many chunks, so bad rows, length-filtered rows and the eval limit
fall in different chunks) and by granting two CPUs whatever the machine has.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from kubedistill.config import Config
from kubedistill.data import parallel
from kubedistill.data.formats import resolve_ref
from kubedistill.data.prepare import prepare
from kubedistill.errors import DataError

OUTPUTS = ("train.parquet", "eval.parquet", "bad_rows.jsonl")


@pytest.fixture
def force_parallel(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ROWS", 1)
    monkeypatch.setattr(parallel, "MAX_CHUNK_ROWS", 16)
    monkeypatch.setattr(parallel, "available_cpus", lambda: 2)


def demo_lines() -> list[str]:
    _, uri = resolve_ref("packaged:gsm8k-train")
    with open(uri, encoding="utf-8") as f:
        return f.read().splitlines()


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def with_bad_rows(good: list[str], bad: dict[int, object]) -> list[str]:
    """``good`` with ``bad[n]`` (an object, or a raw string) as line ``n`` (from 1)."""
    lines = list(good)
    for n in sorted(bad):
        value = bad[n]
        lines.insert(n - 1, value if isinstance(value, str) else json.dumps(value))
    return lines


def make_cfg(tmp_path, model_dir: str, name: str, workers: int, **over) -> Config:
    cfg = Config()
    cfg.model.teacher_name_or_path = model_dir
    cfg.storage.work_dir = str(tmp_path / name)
    for key, value in {"input_key": "question", "output_key": "answer", "label_key": "label",
                       "preprocess_num_workers": workers, **over}.items():
        cfg.set(key, value)
    return cfg.validate()


def outputs(cfg) -> dict[str, bytes]:
    out = {}
    for name in OUTPUTS:
        with open(os.path.join(cfg.prepared_path, name), "rb") as f:
            out[name] = f.read()
    return out


def without_created_at(manifest: dict) -> str:
    return json.dumps({k: v for k, v in manifest.items() if k != "created_at"})


def test_two_workers_give_byte_identical_output(tmp_path, smollm2_dir, force_parallel,
                                                caplog):
    demo = demo_lines()
    train = write_lines(tmp_path / "train.jsonl", with_bad_rows(demo[:300], {
        20: '{"question": "broken JSON", "answer": ',  # a read error (reported first)
        75: {"question": "no answer", "label": "1"},
        140: {"question": 42, "answer": "x", "label": "1"},
        231: {"question": "blank", "answer": "   ", "label": "1"},
        290: {"question": [{"role": "assistant", "content": "x"}], "answer": "y",
              "label": "1"},
    }))
    held = write_lines(tmp_path / "held.jsonl", with_bad_rows(demo[300:420], {
        3: {"question": "no label", "answer": "y"},
        40: {"question": None, "answer": "y", "label": "1"},
    }))
    over = {"train_dataset_path": train, "eval_dataset_path": held, "eval_max_samples": 50,
            "max_len": 180}  # 136 of the 300 train rows are longer: over 100 filtered ids
    one = make_cfg(tmp_path, smollm2_dir, "one", 1, **over)
    first = prepare(one)
    assert "worker processes" not in caplog.text
    two = make_cfg(tmp_path, smollm2_dir, "two", 2, **over)
    with caplog.at_level(logging.INFO, logger="kubedistill.data.parallel"):
        second = prepare(two)
    assert re.search(r"building 304 train rows in 2 worker processes \(19 chunks\)",
                     caplog.text)
    assert "building 122 eval rows in 2 worker processes (8 chunks)" in caplog.text

    assert outputs(two) == outputs(one)
    assert without_created_at(second) == without_created_at(first)
    assert second["splits"]["train"]["sha256"] == first["splits"]["train"]["sha256"]
    # what the comparison covers: bad rows in plan order, length counts, filtered ids, limit
    report = [json.loads(x) for x in outputs(two)["bad_rows.jsonl"].decode().splitlines()]
    assert [(b["split"], b["row"]) for b in report] == [
        ("train", 20), ("train", 75), ("train", 140), ("train", 231), ("train", 290),
        ("eval", 3), ("eval", 40)]
    assert "malformed JSON" in report[0]["reason"]
    assert [b["field"] for b in report[1:5]] == ["answer", "question", "answer", "question"]
    length = second["length"]
    assert length["train"] == {"kept": 164, "filtered_too_long": 136}
    assert len(length["filtered_ids"]) == 100 and sum(length["eval"].values()) < 120
    assert second["splits"]["eval"]["rows"] == 50  # the limit, reached mid-chunk
    assert second["splits"]["train"]["rows"] == 164
    assert [x["rows_bad"] for x in second["inputs"]] == [5, 2]


def test_on_bad_row_fail_names_the_first_bad_row_in_plan_order(tmp_path, smollm2_dir,
                                                                force_parallel):
    demo = demo_lines()
    path = tmp_path / "train.jsonl"
    train = write_lines(path, with_bad_rows(demo[:200], {
        97: {"question": "no answer", "label": "1"},  # chunk 7 of 13
        150: {"question": 7, "answer": "x", "label": "1"},
        180: {"answer": "no question", "label": "1"},
    }))
    cfg = make_cfg(tmp_path, smollm2_dir, "fail", 2, train_dataset_path=train,
                   on_bad_row="fail")
    with pytest.raises(DataError, match=re.escape(f"{path} row 97, field 'answer'")
                       + ".*missing key"):
        prepare(cfg)
    assert not os.path.exists(os.path.join(cfg.prepared_path, "manifest.json"))

    # bad eval rows after the eval_max_samples-th row are never built, so never fatal: one
    # in the chunk that reaches the limit (a worker fails it; the parent rebuilds it), one later
    held = write_lines(tmp_path / "held.jsonl", with_bad_rows(demo[300:330], {
        12: {"question": "no answer", "label": "1"}, 25: {"answer": "x", "label": "1"}}))
    cfg = make_cfg(tmp_path, smollm2_dir, "fail_eval", 2, train_dataset_path=write_lines(
        tmp_path / "ok.jsonl", demo[:40]), eval_dataset_path=held, eval_max_samples=10,
        on_bad_row="fail")
    manifest = prepare(cfg)
    assert manifest["splits"]["eval"]["rows"] == 10 and manifest["bad_rows"]["count"] == 0


def test_rerun_with_another_worker_count_is_a_noop(tmp_path, smollm2_dir, force_parallel):
    train = write_lines(tmp_path / "train.jsonl", demo_lines()[:40])
    cfg = make_cfg(tmp_path, smollm2_dir, "run", 1, train_dataset_path=train)
    first = prepare(cfg)
    stamp = os.stat(os.path.join(cfg.prepared_path, "train.parquet")).st_mtime_ns
    for workers in (2, 8):
        cfg.data.preprocess_num_workers = workers
        assert prepare(cfg) == first
    assert os.stat(os.path.join(cfg.prepared_path, "train.parquet")).st_mtime_ns == stamp
    assert "preprocess_num_workers" not in first["config"]["data"]


def test_cross_tokenizer_counts_and_teacher_columns_merge(tmp_path, smollm2_dir, wordlevel_tokenizer_dir,
                                                          force_parallel):
    train = write_lines(tmp_path / "train.jsonl", with_bad_rows(demo_lines()[:100], {
        30: {"question": "no answer", "label": "1"}}))
    over = {"train_dataset_path": train, "student_name_or_path": wordlevel_tokenizer_dir,
            "kd_algorithm": "simple_ctkd", "max_len": 300, "eval_ratio": 0.1}
    first = prepare(make_cfg(tmp_path, smollm2_dir, "one", 1, **over))
    two = make_cfg(tmp_path, smollm2_dir, "two", 2, **over)
    second = prepare(two)
    assert outputs(two) == outputs(make_cfg(tmp_path, smollm2_dir, "one", 1, **over))
    assert without_created_at(second) == without_created_at(first)
    counts = second["cross_tokenizer"]["counts"]["train"]
    assert counts["aligned"] > 0 and counts["loss_tokens"] > 0
    assert second["tokenizers"]["teacher_tokenization"] is True
