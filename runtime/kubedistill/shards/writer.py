"""Write one shard so that it becomes visible only when complete.

Protocol (the reader and the resume logic rely on it):

1. the shard is written to a local temporary file, hashing as it goes;
2. it is moved into place: ``os.replace`` locally, one upload (a single PUT or a multipart
   upload, which S3 publishes only when complete) on object stores;
3. its marker ``markers/<name>.json`` (the shard entry below) is written atomically with
   :func:`kubedistill.storage.write_json_atomic`.

A shard without a marker does not exist: it is rewritten from scratch on resume. The marker
(shard entry) holds ``name``, ``file``, ``split``, ``index``, ``row_start``/``row_end`` (rows of
the prepared split), ``rows``, ``tokens`` (teacher tokens fed), ``positions`` (cached
positions), ``bytes``, ``sha256`` (whole file), ``batches`` (per record batch: ``offset``,
``length``, ``rows``, ``sha256`` of the byte range, so remote readers can verify one batch
without fetching the whole shard), ``ids`` (sample ids in row order) and ``key_hash``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from kubedistill import storage
from kubedistill.shards.schema import ROWS_PER_BATCH, encode_hidden, shard_schema


@dataclass
class ShardRow:
    """One sample's cached teacher signal, before encoding."""

    id: str
    positions: Sequence[int]
    hidden: torch.Tensor | None  # [n, d]; None for a ``topk`` cache
    tokens: int  # teacher tokens fed for this sample
    topk_logprobs: torch.Tensor | None = None  # [n, k]
    topk_ids: torch.Tensor | None = None  # [n, k]


def marker_uri(cache_uri: str, name: str) -> str:
    return storage.join(cache_uri, "markers", f"{name}.json")


def _record_batch(rows: Sequence[ShardRow], schema: pa.Schema, dtype: str) -> pa.RecordBatch:
    def lists(arrays: list[np.ndarray], typ: pa.DataType) -> pa.ListArray:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([a.size for a in arrays])
        flat = np.concatenate(arrays) if arrays else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=typ))

    cols = {"id": pa.array([r.id for r in rows], pa.string()),
            "positions": lists([np.asarray(r.positions, np.int32) for r in rows], pa.int32())}
    if "hidden" in schema.names:
        encoded = [encode_hidden(r.hidden, dtype) for r in rows]
        cols["hidden"] = lists([e[0] for e in encoded], schema.field("hidden").type.value_type)
        if dtype == "fp8":
            cols["hidden_scale"] = lists([e[1] for e in encoded], pa.float32())
    if "topk_ids" in schema.names:
        cols["topk_logprobs"] = lists([r.topk_logprobs.float().reshape(-1).numpy()
                                       for r in rows], pa.float32())
        cols["topk_ids"] = lists([r.topk_ids.to(torch.int32).reshape(-1).numpy()
                                  for r in rows], pa.int32())
    return pa.record_batch([cols[n] for n in schema.names], schema=schema)


def _writer_alive(tmp_path: str) -> bool:
    """Whether the process that owns a temp shard (``.<name>.<pid>.<rand>.tmp``) still runs."""
    parts = os.path.basename(tmp_path).split(".")
    try:
        pid = int(parts[-3])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def write_shard(cache_uri: str, name: str, rows: Sequence[ShardRow], *, dtype: str,
                hidden_size: int, topk: int, meta: dict, signal: str = "hidden") -> dict:
    """Write ``{cache_uri}/{name}.arrow`` and then its marker; returns the shard entry.

    ``meta`` (split, index, row_start, row_end, key_hash) is copied into the entry.
    """
    schema = shard_schema(dtype, hidden_size, topk, signal)
    local = storage.is_local(cache_uri)
    tmp_dir = storage.local_path(cache_uri) if local else None
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(tmp_dir, f".{name}.*.tmp")):  # a killed writer's
            if not _writer_alive(stale):  # never another live writer's file in progress
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=tmp_dir)
    os.close(fd)
    try:
        batches = []
        with pa.OSFile(tmp, "wb") as sink:
            with pa.ipc.new_file(sink, schema) as writer:
                start = 8 + schema.serialize().size  # magic + schema message precede batch 0
                for b in range(0, len(rows), ROWS_PER_BATCH):
                    chunk = rows[b:b + ROWS_PER_BATCH]
                    writer.write_batch(_record_batch(chunk, schema, dtype))
                    end = sink.tell()
                    batches.append({"offset": start, "length": end - start, "rows": len(chunk)})
                    start = end
        file_hash = hashlib.sha256()
        with open(tmp, "rb") as f:  # stream: the prefix, each batch's range, the footer
            file_hash.update(f.read(batches[0]["offset"] if batches else 0))
            for b in batches:
                block = f.read(b["length"])
                file_hash.update(block)
                b["sha256"] = hashlib.sha256(block).hexdigest()
            file_hash.update(f.read())
        entry = {**meta, "name": name, "file": f"{name}.arrow", "rows": len(rows),
                 "tokens": int(sum(r.tokens for r in rows)),
                 "positions": int(sum(len(r.positions) for r in rows)),
                 "bytes": os.path.getsize(tmp), "sha256": file_hash.hexdigest(),
                 "batches": batches, "ids": [r.id for r in rows]}
        final = storage.join(cache_uri, entry["file"])
        if local:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, storage.local_path(final))
        else:
            fs, path = storage.filesystem(final)
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    storage.write_json_atomic(marker_uri(cache_uri, name), entry)
    return entry
