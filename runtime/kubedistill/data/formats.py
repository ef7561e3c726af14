"""Readers for raw datasets: json, jsonl, csv, parquet, Arrow IPC (file or stream), HF
``save_to_disk`` folders, plain folders of such files; local paths or any fsspec URI.

A dataset reference is one of
- a file: the format comes from its extension (``.jsonl``/``.ndjson``, ``.json``, ``.csv``,
  ``.parquet``/``.pq``, ``.arrow``/``.ipc``/``.feather``), optionally compressed
  (``.gz``, ``.bz2``, ``.xz``);
- a folder written by ``datasets.Dataset.save_to_disk`` (``state.json`` lists the Arrow
  stream files), or by ``DatasetDict.save_to_disk`` (``dataset_dict.json``; the split
  sub-folder named by ``train_split`` / ``eval_split`` is read);
- any other folder: every supported file in it (sorted by name);
- ``packaged:NAME``: a packaged demo dataset (:mod:`kubedistill.data.demo`);
- a Hugging Face Hub dataset id (``owner/name``, no such local path): its data files, from
  the local HF cache or downloaded when the network allows (:mod:`kubedistill.models.hub`).

Contract: :func:`read_source` never raises for a bad *row*. A row that cannot be read
(malformed JSON, not UTF-8, not an object) comes back as a :class:`Record` with ``error`` set
and ``data=None``; rows are numbered from 1 (the line number for jsonl, the record index for
other formats). A file that cannot be read at all raises :class:`DataError` naming it.
Text formats may start with a UTF-8 byte-order mark and use CRLF line ends (both are read as
if absent).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kubedistill import storage
from kubedistill.errors import DataError
from kubedistill.failures import translated

PACKAGED_PREFIX = "packaged:"
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
           ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".ipc": "arrow",
           ".feather": "arrow"}
_DECOMPRESS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
_TEXT_FORMATS = ("jsonl", "json", "csv")
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some editors write it


@dataclass
class Record:
    """One raw row. ``data`` is None when the row could not be read; ``error`` says why."""

    file: str
    row: int
    data: dict[str, Any] | None
    error: str | None = None


@dataclass
class Source:
    """One dataset reference, read: its files (with sha256) and its records in order."""

    name: str
    ref: str
    format: str
    files: list[dict[str, Any]] = field(default_factory=list)  # {uri, sha256, bytes, rows}
    records: list[Record] = field(default_factory=list)

    def row_id(self, record: Record) -> str:
        """``<source>:<row>``; ``<source>/<file>:<row>`` when the source has several files."""
        if len(self.files) > 1:
            return f"{self.name}/{posixpath.basename(record.file)}:{record.row}"
        return f"{self.name}:{record.row}"


def _split_ext(name: str) -> tuple[str, str, str]:
    """``a/b.jsonl.gz`` -> (``b``, ``.jsonl``, ``.gz``)."""
    base = posixpath.basename(name.rstrip("/"))
    comp = next((c for c in _DECOMPRESS if base.endswith(c)), "")
    base = base[: len(base) - len(comp)] if comp else base
    stem, dot, ext = base.rpartition(".")
    return (stem, "." + ext.lower(), comp) if dot else (base, "", comp)


def resolve_ref(ref: str) -> tuple[str, str]:
    """(name, uri) of a dataset reference, materialising packaged demo data."""
    if ref.startswith(PACKAGED_PREFIX):
        from kubedistill.data.demo import resolve_packaged

        name = ref[len(PACKAGED_PREFIX):]
        return name, resolve_packaged(name)
    stem = _split_ext(ref)[0]
    return stem or "data", ref


def list_files(ref: str, split: str | None = None) -> tuple[str, str, list[str]]:
    """(name, format, file URIs) of a dataset reference, without reading the files."""
    with translated(ref):
        return _list_files(ref, split)


def _list_files(ref: str, split: str | None) -> tuple[str, str, list[str]]:
    name, uri = resolve_ref(ref)
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        from kubedistill.models import hub

        if hub.is_hub_id(ref):  # a Hugging Face Hub dataset id, as KDFlow takes them
            return name, "folder", hub.dataset_files(ref, split)
        _check_bucket(fs, uri)
        raise DataError(f"dataset {ref} does not exist")
    if not fs.isdir(path):
        fmt = FORMATS.get(_split_ext(path)[1])
        if fmt is None:
            raise DataError(f"{ref}: unknown data format (use one of {', '.join(FORMATS)})")
        return name, fmt, [uri]
    child = lambda p: fs.unstrip_protocol(p) if "://" in uri else p  # noqa: E731
    if fs.exists(posixpath.join(path, "dataset_dict.json")):
        splits = json.loads(fs.cat_file(posixpath.join(path, "dataset_dict.json")))["splits"]
        if split not in splits:
            raise DataError(f"{ref}: split '{split}' not found (splits: {', '.join(splits)})")
        sub = posixpath.join(path, split)
        _, fmt, files = _list_files(child(sub), None)
        return f"{name}.{split}", fmt, files
    if fs.exists(posixpath.join(path, "state.json")):
        state = json.loads(fs.cat_file(posixpath.join(path, "state.json")))
        files = [child(posixpath.join(path, f["filename"])) for f in state["_data_files"]]
        return name, "hf_arrow", files
    files = sorted(p for p in fs.ls(path, detail=False)
                   if _split_ext(p)[1] in FORMATS and not posixpath.basename(p).startswith("."))
    if not files:
        raise DataError(f"{ref}: folder holds no data files ({', '.join(FORMATS)})")
    return name, "folder", [child(p) for p in files]


def _check_bucket(fs, uri: str) -> None:
    """On an object store, a missing bucket is the store's error (exit 5), not a missing
    dataset (exit 3)."""
    if uri.split("://", 1)[0] not in ("s3", "s3a"):
        return
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if bucket and not fs.exists(bucket):
        from kubedistill.errors import ServiceUnavailable
        from kubedistill.failures import s3_endpoint

        raise ServiceUnavailable(f"bucket '{bucket}' does not exist on the object store at "
                                 f"{s3_endpoint()} ({uri}): create it or fix the URI.")


def read_source(ref: str, split: str | None = None) -> Source:
    """Read every record of a dataset reference (see the module docstring)."""
    name, fmt, files = list_files(ref, split)
    source = Source(name=name, ref=ref, format=fmt)
    for uri in files:
        raw = storage.read_bytes(uri)
        _, ext, comp = _split_ext(uri)
        file_fmt = "arrow" if fmt == "hf_arrow" else FORMATS[ext]
        try:
            data = _DECOMPRESS[comp](raw) if comp else raw
            if file_fmt in _TEXT_FORMATS:
                data = data.removeprefix(_BOM)
            records = list(_READERS[file_fmt](uri, data))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser error names the file
            raise DataError(f"{uri}: cannot read as {file_fmt}: {exc}") from exc
        source.files.append({"uri": uri, "sha256": storage.sha256_bytes(raw),
                             "bytes": len(raw), "rows": len(records)})
        source.records.extend(records)
    return source


def _jsonl(uri: str, data: bytes):
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        yield _json_record(uri, number, line)


def _json_record(uri: str, number: int, line: bytes) -> Record:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Record(uri, number, None, f"undecodable text (not UTF-8 at byte {exc.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Record(uri, number, None, f"malformed JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(obj, dict):
        return Record(uri, number, None, f"expected a JSON object, got {type(obj).__name__}")
    return Record(uri, number, obj)


def _json(uri: str, data: bytes):
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        yield from _jsonl(uri, data)  # JSON lines saved with a .json name
        return
    if isinstance(obj, dict):
        values = list(obj.values())
        if len(values) == 1 and isinstance(values[0], list):
            obj = values[0]  # {"data": [{...}, ...]}
        elif len(values) > 1 and all(isinstance(v, list) for v in values) and len(
                {len(v) for v in values}) == 1:  # columnar {"a": [...], "b": [...]}
            obj = [dict(zip(obj, row, strict=True)) for row in zip(*values, strict=True)]
        else:
            obj = [obj]
    for number, item in enumerate(obj, start=1):
        if isinstance(item, dict):
            yield Record(uri, number, item)
        else:
            yield Record(uri, number, None,
                         f"expected a JSON object, got {type(item).__name__}")


def _table_records(uri: str, table: pa.Table):
    for number, item in enumerate(table.to_pylist(), start=1):
        yield Record(uri, number, item)


def _csv(uri: str, data: bytes):
    """CSV rows are numbered as data rows (line - 1 when no field spans lines); a row with
    the wrong number of columns becomes a bad record instead of failing the file."""
    import pyarrow.csv as pacsv

    invalid: dict[int, str] = {}

    def on_invalid(row) -> str:
        invalid[row.number - 1] = (f"line {row.number}: expected {row.expected_columns} "
                                   f"columns, got {row.actual_columns}")
        return "skip"

    table = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(use_threads=False),
                           parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid))
    number = 0
    for item in table.to_pylist():
        number += 1
        while number in invalid:
            yield Record(uri, number, None, invalid[number])
            number += 1
        yield Record(uri, number, item)
    for extra in sorted(k for k in invalid if k > number):
        yield Record(uri, extra, None, invalid[extra])


def _parquet(uri: str, data: bytes):
    import pyarrow.parquet as pq

    yield from _table_records(uri, pq.read_table(pa.BufferReader(data)))


def _arrow(uri: str, data: bytes):
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    yield from _table_records(uri, table)


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "arrow": _arrow}
