"""The ``cache-teacher`` and ``merge-cache`` stages.

``cache_teacher(cfg)`` reads ``{prepared_path}/{train,eval}.parquet``, runs the teacher over
each sample's teacher tokens (``teacher_input_ids`` if not null, else ``input_ids``), with the
row's stored ``images`` for image-text teachers (the tokens already hold their expansion), and keeps
the final post-norm hidden states at ``positions = [i - 1 for i with m[i] == 1]``, ``m`` =
``teacher_loss_mask`` if not null else ``loss_mask``, and/or (``teacher_signal``) the
top-``cache_topk`` log-probs there; a ``topk`` cache has no hidden states and no head files. Output under ``teacher_cache_path``:
``{split}-{index:05d}.arrow`` shards (:mod:`kubedistill.shards.schema`), their markers,
``lm_head.safetensors`` + ``head.json`` (:class:`~kubedistill.teacher.head.TeacherHead`)
and ``manifest.json`` (:mod:`kubedistill.shards.manifest`).

Layout: shard ``j`` of a split holds its prepared rows ``[j*R, (j+1)*R)``, ``R =
cache_rows_per_shard``, so shard contents never depend on how the work is split. Fan-out:
with ``num_shards = N`` and ``shard_index = w >= 0`` a worker writes only the w-th of N
contiguous, token-balanced ranges of the shard list (train shards, then eval shards) and the
partial manifest ``parts/part-w-of-N.json``; ``merge_cache(cfg)`` then writes
``manifest.json``. ``shard_index = -1`` does everything and writes ``manifest.json``.

Restart rules: a complete cache (``manifest.json``) with the same key is left as it is; one
with another key is an :class:`~kubedistill.errors.ArtifactMismatch` (use another
``teacher_cache_path`` or delete it). Shards whose marker exists with this key are kept
untouched; the others are (re)written. Nothing written holds a timestamp, so an interrupted
and resumed run leaves the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.errors import ArtifactMismatch, DataError
from kubedistill.losses.topk import topk_of_logits
from kubedistill.models import resolve_model_path
from kubedistill.shards import manifest as mf
from kubedistill.shards.schema import has_hidden
from kubedistill.shards.writer import ShardRow, marker_uri, write_shard
from kubedistill.teacher.engine import load_hf_teacher, make_engine, resolve_backend
from kubedistill.teacher.head import TeacherHead
from kubedistill.teacher.key import expected_cache_key

log = logging.getLogger(__name__)
SPLITS = ("train", "eval")
_TOPK_CHUNK = 512


@dataclass
class TeacherRows:
    """The teacher-side view of one prepared split."""

    ids: list[str]
    tokens: list[np.ndarray]  # teacher token ids per sample
    positions: list[np.ndarray]  # loss positions per sample
    images: list[list[bytes] | None] = field(default_factory=list)  # stored bytes per sample

    def image_slice(self, sl: slice) -> list[list[bytes] | None] | None:
        """``images[sl]``, or None when none of those samples has an image."""
        part = self.images[sl] if self.images else []
        return part if any(part) else None


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    row_start: int
    row_end: int
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def _list_rows(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    arr = column.combine_chunks()
    if isinstance(arr, pa.ChunkedArray):  # empty table
        return []
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


def loss_positions(mask: np.ndarray) -> np.ndarray:
    """``[i - 1 for i with mask[i] == 1]`` (``i = 0`` has no predicting position)."""
    return (np.flatnonzero(np.asarray(mask)[1:] == 1)).astype(np.int32)


def read_teacher_rows(prepared_path: str, split: str) -> TeacherRows:
    uri = storage.join(prepared_path, f"{split}.parquet")
    if not storage.exists(uri):
        if split == "train":
            raise DataError(f"prepared split {uri} is missing; run `kubedistill prepare` first")
        return TeacherRows([], [], [])
    fs, path = storage.filesystem(uri)
    names = set(pq.read_schema(path, filesystem=fs).names)
    wanted = [c for c in ("id", "input_ids", "loss_mask", "teacher_input_ids",
                          "teacher_loss_mask", "images") if c in names]
    table = pq.read_table(path, columns=wanted, filesystem=fs)
    student_ids, student_mask = _list_rows(table["input_ids"]), _list_rows(table["loss_mask"])
    t_ids = _list_rows(table["teacher_input_ids"]) if "teacher_input_ids" in names else []
    t_mask = _list_rows(table["teacher_loss_mask"]) if "teacher_loss_mask" in names else []
    ids = [str(x) for x in table["id"].to_pylist()]
    tokens, positions = [], []
    for i in range(len(ids)):
        tok = t_ids[i] if t_ids and t_ids[i] is not None else student_ids[i]
        mask = t_mask[i] if t_mask and t_mask[i] is not None else student_mask[i]
        if len(mask) != len(tok):
            raise DataError(f"{uri}: row {i} (id {ids[i]}): teacher loss mask has {len(mask)} "
                            f"entries for {len(tok)} teacher tokens")
        tokens.append(tok.astype(np.int64))
        positions.append(loss_positions(mask))
    images = table["images"].to_pylist() if "images" in names else []
    return TeacherRows(ids, tokens, positions, [im or None for im in images])


def plan_shards(rows: dict[str, TeacherRows], rows_per_shard: int) -> list[ShardPlan]:
    plans = []
    for split in SPLITS:
        data = rows[split]
        for j, start in enumerate(range(0, len(data.ids), rows_per_shard)):
            end = min(start + rows_per_shard, len(data.ids))
            plans.append(ShardPlan(split, j, start, end,
                                   int(sum(len(t) for t in data.tokens[start:end]))))
    return plans


def assign_ranges(plans: list[ShardPlan], num_workers: int) -> list[list[ShardPlan]]:
    """Contiguous ranges of ``plans`` with about equal token totals: a shard goes to the
    worker whose share ``[w*T/N, (w+1)*T/N)`` holds the shard's token midpoint."""
    total = max(1, sum(p.tokens for p in plans))
    ranges: list[list[ShardPlan]] = [[] for _ in range(num_workers)]
    seen = 0
    for p in plans:
        worker = min(num_workers - 1, int((seen + p.tokens / 2) * num_workers // total))
        ranges[worker].append(p)
        seen += p.tokens
    return ranges


def _topk(head: TeacherHead, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = [], []
    for s in range(0, hidden.shape[0], _TOPK_CHUNK):
        top = topk_of_logits(head.logits(hidden[s:s + _TOPK_CHUNK]), k)
        vals.append(top.logprobs)
        idx.append(top.ids)
    if not vals:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(vals), torch.cat(idx)


def teacher_rows(engine, head: TeacherHead, cfg: Config, ids: list[str],
                 tokens: list[np.ndarray], positions: list[np.ndarray],
                 images: list[list[bytes] | None] | None = None) -> list[ShardRow]:
    """The shard rows of some samples, holding the signal ``cfg.cache.teacher_signal`` asks
    for. Top-k comes from ``log_softmax(head(h))`` (float32), or straight from the engine
    when it has ``final_topk`` (sglang) and no hidden states are kept. ``images[i]``: sample
    i's stored image bytes (None for text rows); passed to the engine, with the sample ids
    for its errors, only when some sample has images."""
    signal, k = cfg.cache.teacher_signal, cfg.cache.cache_topk
    direct = getattr(engine, "final_topk", None)
    extra = {"images": images, "where": ids} if images else {}
    if not has_hidden(signal) and direct is not None:
        tops = direct(tokens, positions, k, **extra)
        return [ShardRow(sid, pos, None, len(tok), lp, top_ids)
                for sid, tok, pos, (lp, top_ids) in zip(ids, tokens, positions, tops,
                                                        strict=True)]
    rows = []
    states = engine.final_states(tokens, positions, **extra)
    for sid, tok, pos, h in zip(ids, tokens, positions, states, strict=True):
        topk = _topk(head, h, k) if k else (None, None)
        rows.append(ShardRow(sid, pos, h if has_hidden(signal) else None, len(tok), *topk))
    return rows


def cache_layout(cfg: Config, hidden_size: int, planned_shards: int) -> dict:
    """The manifest's ``layout`` (``hidden_size`` 0 and no head files for a top-k cache)."""
    head = ["lm_head.safetensors", "head.json"] if has_hidden(cfg.cache.teacher_signal) else []
    return {"rows_per_shard": cfg.cache.cache_rows_per_shard, "hidden_size": hidden_size,
            "planned_shards": planned_shards, "head": head}


def _marker(cache_uri: str, plan: ShardPlan, key_hash: str) -> dict | None:
    uri = marker_uri(cache_uri, plan.name)
    if not storage.exists(uri):
        return None
    entry = storage.read_json(uri)
    same = (entry.get("key_hash") == key_hash and entry.get("row_start") == plan.row_start
            and entry.get("row_end") == plan.row_end)
    return entry if same else None


def _existing_manifest(cache_uri: str, key: dict) -> dict | None:
    uri = storage.join(cache_uri, mf.MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    mf.check_key(manifest.get("key", {}), key, where=cache_uri)
    return manifest


def _summary(cache_uri: str, manifest: dict, **extra: Any) -> dict:
    return {"cache_uri": cache_uri, "key_hash": manifest["key_hash"], **manifest["totals"],
            "splits": manifest["splits"], **extra}


def cache_teacher(cfg: Config) -> dict:
    """Run the stage (see the module docstring); returns a summary dict."""
    cfg.validate()
    cache_uri = cfg.teacher_cache_path
    model_path = resolve_model_path(cfg.model.teacher_name_or_path, cfg.storage.model_cache_dir)
    key = expected_cache_key(cfg, model_path)
    key_hash = mf.key_hash(key)
    signal = cfg.cache.teacher_signal
    done = _existing_manifest(cache_uri, key)
    if done is not None:
        log.info("teacher cache %s is complete with this key; nothing to do", cache_uri)
        return _summary(cache_uri, done, status="complete", shards_written=0)

    rows = {s: read_teacher_rows(cfg.prepared_path, s) for s in SPLITS}
    plans = plan_shards(rows, cfg.cache.cache_rows_per_shard)
    worker = cfg.cache.shard_index
    mine = plans if worker < 0 else assign_ranges(plans, cfg.cache.num_shards)[worker]
    entries = {p.name: _marker(cache_uri, p, key_hash) for p in mine}
    pending = [p for p in mine if entries[p.name] is None]
    log.info("teacher cache %s: %d of %d shards to write", cache_uri, len(pending), len(mine))

    written_tokens, engine, hidden_size = 0, None, None
    head_marker = marker_uri(cache_uri, "lm_head")
    head_done = not has_hidden(signal) or (  # a top-k cache has no head to write
        storage.exists(head_marker) and storage.read_json(head_marker).get("key_hash") == key_hash)
    if pending or not head_done:
        backend = resolve_backend(cfg.cache.teacher_backend)
        model = load_hf_teacher(cfg, model_path) if backend == "hf" else None
        head = (TeacherHead.from_model(model) if model is not None
                else TeacherHead.from_pretrained(model_path, cfg.model.trust_remote_code))
        if not head_done:  # written once per key, then marked (like a shard)
            head.save(cache_uri)
            storage.write_json_atomic(head_marker, {"key_hash": key_hash})
        head = head.to("cpu").float()
        hidden_size = head.hidden_size if has_hidden(signal) else 0
        if pending:
            engine = make_engine(cfg, model_path, model)
    start = time.perf_counter()  # the loop alone: teacher forward + encode + write
    progress = tqdm(total=sum(p.tokens for p in pending), unit="tok", desc="cache-teacher",
                    disable=not pending)
    try:
        for plan in pending:
            data = rows[plan.split]
            sl = slice(plan.row_start, plan.row_end)
            shard_rows = teacher_rows(engine, head, cfg, data.ids[sl], data.tokens[sl],
                                      data.positions[sl], data.image_slice(sl))
            meta = {"split": plan.split, "index": plan.index, "row_start": plan.row_start,
                    "row_end": plan.row_end, "key_hash": key_hash}
            entries[plan.name] = write_shard(cache_uri, plan.name, shard_rows,
                                             dtype=cfg.cache.cache_dtype,
                                             hidden_size=hidden_size, topk=cfg.cache.cache_topk,
                                             meta=meta, signal=signal)
            written_tokens += plan.tokens
            progress.update(plan.tokens)
    finally:
        progress.close()
        if engine is not None:
            engine.close()
    seconds = time.perf_counter() - start
    if hidden_size is None:
        hidden_size = TeacherHead.load(cache_uri).hidden_size if has_hidden(signal) else 0
    layout = cache_layout(cfg, hidden_size, len(plans))
    manifest = mf.build_manifest(key, layout, [entries[p.name] for p in mine])
    stats = {"shards_written": len(pending), "seconds": round(seconds, 3),
             "tokens_per_s": round(written_tokens / seconds, 1) if written_tokens else None}
    if worker >= 0:
        storage.write_json_atomic(storage.join(cache_uri, mf.part_name(worker,
                                                                       cfg.cache.num_shards)),
                                  {**manifest, "worker": worker,
                                   "num_shards": cfg.cache.num_shards})
        return _summary(cache_uri, manifest, status="partial", worker=worker, **stats)
    storage.write_json_atomic(storage.join(cache_uri, mf.MANIFEST), manifest)
    return _summary(cache_uri, manifest, status="written", **stats)


def merge_cache(cfg: Config) -> dict:
    """Write ``manifest.json`` from the ``num_shards`` partial manifests; returns a summary."""
    cache_uri, num = cfg.teacher_cache_path, cfg.cache.num_shards
    parts = []
    for w in range(num):
        uri = storage.join(cache_uri, mf.part_name(w, num))
        if not storage.exists(uri):
            complete = storage.join(cache_uri, mf.MANIFEST)
            if storage.exists(complete):  # the workers found it complete with their key
                return _summary(cache_uri, storage.read_json(complete), status="complete")
            raise ArtifactMismatch(f"teacher cache {cache_uri}: worker {w} of {num} has not "
                                   f"finished ({mf.part_name(w, num)} is missing)")
        parts.append(storage.read_json(uri))
    key, layout = parts[0]["key"], parts[0]["layout"]
    for w, part in enumerate(parts[1:], start=1):
        mf.check_key(part["key"], key, where=f"{cache_uri} part {w}")
    entries = [e for part in parts for e in part["shards"]]
    if len(entries) != layout["planned_shards"]:
        raise ArtifactMismatch(f"teacher cache {cache_uri}: parts hold {len(entries)} shards, "
                               f"the plan has {layout['planned_shards']}")
    for e in entries:
        if not storage.exists(storage.join(cache_uri, e["file"])):
            raise ArtifactMismatch(f"teacher cache {cache_uri}: shard {e['file']} is missing")
    manifest = mf.build_manifest(key, layout, entries)
    storage.write_json_atomic(storage.join(cache_uri, mf.MANIFEST), manifest)
    return _summary(cache_uri, manifest, status="merged")
