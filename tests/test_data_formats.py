"""Raw readers (every file format, HF save_to_disk folders) and chat-format normalisation."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from kubedistill.config import DataConfig
from kubedistill.data.chat import RowError, normalise
from kubedistill.data.formats import read_source
from kubedistill.errors import DataError

ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "label": 2 * i}
        for i in range(5)]


def write(path, fmt: str, rows=ROWS):
    table = pa.Table.from_pylist(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        pacsv.write_csv(table, str(path))
    elif fmt == "parquet":
        pq.write_table(table, str(path))
    elif fmt == "arrow-file":
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    elif fmt == "arrow-stream":
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)
    return str(path)


@pytest.mark.parametrize("fmt,name", [("jsonl", "d.jsonl"), ("json", "d.json"),
                                      ("csv", "d.csv"), ("parquet", "d.parquet"),
                                      ("arrow-file", "d.arrow"), ("arrow-stream", "d.arrow")])
def test_each_file_format_reads_the_same_rows(tmp_path, fmt, name):
    src = read_source(write(tmp_path / name, fmt))
    assert [r.data["question"] for r in src.records] == [r["question"] for r in ROWS]
    assert [str(r.data["label"]) for r in src.records] == [str(r["label"]) for r in ROWS]
    assert [r.row for r in src.records] == [1, 2, 3, 4, 5]
    assert src.name == "d" and len(src.files) == 1 and len(src.files[0]["sha256"]) == 64


def test_json_variants_and_gzip(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "b.json").write_text(json.dumps({"question": ["q1", "q2"], "answer": ["1", "2"]}))
    (tmp_path / "c.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # JSON lines
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"question": "q"}\n'))
    assert len(read_source(str(tmp_path / "a.json")).records) == 5
    assert [r.data for r in read_source(str(tmp_path / "b.json")).records] == [
        {"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]
    assert len(read_source(str(tmp_path / "c.json")).records) == 5
    gz = read_source(str(tmp_path / "d.jsonl.gz"))
    assert gz.records[0].data == {"question": "q"} and gz.name == "d"


def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    """The layout datasets.Dataset.save_to_disk writes: Arrow *stream* shards + state.json."""
    ds = tmp_path / "ds"
    ds.mkdir()
    write(ds / "data-00000-of-00002.arrow", "arrow-stream", ROWS[:3])
    write(ds / "data-00001-of-00002.arrow", "arrow-stream", ROWS[3:])
    (ds / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (ds / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}],
        "_split": "train"}))
    src = read_source(str(ds))
    assert src.format == "hf_arrow" and len(src.files) == 2
    assert [r.data["question"] for r in src.records] == [r["question"] for r in ROWS]
    assert src.row_id(src.records[3]) == "ds/data-00001-of-00002.arrow:1"
    dd = tmp_path / "dd"
    (dd / "train").mkdir(parents=True)
    for f in ds.iterdir():
        (dd / "train" / f.name).write_bytes(f.read_bytes())
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert len(read_source(str(dd), "train").records) == 5
    with pytest.raises(DataError, match="split 'eval' not found"):
        read_source(str(dd), "eval")


def test_bad_lines_are_records_with_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": \n[1, 2]\n{"a": "\xff\xfe"}\n{"a": 2}\n')
    recs = read_source(str(path)).records
    assert [(r.row, r.error is None) for r in recs] == [(1, True), (3, False), (4, False),
                                                        (5, False), (6, True)]
    assert "malformed JSON" in recs[1].error and "JSON object" in recs[2].error
    assert "not UTF-8" in recs[3].error
    with pytest.raises(DataError, match="does not exist"):
        read_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "y.csv").write_text("a,b\n1,2\n1,2,3\n4,5\n6\n")
    recs = read_source(str(tmp_path / "y.csv")).records
    assert [(r.row, r.data) for r in recs] == [(1, {"a": 1, "b": 2}), (2, None),
                                               (3, {"a": 4, "b": 5}), (4, None)]
    assert recs[1].error == "line 3: expected 2 columns, got 3"
    (tmp_path / "z.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="z.parquet"):
        read_source(str(tmp_path / "z.parquet"))


# ---- chat formats -------------------------------------------------------------------------
def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_openai_messages():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                        {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}
    conv = normalise(row, cfg())
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.response == "A"


def test_sharegpt_explicit_and_detected():
    row = {"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"},
                             {"from": "human", "value": "U2"}, {"from": "gpt", "value": "B"}]}
    for data in (cfg(input_key="conversations"), cfg()):
        conv = normalise(row, data)
        assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
        assert conv.response == "B"


def test_alpaca():
    conv = normalise({"instruction": "Add", "input": "1 and 2", "output": "3"}, cfg())
    assert conv.messages == [{"role": "user", "content": "Add\n\n1 and 2"},
                             {"role": "assistant", "content": "3"}]
    assert normalise({"instruction": "Hi", "input": "", "output": "Hello"},
                     cfg()).messages[0]["content"] == "Hi"


def test_prompt_response_string_and_messages_prompt():
    data = cfg(input_key="q", output_key="a", label_key="y")
    conv = normalise({"q": "Q", "a": "A", "y": 7}, data)
    assert conv.messages == [{"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "A"}] and conv.label == "7"
    conv = normalise({"q": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                      "a": "A", "y": None}, data)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.label is None


def test_teacher_input_key_gets_own_prompt_and_same_reply():
    data = cfg(input_key="q", output_key="a", teacher_input_key="hinted")
    conv = normalise({"q": "Q", "a": "A", "hinted": "Q (hint: it is A)"}, data)
    assert conv.teacher_messages == [{"role": "user", "content": "Q (hint: it is A)"},
                                     {"role": "assistant", "content": "A"}]


QA = {"input_key": "q", "output_key": "a", "label_key": "y"}


@pytest.mark.parametrize("row,kw,field,reason", [
    ({"x": 1}, {}, "messages", "missing key"),
    ({"messages": [{"role": "assistant", "content": "A"}]}, {}, "messages", "wrong role order"),
    ({"messages": [{"role": "user", "content": "U"}, {"role": "user", "content": "U"},
                   {"role": "assistant", "content": "A"}]}, {}, "messages", "wrong role order"),
    ({"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "  "}]},
     {}, "messages", "empty response"),
    ({"messages": [{"role": "user", "content": "U"}]}, {}, "messages", "end with an assistant"),
    ({"messages": [{"role": "user", "content": "U"}, {"role": "tool", "content": "A"}]}, {},
     "messages[1]", "unsupported role"),
    ({"messages": [{"role": "user", "content": "U\ud800"},
                   {"role": "assistant", "content": "A"}]}, {}, "messages[0]", "undecodable"),
    ({"q": "Q", "a": "A"}, QA, "y", "missing key"),
    ({"q": "Q", "y": 1}, QA, "a", "missing key"),
    ({"q": None, "a": "A", "y": 1}, QA, "q", "missing value (null)"),
    ({"q": "Q", "a": "", "y": 1}, QA, "a", "empty response"),
    ({"q": 3, "a": "A", "y": 1}, QA, "q", "expected a string"),
])
def test_bad_rows_name_field_and_reason(row, kw, field, reason):
    with pytest.raises(RowError) as err:
        normalise(row, cfg(**kw))
    assert err.value.field == field and reason in err.value.reason


def test_folders_on_s3(s3_bucket):
    """Remote folders list and read through fsspec on moto's S3 server: a plain folder of
    JSONL files (other files ignored) and an HF save_to_disk folder."""
    from kubedistill import storage

    root = f"{s3_bucket}/fmt"
    storage.write_bytes_atomic(f"{root}/plain/a.jsonl", b'{"q": 1}\n')
    storage.write_bytes_atomic(f"{root}/plain/b.jsonl", b'{"q": 2}\n{"q": 3}\n')
    storage.write_bytes_atomic(f"{root}/plain/notes.txt", b"ignored")
    src = read_source(f"{root}/plain")
    assert [src.row_id(r) for r in src.records] == ["plain/a.jsonl:1", "plain/b.jsonl:1",
                                                    "plain/b.jsonl:2"]
    assert [r.data["q"] for r in src.records] == [1, 2, 3]
    assert [f["uri"] for f in src.files] == [f"{root}/plain/a.jsonl", f"{root}/plain/b.jsonl"]

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))
    storage.write_bytes_atomic(f"{root}/ds/data-00000-of-00001.arrow", sink.getvalue().to_pybytes())
    storage.write_json_atomic(f"{root}/ds/state.json", {
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"})
    storage.write_json_atomic(f"{root}/ds/dataset_info.json", {"features": {}})
    hf = read_source(f"{root}/ds")
    assert hf.format == "hf_arrow"
    assert [r.data["question"] for r in hf.records] == [r["question"] for r in ROWS]
