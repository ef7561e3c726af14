"""The prepared dataset on storage: its Arrow schema, writer helpers and readers.

Layout of ``{prepared_path}/`` (docs/contracts.md): ``train.parquet``, ``eval.parquet``,
``bad_rows.jsonl`` and ``manifest.json``, which is written last; a folder without a
manifest is incomplete. Columns: see :data:`SCHEMA`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kubedistill import storage
from kubedistill.errors import ArtifactMismatch, DataError

SCHEMA_VERSION = 1
SPLITS = ("train", "eval")
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("prompt_len", pa.int32()),
    ("teacher_input_ids", pa.list_(pa.int32())),
    ("teacher_loss_mask", pa.list_(pa.int8())),
    ("teacher_prompt_len", pa.int32()),
    ("response", pa.string()),
    ("label", pa.string()),
    ("images", pa.list_(pa.binary())),  # stored image bytes, in placeholder order
    ("image_sha256", pa.list_(pa.string())),  # sha256 of each of ``images``
    ("num_tokens", pa.int32()),
    # cross-tokenizer: (student_pos, teacher_pos) pairs flattened, see kubedistill.crosstok
    ("ct_align", pa.list_(pa.int32())),
])
_HASHED = ("id", "input_ids", "loss_mask", "teacher_input_ids", "teacher_loss_mask", "label")
_IMAGE_HASHED = "image_sha256"  # hashed only when some row has images


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the :data:`SCHEMA` columns; ``num_tokens`` is filled in) -> table."""
    columns = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    columns["num_tokens"] = [len(r["input_ids"]) for r in rows]
    return pa.table(columns, schema=SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def content_hash(table: pa.Table) -> str:
    """sha256 of the sample content (ids, tokens, masks, labels, and ``image_sha256`` when
    some row has images, so text data keeps its hash), independent of Parquet's encoding, so
    equal data gives an equal hash across pyarrow versions."""
    h = hashlib.sha256()
    names = list(_HASHED)
    if _IMAGE_HASHED in table.column_names and table.column(_IMAGE_HASHED).null_count \
            < table.num_rows:
        names.append(_IMAGE_HASHED)
    for name in names:
        h.update(name.encode() + b"\0")
        h.update(json.dumps(table.column(name).to_pylist(), separators=(",", ":")).encode())
    return h.hexdigest()


def split_stats(table: pa.Table) -> dict[str, int]:
    masks = table.column("loss_mask").to_pylist()
    return {"rows": table.num_rows, "tokens": sum(table.column("num_tokens").to_pylist()),
            "loss_tokens": sum(sum(m) for m in masks)}


def read_manifest(prepared_path: str) -> dict[str, Any]:
    """The manifest of a complete prepared dataset; DataError when there is none."""
    uri = storage.join(prepared_path, "manifest.json")
    if not storage.exists(uri):
        raise DataError(f"{prepared_path} is not a complete prepared dataset (no manifest.json"
                        "); run the prepare stage")
    return storage.read_json(uri)


def load_split(prepared_path: str, split: str, columns: list[str] | None = None,
               verify: bool = False) -> pa.Table | None:
    """One split as a table (``columns`` to read a subset); None when the file is absent.

    ``verify=True`` checks the file's sha256 against the manifest (ArtifactMismatch).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (one of {', '.join(SPLITS)})")
    uri = storage.join(prepared_path, f"{split}.parquet")
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    if verify:
        expected = read_manifest(prepared_path)["splits"][split]["sha256"]
        if storage.sha256_bytes(data) != expected:
            raise ArtifactMismatch(f"{uri}: sha256 differs from the manifest (changed after "
                                   "prepare?)")
    return pq.read_table(pa.BufferReader(data), columns=columns)
