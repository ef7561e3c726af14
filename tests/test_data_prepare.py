"""The prepare stage end to end: bad rows, mixtures, split, length policy, S3, reruns,
teacher tokenization and the tokenizer-pair preflight (real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import os
import re

import pyarrow.parquet as pq
import pytest

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.data.prepare import prepare
from kubedistill.data.prepared import load_split, read_manifest
from kubedistill.errors import ConfigError, DataError


def rows(n: int, tag: str = "q") -> list[dict]:
    return [{"question": f"{tag}{i}: what is {i} plus {i}?", "answer": f"It is {2 * i}.",
             "label": 2 * i} for i in range(n)]


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def make_cfg(tmp_path, model_dir: str, train: str, **over) -> Config:
    cfg = Config()
    cfg.model.teacher_name_or_path = model_dir
    cfg.storage.work_dir = str(tmp_path / "run")
    for key, value in {"train_dataset_path": train, "input_key": "question",
                       "output_key": "answer", "label_key": "label", **over}.items():
        cfg.set(key, value)
    return cfg.validate()


def ids(cfg, split: str) -> list[str]:
    return load_split(cfg.prepared_path, split).column("id").to_pylist()


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from kubedistill.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_bad_rows_are_skipped_and_reported(tmp_path, smollm2_dir):
    lines = [json.dumps(r) for r in rows(100)]
    lines[6] = '{"question": "broken JSON", "answer": '  # line 7
    lines[22] = json.dumps({"question": "no answer key"})  # line 23
    lines[41] = json.dumps({"question": "empty", "answer": "   ", "label": 1})  # line 42
    lines[60] = json.dumps({"question": [{"role": "assistant", "content": "x"}],
                            "answer": "y", "label": 1})  # line 61: wrong role order
    lines[87] = json.dumps({"question": "bad \ud800 text", "answer": "z", "label": 1})  # 88
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tmp_path, smollm2_dir, str(path))
    manifest = prepare(cfg)
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["eval"]["rows"] == 95
    assert manifest["splits"]["eval"]["rows"] == 5  # eval_ratio 0.05
    report = [json.loads(x) for x in
              open(os.path.join(cfg.prepared_path, "bad_rows.jsonl")).read().splitlines()]
    assert [(b["row"], b["file"]) for b in report] == [(n, str(path)) for n in
                                                       (7, 23, 42, 61, 88)]
    reasons = [b["reason"] for b in report]
    assert "malformed JSON" in reasons[0] and reasons[1] == "missing key"
    assert reasons[2] == "empty response" and "wrong role order" in reasons[3]
    assert "undecodable" in reasons[4]
    assert [b["field"] for b in report[1:]] == ["answer", "answer", "question", "question"]
    assert manifest["bad_rows"]["count"] == 5 and manifest["bad_rows"]["rows"] == report
    kept = set(ids(cfg, "train")) | set(ids(cfg, "eval"))
    assert len(kept) == 95 and not kept & {f"data:{n}" for n in (7, 23, 42, 61, 88)}
    assert manifest["inputs"][0]["rows_bad"] == 5 and manifest["inputs"][0]["rows_read"] == 100

    cfg.set("on_bad_row", "fail")
    cfg.storage.work_dir = str(tmp_path / "fail")
    with pytest.raises(DataError, match=re.escape(f"{path} row 7") + ".*malformed JSON"):
        prepare(cfg)
    assert not storage.exists(os.path.join(cfg.prepared_path, "manifest.json"))


def test_every_input_format_and_teacher_columns_null_for_one_tokenizer(tmp_path, smollm2_dir):
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows(12)), str(tmp_path / "d.parquet"))
    cfg = make_cfg(tmp_path, smollm2_dir, str(tmp_path / "d.parquet"), eval_ratio=0.25)
    manifest = prepare(cfg)
    table = load_split(cfg.prepared_path, "train")
    assert table.num_rows == 9 and manifest["splits"]["eval"]["rows"] == 3
    assert table.column("teacher_input_ids").null_count == 9
    assert manifest["tokenizers"]["teacher_tokenization"] is False
    row = table.slice(0, 1).to_pylist()[0]
    assert row["num_tokens"] == len(row["input_ids"]) == len(row["loss_mask"])
    assert row["loss_mask"][0] == 0 and row["loss_mask"][row["prompt_len"]] == 1
    assert 1 not in row["loss_mask"][:row["prompt_len"]]
    assert row["label"] == str(2 * int(row["id"].split(":")[1]) - 2)  # row n holds i = n-1


def test_mixture_by_probs(tmp_path, smollm2_dir):
    a = write_jsonl(tmp_path / "a.jsonl", rows(100, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rows(100, "b"))
    cfg = make_cfg(tmp_path, smollm2_dir, f"{a},{b}", train_dataset_probs="0.8,0.2",
                   max_samples=50, eval_ratio=0)
    manifest = prepare(cfg)
    first = ids(cfg, "train")
    assert sum(i.startswith("a:") for i in first) == 40
    assert sum(i.startswith("b:") for i in first) == 10
    assert manifest["mixture"]["per_dataset"] == [40, 10]
    assert [x["rows_used"] for x in manifest["inputs"]] == [40, 10]
    cfg.storage.work_dir = str(tmp_path / "again")
    prepare(cfg)
    assert ids(cfg, "train") == first  # seeded
    cfg.storage.work_dir, cfg.train.seed = str(tmp_path / "seed"), 7
    prepare(cfg)
    assert ids(cfg, "train") != first
    small = write_jsonl(tmp_path / "small.jsonl", rows(10, "s"))
    cfg = make_cfg(tmp_path, smollm2_dir, f"{a},{small}", train_dataset_probs="1,1",
                   max_samples=60, eval_ratio=0)
    cfg.storage.work_dir = str(tmp_path / "oversample")
    manifest = prepare(cfg)
    got = ids(cfg, "train")
    assert len(got) == len(set(got)) == 60 and manifest["mixture"]["repeated"] == [0, 20]
    assert sum(i.startswith("small:") for i in got) == 30


def test_split_is_seeded_and_disjoint(tmp_path, smollm2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", rows(100))
    cfg = make_cfg(tmp_path, smollm2_dir, data, eval_ratio=0.1)
    prepare(cfg)
    train, held_out = ids(cfg, "train"), ids(cfg, "eval")
    assert len(held_out) == 10 and len(train) == 90 and not set(train) & set(held_out)
    assert set(train) | set(held_out) == {f"d:{n}" for n in range(1, 101)}
    cfg.storage.work_dir = str(tmp_path / "same")
    prepare(cfg)
    assert ids(cfg, "eval") == held_out
    cfg.storage.work_dir, cfg.train.seed = str(tmp_path / "other"), 1
    prepare(cfg)
    assert ids(cfg, "eval") != held_out
    cfg.storage.work_dir, cfg.data.eval_max_samples = str(tmp_path / "capped"), 4
    prepare(cfg)
    assert len(ids(cfg, "eval")) == 4 and len(ids(cfg, "train")) == 96


def test_eval_from_its_own_path_is_capped(tmp_path, smollm2_dir):
    train = write_jsonl(tmp_path / "t.jsonl", rows(20))
    held = write_jsonl(tmp_path / "e.jsonl", rows(30, "e"))
    cfg = make_cfg(tmp_path, smollm2_dir, train, eval_dataset_path=held, eval_max_samples=7)
    manifest = prepare(cfg)
    assert ids(cfg, "eval") == [f"e:{n}" for n in range(1, 8)]
    assert len(ids(cfg, "train")) == 20
    assert [x["role"] for x in manifest["inputs"]] == ["train", "eval"]


def test_length_policy_counts(tmp_path, smollm2_dir, tok):
    items = rows(10)
    for i in (2, 5, 7):
        items[i]["answer"] = "word " * 200  # ~200 tokens of response
    items[4]["question"] = "long question " * 100
    data = write_jsonl(tmp_path / "d.jsonl", items)
    cfg = make_cfg(tmp_path, smollm2_dir, data, max_len=128, prompt_max_len=96, eval_ratio=0)
    manifest = prepare(cfg)
    assert manifest["length"]["train"] == {"kept": 6, "filtered_too_long": 3,
                                           "filtered_prompt_too_long": 1}
    assert sorted(manifest["length"]["filtered_ids"]) == ["d:3", "d:5", "d:6", "d:8"]
    cfg.storage.work_dir = str(tmp_path / "truncate")
    cfg.data.length_policy = "truncate"
    manifest = prepare(cfg)
    assert manifest["length"]["train"] == {"kept": 10, "truncated": 3, "truncated_prompt": 1}
    table = load_split(cfg.prepared_path, "train").to_pylist()
    assert max(r["num_tokens"] for r in table) == 128
    long_prompt = next(r for r in table if r["id"] == "d:5")
    assert long_prompt["prompt_len"] == 96
    assert tok.decode(long_prompt["input_ids"][:96]).endswith("<|im_start|>assistant\n")


def test_s3_round_trip(s3_bucket, tmp_path, smollm2_dir):
    src = f"{s3_bucket}/raw/train.jsonl"
    storage.write_bytes_atomic(src, "".join(json.dumps(r) + "\n" for r in rows(20)).encode())
    cfg = make_cfg(tmp_path, smollm2_dir, src, eval_ratio=0.1)
    cfg.storage.work_dir = f"{s3_bucket}/run"
    manifest = prepare(cfg)
    assert cfg.prepared_path.startswith("s3://")
    for name in ("train.parquet", "eval.parquet", "bad_rows.jsonl", "manifest.json"):
        assert storage.exists(storage.join(cfg.prepared_path, name))
    assert read_manifest(cfg.prepared_path)["data_hash"] == manifest["data_hash"]
    table = load_split(cfg.prepared_path, "train", verify=True)
    assert table.num_rows == 18 and ids(cfg, "eval")[0].startswith("train:")
    assert prepare(cfg)["created_at"] == manifest["created_at"]  # rerun on S3: no-op


def test_rerun_is_a_noop_until_something_changes(tmp_path, smollm2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", rows(20))
    cfg = make_cfg(tmp_path, smollm2_dir, data)
    first = prepare(cfg)
    train_file = os.path.join(cfg.prepared_path, "train.parquet")
    stamp = os.stat(train_file).st_mtime_ns
    assert prepare(cfg) == first and os.stat(train_file).st_mtime_ns == stamp
    cfg.data.max_len = 64  # config change -> rebuilt
    assert prepare(cfg)["fingerprint"] != first["fingerprint"]
    cfg.data.max_len = 4096
    again = prepare(cfg)
    assert again["data_hash"] == first["data_hash"]  # same content, same hash
    with open(train_file, "ab") as f:  # a damaged split file is rebuilt too
        f.write(b"x")
    assert prepare(cfg)["created_at"] >= again["created_at"]
    assert load_split(cfg.prepared_path, "train", verify=True).num_rows == 19
    write_jsonl(tmp_path / "d.jsonl", rows(21))  # input change -> rebuilt
    assert prepare(cfg)["splits"]["train"]["rows"] == 20


def test_train_all_assistant_turns_changes_targets_and_fingerprint(tmp_path, smollm2_dir, tok):
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"},
                           {"role": "assistant", "content": f"hello {i}"},
                           {"role": "user", "content": "and?"},
                           {"role": "assistant", "content": f"bye {i}"}]} for i in range(10)]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    cfg = make_cfg(tmp_path, smollm2_dir, data, input_key="messages", output_key=None,
                   label_key=None, eval_ratio=0.0)
    assert cfg.data.train_all_assistant_turns is False  # KDFlow: the last turn only
    last = prepare(cfg)
    table = load_split(cfg.prepared_path, "train").to_pylist()

    def target_text(row):
        return tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True)
                           if m])

    assert {target_text(r) for r in table} == {f"bye {i}<|im_end|>" for i in range(10)}
    cfg.data.train_all_assistant_turns = True
    every = prepare(cfg)
    assert every["fingerprint"] != last["fingerprint"]
    table = load_split(cfg.prepared_path, "train").to_pylist()
    assert {target_text(r) for r in table} == {f"hello {i}<|im_end|>bye {i}<|im_end|>"
                                               for i in range(10)}


def test_empty_result_is_a_data_error(tmp_path, smollm2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "", "label": "1"}] * 3)
    with pytest.raises(DataError, match="no train rows"):
        prepare(make_cfg(tmp_path, smollm2_dir, data))


def test_preflight_refuses_vanilla_kd_across_tokenizers(tmp_path, smollm2_dir,
                                                        wordlevel_tokenizer_dir, tok):
    data = write_jsonl(tmp_path / "d.jsonl", rows(10))
    cfg = make_cfg(tmp_path, smollm2_dir, data, student_name_or_path=wordlevel_tokenizer_dir,
                   kd_algorithm="vanilla_kd", eval_ratio=0)
    with pytest.raises(ConfigError, match="simple_ctkd.*dskd"):
        prepare(cfg)
    cfg.kd.kd_algorithm = "simple_ctkd"
    manifest = prepare(cfg)
    pre = manifest["preflight"]
    assert pre["same_vocab"] is False and 0 < pre["vocab_overlap"]["student_in_teacher"] < 1
    assert pre["teacher"]["embedding_rows"] == 49152 and pre["student"]["embedding_rows"] is None
    assert pre["special_tokens"]["eos"]["teacher_id"] is None  # [EOS] is not a SmolLM2 token
    assert manifest["tokenizers"]["teacher_tokenization"] is True
    row = load_split(cfg.prepared_path, "train").to_pylist()[0]
    teacher_targets = [i for i, m in zip(row["teacher_input_ids"], row["teacher_loss_mask"],
                                         strict=True) if m]
    assert tok.decode(teacher_targets) == row["response"] + "<|im_end|>"
    assert row["teacher_loss_mask"][row["teacher_prompt_len"]] == 1
    cfg.kd.kd_algorithm = "sft"  # no teacher at all
    cfg.storage.work_dir = str(tmp_path / "sft")
    cfg.model.teacher_name_or_path = None
    assert prepare(cfg)["preflight"] is None


def test_teacher_input_key_gives_teacher_its_own_prompt(tmp_path, smollm2_dir):
    items = [{**r, "hinted": r["question"] + " Hint: double it."} for r in rows(6)]
    data = write_jsonl(tmp_path / "d.jsonl", items)
    cfg = make_cfg(tmp_path, smollm2_dir, data, teacher_input_key="hinted", eval_ratio=0)
    prepare(cfg)
    for row in load_split(cfg.prepared_path, "train").to_pylist():
        assert row["teacher_prompt_len"] > row["prompt_len"]
        student = [i for i, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
        teacher = [i for i, m in zip(row["teacher_input_ids"], row["teacher_loss_mask"],
                                     strict=True) if m]
        assert student == teacher


def test_packaged_demo_through_prepare(tmp_path, smollm2_dir):
    cfg = make_cfg(tmp_path, smollm2_dir, "packaged:gsm8k-train",
                   eval_dataset_path="packaged:gsm8k-eval", max_samples=8, eval_max_samples=4,
                   max_len=512)
    manifest = prepare(cfg)
    table = load_split(cfg.prepared_path, "eval")
    assert table.column("id").to_pylist()[0].startswith("gsm8k-eval:")
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", x) for x in table.column("label").to_pylist())
    assert manifest["splits"]["train"]["rows"] == 8
    assert manifest["inputs"][0]["files"][0]["uri"].endswith("gsm8k-demo/train.jsonl")


def _bad_row_table_rows() -> list[dict]:
    """12 rows; row 4 has a null answer, row 9 a blank one (1-based, as reported)."""
    items = rows(12, tag="t")
    items[3]["answer"] = None
    items[8]["answer"] = "   "
    return items


def _write_format(tmp_path, fmt: str, items: list[dict]) -> tuple[str, str]:
    """(reference for train_dataset_path, the file that bad_rows.jsonl names)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pa.Table.from_pylist(items)
    if fmt == "csv":
        path = str(tmp_path / "d.csv")
        pacsv.write_csv(table, path)
    elif fmt == "json":
        path = str(tmp_path / "d.json")
        (tmp_path / "d.json").write_text(json.dumps(items))
    elif fmt == "parquet":
        path = str(tmp_path / "d.parquet")
        pq.write_table(table, path)
    else:  # arrow (IPC file), or an HF save_to_disk folder (Arrow stream shard + state.json)
        folder = tmp_path / "ds" if fmt == "hf" else tmp_path
        folder.mkdir(exist_ok=True)
        path = str(folder / ("data-00000-of-00001.arrow" if fmt == "hf" else "d.arrow"))
        writer = pa.ipc.new_stream if fmt == "hf" else pa.ipc.new_file
        with writer(path, table.schema) as w:
            w.write_table(table)
        if fmt == "hf":
            (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
            (folder / "state.json").write_text(json.dumps({
                "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}))
            return str(folder), path
    return path, path


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "arrow", "hf"])
def test_bad_rows_in_every_format_are_reported_and_the_rest_kept(tmp_path, smollm2_dir, fmt):
    ref, file = _write_format(tmp_path, fmt, _bad_row_table_rows())
    cfg = make_cfg(tmp_path, smollm2_dir, ref, eval_ratio=0.0)
    manifest = prepare(cfg)
    report = [json.loads(x) for x in
              open(os.path.join(cfg.prepared_path, "bad_rows.jsonl")).read().splitlines()]
    assert [(b["row"], b["field"]) for b in report] == [(4, "answer"), (9, "answer")]
    assert {b["file"] for b in report} == {file}
    null = "empty response" if fmt == "csv" else "missing value (null)"  # CSV has no null
    assert [b["reason"] for b in report] == [null, "empty response"]
    assert manifest["splits"]["train"]["rows"] == 10
    kept = load_split(cfg.prepared_path, "train").to_pylist()
    questions = {r["id"]: r for r in kept}
    assert len(questions) == 10
    assert sorted(int(r["label"]) for r in kept) == [2 * i for i in range(12) if i not in (3, 8)]
