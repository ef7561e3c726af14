"""Read a teacher cache: ``TeacherCache(uri, verify=True)``.

- ``.manifest``: the manifest dict (:mod:`kubedistill.shards.manifest`);
- ``.check_key(expected)``: raise :class:`~kubedistill.errors.ArtifactMismatch` naming the
  key parts that differ (``expected`` from :func:`kubedistill.teacher.key.expected_cache_key`);
- ``.head()``: the teacher's :class:`~kubedistill.teacher.head.TeacherHead` (None when
  ``.signal == "topk"``: such a cache holds only top-k ids + log-probs, ``hidden`` is None);
- ``.get(sample_id, dtype=torch.float32)`` -> :class:`TeacherStates`; ``dtype=None`` keeps
  the stored dtype (bf16/fp16/fp32 zero-copy over the shard's memory: read-only; fp8 is
  dequantised to bf16);
- ``.iter(sample_ids, prefetch=2)``: the same, in the given order, decoded ``prefetch``
  samples ahead by a background thread.

Local shards are memory-mapped (``pa.memory_map`` + ``pa.ipc.open_file``); with ``verify``
each shard's sha256 is checked once, on first use. Remote shards (``s3://`` ...) are never
downloaded whole: a sample's record batch is fetched by its byte range (from the manifest)
through fsspec, checked against that batch's sha256 when ``verify``, and decoded; the most
recently used batches are kept (``batch_cache`` of them).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from kubedistill import storage
from kubedistill.errors import ArtifactMismatch
from kubedistill.shards import manifest as mf
from kubedistill.shards.schema import (
    ROWS_PER_BATCH,
    decode_hidden,
    has_hidden,
    list_values,
    shard_schema,
)
from kubedistill.teacher.head import TeacherHead


@dataclass
class TeacherStates:
    positions: torch.Tensor  # [n] long: positions (teacher tokens) that predict a target
    hidden: torch.Tensor | None  # [n, d]; None in a ``topk`` cache
    topk_logprobs: torch.Tensor | None = None  # [n, k] float32
    topk_ids: torch.Tensor | None = None  # [n, k] long


class TeacherCache:
    def __init__(self, uri: str, verify: bool = True, batch_cache: int = 8):
        self.uri = uri
        self.verify = verify
        manifest_uri = storage.join(uri, mf.MANIFEST)
        if not storage.exists(manifest_uri):
            raise ArtifactMismatch(f"{uri} is not a complete teacher cache (no {mf.MANIFEST}); "
                                   f"run `kubedistill cache-teacher` (and `merge-cache`)")
        self.manifest: dict[str, Any] = storage.read_json(manifest_uri)
        mf.check_schema_version(self.manifest, uri)
        key = self.manifest["key"]
        self.dtype: str = key["dtype"]
        self.hidden_size: int = int(self.manifest["layout"]["hidden_size"])
        self.signal: str = key.get("teacher_signal", "hidden")
        self.topk: int = int(key["topk"])
        self.schema = shard_schema(self.dtype, self.hidden_size, self.topk, self.signal)
        self.local = storage.is_local(uri)
        self._index: dict[str, tuple[int, int]] = {}
        self._split_index: dict[tuple[str, str], tuple[int, int]] = {}
        for s, entry in enumerate(self.manifest["shards"]):
            for row, sid in enumerate(entry["ids"]):
                self._index.setdefault(sid, (s, row))
                self._split_index[(entry["split"], sid)] = (s, row)
        self._lock = threading.Lock()
        self._readers: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._batches: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()
        self._batch_cache = batch_cache

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    def check_key(self, expected: dict[str, Any]) -> None:
        mf.check_key(self.manifest["key"], expected, where=self.uri)

    @property
    def has_hidden(self) -> bool:
        return has_hidden(self.signal)

    def head(self) -> TeacherHead | None:
        """The teacher's head; None for a ``topk`` cache (it has none and needs none)."""
        return TeacherHead.load(self.uri) if self.has_hidden else None

    def sample_ids(self, split: str | None = None) -> list[str]:
        return [sid for e in self.manifest["shards"] if split in (None, e["split"])
                for sid in e["ids"]]

    # ---- shard access ------------------------------------------------------------------
    def _local_reader(self, s: int) -> pa.ipc.RecordBatchFileReader:
        entry = self.manifest["shards"][s]
        path = storage.local_path(storage.join(self.uri, entry["file"]))
        source = pa.memory_map(path, "r")
        if self.verify:
            digest = hashlib.sha256(memoryview(source.read_buffer())).hexdigest()
            source.seek(0)
            if digest != entry["sha256"]:
                raise ArtifactMismatch(f"{self.uri}/{entry['file']}: sha256 {digest[:12]}... "
                                       f"!= manifest {entry['sha256'][:12]}... (corrupt shard)")
        return pa.ipc.open_file(source)

    def _remote_batch(self, s: int, b: int) -> pa.RecordBatch:
        entry = self.manifest["shards"][s]
        span = entry["batches"][b]
        fs, path = storage.filesystem(storage.join(self.uri, entry["file"]))
        data = fs.cat_file(path, start=span["offset"], end=span["offset"] + span["length"])
        if self.verify and hashlib.sha256(data).hexdigest() != span["sha256"]:
            raise ArtifactMismatch(f"{self.uri}/{entry['file']}: record batch {b} does not "
                                   f"match its sha256 (corrupt shard)")
        return pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), self.schema)

    def _batch(self, s: int, b: int) -> pa.RecordBatch:
        with self._lock:
            if self.local:
                if s not in self._readers:
                    self._readers[s] = self._local_reader(s)
                return self._readers[s].get_batch(b)
            batch = self._batches.get((s, b))
            if batch is None:
                batch = self._remote_batch(s, b)
                self._batches[(s, b)] = batch
                while len(self._batches) > self._batch_cache:
                    self._batches.popitem(last=False)
            else:
                self._batches.move_to_end((s, b))
            return batch

    # ---- samples -------------------------------------------------------------------------
    def get(self, sample_id: str, dtype: torch.dtype | None = torch.float32,
            split: str | None = None) -> TeacherStates:
        where = self._index.get(sample_id) if split is None else \
            self._split_index.get((split, sample_id))
        if where is None:
            raise KeyError(f"sample {sample_id!r} is not in teacher cache {self.uri}")
        s, row = where
        batch = self._batch(s, row // ROWS_PER_BATCH)
        r = row % ROWS_PER_BATCH
        positions = torch.from_numpy(list_values(batch.column("positions"), r).astype("int64"))
        hidden = None
        if self.has_hidden:
            scale = list_values(batch.column("hidden_scale"), r) if self.dtype == "fp8" \
                else None
            hidden = decode_hidden(list_values(batch.column("hidden"), r), scale, self.dtype,
                                   self.hidden_size, dtype)
        states = TeacherStates(positions, hidden)
        if "topk_ids" in batch.schema.names:
            n = positions.shape[0]
            states.topk_logprobs = torch.tensor(
                list_values(batch.column("topk_logprobs"), r)).reshape(n, -1)
            states.topk_ids = torch.from_numpy(
                list_values(batch.column("topk_ids"), r).astype("int64")).reshape(n, -1)
        return states

    def iter(self, sample_ids: Iterable[str], prefetch: int = 2,
             dtype: torch.dtype | None = torch.float32) -> Iterator[TeacherStates]:
        """Yield ``get(i)`` for each id in order, decoding up to ``prefetch`` ahead."""
        if prefetch <= 0:
            yield from (self.get(i, dtype) for i in sample_ids)
            return
        out: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for sid in sample_ids:
                    if not put(self.get(sid, dtype)):
                        return
                put(done)
            except BaseException as exc:  # handed to the consumer
                put(exc)

        thread = threading.Thread(target=work, name="teacher-cache-prefetch", daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
