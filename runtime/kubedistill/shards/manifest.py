"""The teacher-cache manifest (``manifest.json``) and its key.

The **key** says what the cached states are a function of; two caches with equal keys hold
the same values. Parts (all strings or ints, compared one by one):

- ``teacher_weights``: hash of the teacher's weight files (see
  :func:`kubedistill.teacher.key.weights_hash`);
- ``tokenizer``: hash of the teacher's tokenizer files and chat template;
- ``data``: the prepared dataset's ``data_hash``;
- ``dtype``: ``bf16`` | ``fp16`` | ``fp32`` | ``fp8``;
- ``positions_policy``: which positions are kept (:data:`POSITIONS_POLICY`);
- ``topk``: number of top-k log-probs stored (0: none);
- ``teacher_signal``: ``hidden`` | ``topk`` | ``both`` (:mod:`kubedistill.shards.schema`).

The **manifest** holds ``schema_version``, ``key``, ``key_hash``, ``layout``
(``rows_per_shard``, ``hidden_size``, ``num_shards`` plan of the writers), per-split totals in
``splits`` (``rows``, ``tokens``, ``positions``, ``bytes``, ``shards``), the grand ``totals``,
and ``shards``: the shard entries written by :func:`kubedistill.shards.writer.write_shard`
(file, sha256, byte size, record-batch ranges and checksums, ids), in split then index
order. It is written last, atomically: a cache without ``manifest.json`` is incomplete.
Partial manifests of fanned-out writers (``parts/part-IIIII-of-NNNNN.json``) have the same
form with only that writer's shards.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubedistill.errors import ArtifactMismatch
from kubedistill.shards.schema import SCHEMA_VERSION

KEY_PARTS = ("teacher_weights", "tokenizer", "data", "dtype", "positions_policy", "topk",
             "teacher_signal")
# parts only some keys have (``processor``: image-text teachers); hashed only when present,
# so the keys of text caches keep their hashes
OPTIONAL_KEY_PARTS = ("processor",)
POSITIONS_POLICY = "teacher_mask_shift1/v1"  # positions = [i - 1 for i with m[i] == 1]
MANIFEST = "manifest.json"


def key_hash(key: dict[str, Any]) -> str:
    parts = {k: key[k] for k in KEY_PARTS}
    parts.update({k: key[k] for k in OPTIONAL_KEY_PARTS if key.get(k) is not None})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def check_key(actual: dict[str, Any], expected: dict[str, Any], where: str = "") -> None:
    """Raise :class:`ArtifactMismatch` naming every key part that differs."""
    diffs = [f"{p}: cache has {actual.get(p)!r}, expected {expected.get(p)!r}"
             for p in (*KEY_PARTS, *OPTIONAL_KEY_PARTS) if actual.get(p) != expected.get(p)]
    if diffs:
        raise ArtifactMismatch(f"teacher cache {where} does not match this run; differing "
                               f"key part(s): {'; '.join(diffs)}")


def part_name(index: int, num: int) -> str:
    return f"parts/part-{index:05d}-of-{num:05d}.json"


def build_manifest(key: dict[str, Any], layout: dict[str, Any],
                   entries: list[dict[str, Any]]) -> dict[str, Any]:
    entries = sorted(entries, key=lambda e: (e["split"], e["index"]))
    splits: dict[str, dict[str, int]] = {}
    for e in entries:
        s = splits.setdefault(e["split"], {"rows": 0, "tokens": 0, "positions": 0,
                                           "bytes": 0, "shards": 0})
        for field in ("rows", "tokens", "positions", "bytes"):
            s[field] += e[field]
        s["shards"] += 1
    totals = {f: sum(s[f] for s in splits.values())
              for f in ("rows", "tokens", "positions", "bytes", "shards")}
    return {"schema_version": SCHEMA_VERSION, "key": key, "key_hash": key_hash(key),
            "layout": layout, "splits": splits, "totals": totals, "shards": entries}


def check_schema_version(manifest: dict[str, Any], where: str) -> None:
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactMismatch(f"{where}: teacher cache schema version "
                               f"{manifest.get('schema_version')} is not the supported "
                               f"{SCHEMA_VERSION}; rebuild the cache")
