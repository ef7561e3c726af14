"""The ``import-logprobs`` stage: top-k logprobs made elsewhere -> a ``topk`` teacher cache.

``import_logprobs(cfg)`` reads ``logprobs_path`` (JSONL, or Parquet: one record per
prepared sample, with its prepared ``id``; optional ``split``), in any of the shapes of
:mod:`kubedistill.teacher.logprobs` (vLLM ``prompt_logprobs``, SGLang
``input_top_logprobs``, OpenAI-compatible ``logprobs.content``), and writes the same cache
``cache-teacher`` writes with ``teacher_signal: topk`` and ``cache_topk: k``: the same shard
plan, rows, ids, float32 values, manifest, key and checksums (byte-identical shards when the
log-probs are the same float32 numbers).

Checks, all before anything is written (a DataError lists every bad record by file, line /
row, id and field; nothing half-written looks complete):

- the key's ``tokenizer`` and ``teacher_weights`` come from ``teacher_name_or_path``: the
  teacher that produced the file (its tokenizer files; its weights are hashed, not loaded);
- each record's ``id`` is a prepared sample; its token ids (when the shape carries them)
  equal the prepared teacher tokens; OpenAI entries' own tokens equal the prepared ones;
- every loss position has at least ``k`` candidates; every prepared sample has a record.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.errors import ConfigError, DataError
from kubedistill.models import resolve_model_path
from kubedistill.shards import manifest as mf
from kubedistill.shards.writer import ShardRow, write_shard
from kubedistill.teacher.cache import SPLITS, cache_layout, plan_shards, read_teacher_rows
from kubedistill.teacher.key import expected_cache_key
from kubedistill.teacher.logprobs import READERS, align, detect_format, openai_token_id, select_topk

log = logging.getLogger(__name__)
_MAX_LISTED = 20


def read_records(uri: str):
    """Yield ``(where, record)`` from a JSONL or Parquet file (``where`` = "file:line N" /
    "file: row N")."""
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(uri)
        for i, rec in enumerate(pq.read_table(path, filesystem=fs).to_pylist()):
            yield f"{uri}: row {i}", rec
        return
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{uri}:{n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{uri}:{n}", exc


def _vocab(model_path: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path).get_vocab()


def import_logprobs(cfg: Config) -> dict:
    """Run the stage (see the module docstring); returns a summary dict."""
    cfg.validate()
    src, k = cfg.cache.logprobs_path, cfg.cache.cache_topk
    if not src:
        raise ConfigError("import-logprobs needs logprobs_path (the JSONL/Parquet file)")
    if cfg.cache.teacher_signal != "topk":
        raise ConfigError("import-logprobs writes a top-k cache: set teacher_signal topk "
                          f"(got {cfg.cache.teacher_signal}) and cache_topk k")
    cache_uri = cfg.teacher_cache_path
    model_path = resolve_model_path(cfg.model.teacher_name_or_path, cfg.storage.model_cache_dir)
    key = expected_cache_key(cfg, model_path)
    if storage.exists(storage.join(cache_uri, mf.MANIFEST)):
        mf.check_key(storage.read_json(storage.join(cache_uri, mf.MANIFEST))["key"], key,
                     where=cache_uri)
        return {"cache_uri": cache_uri, "status": "complete"}

    rows = {s: read_teacher_rows(cfg.prepared_path, s) for s in SPLITS}
    index = {}
    for split in SPLITS:
        for i, sid in enumerate(rows[split].ids):
            index.setdefault(sid, []).append((split, i))
    token_id, found, errors = None, {}, []
    for where, rec in read_records(src):
        try:
            if isinstance(rec, Exception):
                raise DataError(f"{where}: not JSON ({rec})")
            sid = str(rec.get("id"))
            homes = [h for h in index.get(sid, []) if rec.get("split") in (None, h[0])]
            if len(homes) != 1:
                raise DataError(f"{where}: id {sid!r} " + (
                    "is not a prepared sample" if not homes else
                    "is in train and eval; give the record a 'split' field"))
            split, i = homes[0]
            where = f"{where} (id {sid})"
            try:
                fmt = detect_format(rec)
                if fmt == "openai" and token_id is None:
                    token_id = openai_token_id(_vocab(model_path))
                alt = READERS[fmt](rec, token_id)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{where}: {exc}") from exc
            at = align(alt, rows[split].tokens[i], where)
            found[(split, i)] = select_topk(at, rows[split].positions[i], k, where)
        except DataError as exc:
            errors.append(str(exc))
    for split in SPLITS:
        missing = [sid for i, sid in enumerate(rows[split].ids) if (split, i) not in found]
        if missing:
            errors.append(f"{src}: no record for {len(missing)} prepared {split} sample(s), "
                          f"e.g. {', '.join(missing[:5])}")
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED])
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED \
            else ""
        raise DataError(f"import-logprobs: {len(errors)} problem(s), nothing written:\n  "
                        f"{listed}{more}")

    key_hash = mf.key_hash(key)
    plans = plan_shards(rows, cfg.cache.cache_rows_per_shard)
    entries = []
    for plan in plans:
        data = rows[plan.split]
        shard_rows = [ShardRow(data.ids[i], data.positions[i], None, len(data.tokens[i]),
                               *found[(plan.split, i)])
                      for i in range(plan.row_start, plan.row_end)]
        meta = {"split": plan.split, "index": plan.index, "row_start": plan.row_start,
                "row_end": plan.row_end, "key_hash": key_hash}
        entries.append(write_shard(cache_uri, plan.name, shard_rows,
                                   dtype=cfg.cache.cache_dtype, hidden_size=0, topk=k,
                                   meta=meta, signal="topk"))
    manifest = mf.build_manifest(key, cache_layout(cfg, 0, len(plans)), entries)
    storage.write_json_atomic(storage.join(cache_uri, mf.MANIFEST), manifest)
    log.info("imported %s into %s: %d rows", src, cache_uri, manifest["totals"]["rows"])
    return {"cache_uri": cache_uri, "key_hash": manifest["key_hash"], "status": "written",
            **manifest["totals"], "positions_per_row": int(np.mean(
                [len(p) for s in SPLITS for p in rows[s].positions] or [0]))}
