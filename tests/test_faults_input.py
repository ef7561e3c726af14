"""Fault suite, bad input: 40+ kinds, each a clear error or ONE reported bad row (file, row,
field, reason) with every other row kept. The prepare stage runs for real on the SmolLM2
tokenizer; each case is a small file of good rows with the fault in the middle (row 2).

A row-level case lists ``(field, reason regex)`` of the one bad row; ``None`` means the
input must be read with no bad row at all (BOM, CRLF: they used to lose or break rows). A
file-level case lists the DataError message regex.
"""

from __future__ import annotations

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubedistill.config import Config
from kubedistill.data.prepare import prepare
from kubedistill.data.prepared import load_split
from kubedistill.errors import DataError


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                         {"role": "assistant", "content": f"It is {2 * i}."}]}


def qa(i: int) -> dict:
    return {"question": f"what is {i} plus {i}?", "answer": f"It is {2 * i}.", "label": 2 * i}


def lines(bad: str | bytes, good=chat, n: int = 3) -> bytes:
    """jsonl with good rows 1, 3, 4 and ``bad`` as line 2."""
    rows = [json.dumps(good(i)).encode() for i in range(n)]
    rows.insert(1, bad if isinstance(bad, bytes) else bad.encode())
    return b"\n".join(rows) + b"\n"


def bad_chat(messages) -> str:
    return json.dumps({"messages": messages})


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
QA = {"input_key": "question", "output_key": "answer"}

# name -> (file name, bytes, config overrides, (field, reason regex) | None)
ROW_CASES = {
    "malformed_json": ("d.jsonl", lines('{"messages": [}'), {}, (None, "malformed JSON")),
    "truncated_line": ("d.jsonl", lines('{"messages": [{"role": "user"'), {},
                       (None, "malformed JSON")),
    "array_not_object": ("d.jsonl", lines("[1, 2]"), {}, (None, "expected a JSON object")),
    "string_not_object": ("d.jsonl", lines('"hello"'), {}, (None, "expected a JSON object")),
    "number_not_object": ("d.jsonl", lines("42"), {}, (None, "expected a JSON object")),
    "null_row": ("d.jsonl", lines("null"), {}, (None, "expected a JSON object")),
    "not_utf8": ("d.jsonl", lines(b'{"messages": "\xff\xfe"}'), {}, (None, "not UTF-8")),
    "lone_surrogate": ("d.jsonl", lines('{"messages": [{"role": "user", "content": '
                                        '"a \\ud800"}, {"role": "assistant", "content": "b"}]}'),
                       {}, ("messages[0]", "undecodable")),
    "messages_a_string": ("d.jsonl", lines('{"messages": "hello"}'), {},
                          ("messages", "expected a list of messages")),
    "messages_a_number": ("d.jsonl", lines('{"messages": 7}'), {},
                          ("messages", "expected a list of messages")),
    "messages_empty": ("d.jsonl", lines(bad_chat([])), {}, ("messages", "non-empty list")),
    "message_not_object": ("d.jsonl", lines(bad_chat(["hi", A])), {},
                           ("messages[0]", "expected a message object")),
    "message_without_role": ("d.jsonl", lines(bad_chat([{"content": "x"}, A])), {},
                             ("messages[0]", "neither 'role' nor 'from'")),
    "unknown_role": ("d.jsonl", lines(bad_chat([{"role": "robot", "content": "x"}, A])), {},
                     ("messages[0]", "unsupported role 'robot'")),
    "assistant_first": ("d.jsonl", lines(bad_chat([A, U, A])), {},
                        ("messages", "wrong role order")),
    "two_user_turns": ("d.jsonl", lines(bad_chat([U, U, A])), {},
                       ("messages", "wrong role order")),
    "system_in_the_middle": ("d.jsonl", lines(bad_chat(
        [U, {"role": "system", "content": "s"}, A])), {}, ("messages", "wrong role order")),
    "ends_with_user": ("d.jsonl", lines(bad_chat([U, A, U])), {},
                       ("messages", "must end with an assistant")),
    "only_system": ("d.jsonl", lines(bad_chat([{"role": "system", "content": "s"}])), {},
                    ("messages", "must end with an assistant")),
    "empty_response": ("d.jsonl", lines(bad_chat([U, {"role": "assistant", "content": " "}])),
                       {}, ("messages", "empty response")),
    "content_null": ("d.jsonl", lines(bad_chat([{"role": "user", "content": None}, A])), {},
                     ("messages[0]", "missing value")),
    "content_a_number": ("d.jsonl", lines(bad_chat([{"role": "user", "content": 3}, A])), {},
                         ("messages[0]", "expected a string")),
    "image_content_part": ("d.jsonl", lines(bad_chat(
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, A])), {},
        ("messages[0]", "unsupported content part 'image_url'")),
    "content_part_not_object": ("d.jsonl", lines(bad_chat(
        [{"role": "user", "content": ["hi"]}, A])), {},
        ("messages[0]", "unsupported content part")),
    "key_missing_in_one_row": ("d.jsonl", lines('{"prompt": "x"}'), {},
                               ("messages", "missing key")),
    "sharegpt_unknown_from": ("d.jsonl", lines(json.dumps({"conversations": [
        {"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]})), {},
        ("conversations[0]", "unsupported role 'alien'")),
    "sharegpt_value_null": ("d.jsonl", lines(json.dumps({"conversations": [
        {"from": "human", "value": None}, {"from": "gpt", "value": "y"}]})), {},
        ("conversations[0]", "missing value")),
    "alpaca_instruction_null": ("d.jsonl", lines(json.dumps(
        {"instruction": None, "output": "y"})), {}, ("instruction", "missing value")),
    "answer_missing": ("d.jsonl", lines('{"question": "q", "label": 1}', qa), QA,
                       ("answer", "missing key")),
    "answer_a_number": ("d.jsonl", lines('{"question": "q", "answer": 5, "label": 1}', qa), QA,
                        ("answer", "expected a string")),
    "answer_null": ("d.jsonl", lines('{"question": "q", "answer": null, "label": 1}', qa), QA,
                    ("answer", "missing value")),
    "question_null": ("d.jsonl", lines('{"question": null, "answer": "a", "label": 1}', qa), QA,
                      ("question", "missing value")),
    "label_missing": ("d.jsonl", lines('{"question": "q", "answer": "a"}', qa),
                      {**QA, "label_key": "label"}, ("label", "missing key")),
    "teacher_prompt_missing": ("d.jsonl", lines('{"question": "q", "answer": "a"}', lambda i: {
        **qa(i), "tq": f"t{i}"}), {**QA, "teacher_input_key": "tq"}, ("tq", "missing key")),
    "plain_text_empty": ("d.jsonl", lines('{"text": "  "}', lambda i: {"text": f"row {i}"}),
                         {"input_key": "text"}, ("text", "empty text")),
    "plain_text_a_number": ("d.jsonl", lines('{"text": 12}', lambda i: {"text": f"row {i}"}),
                            {"input_key": "text"}, ("text", "expected a string")),
    "csv_extra_column": ("d.csv", b"question,answer,label\nq0,a0,0\nq1,a1,1,EXTRA\nq2,a2,2\n"
                         b"q3,a3,3\n", QA, (None, "expected 3 columns, got 4")),
    "csv_missing_cell": ("d.csv", b"question,answer,label\nq0,a0,0\nq1\nq2,a2,2\nq3,a3,3\n",
                         QA, (None, "expected 3 columns, got 1")),
    "csv_empty_answer": ("d.csv", b"question,answer,label\nq0,a0,0\nq1,,1\nq2,a2,2\nq3,a3,3\n",
                         QA, ("answer", "missing value|empty response")),
    "json_array_item_not_object": ("d.json", json.dumps([chat(0), "x", chat(1), chat(2)]
                                                        ).encode(), {},
                                   (None, "expected a JSON object")),
    "json_array_messages_string": ("d.json", json.dumps(
        [chat(0), {"messages": "hi"}, chat(1), chat(2)]).encode(), {},
        ("messages", "expected a list of messages")),
    "parquet_null_answer": ("d.parquet", None, QA, ("answer", "missing value")),
    "gzip_jsonl_bad_row": ("d.jsonl.gz", gzip.compress(lines('{"messages": [}')), {},
                           (None, "malformed JSON")),
    # inputs that used to lose or break rows: read in full, no bad row
    "utf8_bom_jsonl": ("d.jsonl", b"\xef\xbb\xbf" + lines(json.dumps(chat(9))), {}, None),
    "crlf_jsonl": ("d.jsonl", lines(json.dumps(chat(9))).replace(b"\n", b"\r\n"), {}, None),
    "utf8_bom_csv": ("d.csv", b"\xef\xbb\xbfquestion,answer,label\r\nq0,a0,0\r\nq1,a1,1\r\n"
                     b"q2,a2,2\r\nq3,a3,3\r\n", QA, None),
}

# name -> (file name, bytes, config overrides, DataError regex)
FILE_CASES = {
    "csv_without_output_column": ("d.csv", b"question,label\nq0,0\nq1,1\n", QA,
                                  r"column 'answer' \(output_key\) is missing from every row; "
                                  r"the file has columns: label, question"),
    "jsonl_without_input_key": ("d.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n', {},
                                r"column 'messages' \(input_key\) is missing from every row; "
                                r"the file has columns: prompt"),
    "label_column_missing": ("d.jsonl", b'{"question": "q", "answer": "a"}\n',
                             {**QA, "label_key": "gold"}, r"column 'gold' \(label_key\)"),
    "unknown_extension": ("d.txt", b"hello\n", {}, "unknown data format"),
    "corrupt_parquet": ("d.parquet", b"PAR1 this is not parquet", {}, "cannot read as parquet"),
    "corrupt_gzip": ("d.jsonl.gz", b"\x1f\x8bnot really gzip", {}, "cannot read"),
    "every_row_bad": ("d.jsonl", b'{"messages": "a"}\n{"messages": "b"}\n', {},
                      "no train rows"),
}


def _write(tmp_path, name: str, data: bytes | None) -> str:
    path = tmp_path / name
    if data is None:  # parquet: 4 rows, row 2 with a null answer
        rows = [qa(0), {"question": "q", "answer": None, "label": 1}, qa(2), qa(3)]
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_bytes(data)
    return str(path)


def _cfg(tmp_path, model_dir: str, data: str, over: dict) -> Config:
    cfg = Config()
    cfg.model.teacher_name_or_path = model_dir
    cfg.storage.work_dir = str(tmp_path / "run")
    for key, value in {"train_dataset_path": data, "eval_ratio": 0.0, "preprocess_num_workers": 1,
                       "kd_algorithm": "sft", **over}.items():
        cfg.set(key, value)
    return cfg.validate()


def test_the_suite_has_forty_kinds():
    assert len(ROW_CASES) + len(FILE_CASES) >= 40


@pytest.mark.parametrize("name", sorted(ROW_CASES))
def test_bad_row_is_reported_and_the_rest_kept(name, tmp_path, tiny_model_dir):
    file_name, data, over, expected = ROW_CASES[name]
    cfg = _cfg(tmp_path, tiny_model_dir, _write(tmp_path, file_name, data), over)
    manifest = prepare(cfg)
    bad_path = tmp_path / "run" / "prepared" / "bad_rows.jsonl"
    bad = [json.loads(x) for x in bad_path.read_text().splitlines()] if bad_path.exists() else []
    kept = load_split(cfg.prepared_path, "train").column("id").to_pylist()
    if expected is None:
        assert bad == [] and len(kept) == 4, (bad, kept)
        return
    field, reason = expected
    assert len(bad) == 1, bad
    assert bad[0]["row"] == 2 and bad[0]["file"].endswith(file_name), bad[0]
    assert bad[0]["field"] == field, bad[0]
    assert re.search(reason, bad[0]["reason"]), bad[0]
    assert len(kept) == 3 and manifest["splits"]["train"]["rows"] == 3, kept
    assert not any(k.endswith(":2") for k in kept)


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_unusable_file_is_one_clear_error(name, tmp_path, tiny_model_dir):
    file_name, data, over, message = FILE_CASES[name]
    cfg = _cfg(tmp_path, tiny_model_dir, _write(tmp_path, file_name, data), over)
    with pytest.raises(DataError, match=message):
        prepare(cfg)
    assert not (tmp_path / "run" / "prepared" / "manifest.json").exists()
