"""The ``prepare`` stage: raw data -> a prepared dataset at ``cfg.prepared_path``.

``prepare(cfg) -> manifest`` (format: docs/contracts.md, "Prepared dataset"):

1. load the student's (and teacher's) tokenizer and run the tokenizer-pair preflight, which
   refuses a same-vocabulary algorithm for mismatched tokenizers (ConfigError);
2. fingerprint the run (sha256 of every input file, the tokenizer files, the image-text
   processors' configs, the data config); when ``manifest.json`` already holds that
   fingerprint and the split files still match their checksums, return it untouched (a
   rerun is a no-op). Image-text runs (:mod:`kubedistill.data.image_rows`) also read image
   files that rows name by path, which the fingerprint does not cover: they rebuild the rows
   and return the old manifest untouched only when the split files come out identical;
3. otherwise delete the old manifest FIRST (so a half-rewritten folder never looks
   complete), read the train datasets, draw the mixture (``train_dataset_probs``,
   ``max_samples``), build rows (:class:`~kubedistill.data.build.SampleBuilder`), and take
   eval from ``eval_dataset_path`` (its first ``eval_max_samples`` usable rows) or a seeded
   split of the train rows (``eval_ratio``, ``eval_max_samples``);
4. write ``train.parquet``, ``eval.parquet``, ``bad_rows.jsonl`` and, LAST and atomically,
   ``manifest.json``.

An empty train split, or an ``eval_dataset_path`` that yields nothing, is a DataError. Bad
rows and length counts are kept per *input role* (``train`` inputs, ``eval`` inputs): rows
split off the train inputs into eval are counted under ``train``.
Rows are built in ``preprocess_num_workers`` processes when there are enough of them
(:mod:`kubedistill.data.parallel`); the output does not depend on the worker count, which is
therefore not part of the fingerprint (a rerun with another count is a no-op).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections import Counter
from typing import Any

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.config_values import split_list
from kubedistill.data import prepared
from kubedistill.data.build import MAX_LISTED, SampleBuilder
from kubedistill.data.chat import missing_columns
from kubedistill.data.formats import list_files, read_source
from kubedistill.data.parallel import RowBuilder
from kubedistill.data.preflight import load_pair
from kubedistill.data.selection import mixture_plan, split_indices
from kubedistill.errors import ConfigError, DataError

log = logging.getLogger(__name__)
# data keys that do not change the prepared output: left out of the fingerprint
_OUTPUT_NEUTRAL = ("preprocess_num_workers", "packing_samples")


def prepare(cfg: Config) -> dict[str, Any]:
    """Run the stage (see the module docstring); returns the manifest."""
    data, out = cfg.data, cfg.prepared_path
    train_refs = split_list(data.train_dataset_path)
    if not train_refs:
        raise ConfigError("prepare needs train_dataset_path")
    eval_refs = split_list(data.eval_dataset_path)
    pair = load_pair(cfg)
    builder = SampleBuilder(cfg, pair)
    processors = builder.image_rows.fingerprint() if builder.image_rows else {}
    fingerprint = _fingerprint(cfg, {**pair.fingerprint(), **processors}, train_refs,
                               eval_refs)
    current = _up_to_date(out, fingerprint)
    if current is not None and builder.image_rows is None:
        log.info("prepare: %s is up to date (fingerprint %s); nothing to do", out,
                 fingerprint[:12])
        return current
    # image files named by path are not in the fingerprint: an image-text run rebuilds and
    # keeps the existing output when the split files come out byte-identical
    manifest_uri = storage.join(out, "manifest.json")
    if current is None:
        _remove(manifest_uri)

    probs = [float(p) for p in split_list(data.train_dataset_probs)] or None
    sources = _read_all(train_refs, data.train_split, "train", builder)
    plan, mixture = mixture_plan([len(v) for _, v in sources], probs, data.max_samples,
                                 cfg.train.seed)
    used: Counter = Counter()
    eval_sources: list = []
    with RowBuilder(cfg, builder) as rows_of:
        items = [(sources[d][0], sources[d][1][i], f"~{rep}" if rep else "", d)
                 for d, i, rep in plan]
        built = rows_of.build(items, "train", desc="prepare: tokenize train")
        used.update(("train", d) for d, _ in built)
        pool = [row for _, row in built]
        if eval_refs:
            eval_rows, eval_sources = _eval_rows(eval_refs, cfg, builder, rows_of, used)
    if eval_refs:
        train_rows = pool
        if not eval_rows:
            raise DataError(f"eval_dataset_path {data.eval_dataset_path}: no usable rows "
                            "(see bad_rows.jsonl / the length counts)")
    else:
        train_idx, eval_idx = split_indices(len(pool), data.eval_ratio, data.eval_max_samples,
                                            cfg.train.seed)
        train_rows, eval_rows = [pool[i] for i in train_idx], [pool[i] for i in eval_idx]
    if not train_rows:
        raise DataError(f"prepare produced no train rows from {data.train_dataset_path} "
                        f"({len(builder.bad)} bad rows, length counts "
                        f"{dict(builder.length['train'])})")
    rows = pair.student_info["embedding_rows"]
    if rows is not None and builder.max_student_id >= rows:
        raise ConfigError(f"token id {builder.max_student_id} does not fit the student's "
                          f"{rows} embedding rows; the tokenizer and model do not match")

    blobs, splits = _split_files({"train": train_rows, "eval": eval_rows})
    if current is not None and all(current["splits"][s]["sha256"] == splits[s]["sha256"]
                                   for s in prepared.SPLITS):
        log.info("prepare: %s is up to date (fingerprint %s, images unchanged); nothing to do",
                 out, fingerprint[:12])
        return current
    _remove(manifest_uri)
    _write_data(out, blobs, builder.bad)
    cross_tokenizer = _write_vocab_map(out, pair, builder)
    manifest = {
        "schema_version": prepared.SCHEMA_VERSION, "stage": "prepare",
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "fingerprint": fingerprint, "config": _relevant_config(cfg), "splits": splits,
        "data_hash": hashlib.sha256("".join(
            f"{s}:{splits[s]['content_hash']}\n" for s in prepared.SPLITS).encode()).hexdigest(),
        "inputs": [_input_entry(src, split, used[(split, d)], builder)
                   for split, group in (("train", sources), ("eval", eval_sources))
                   for d, (src, _) in enumerate(group)],
        "mixture": mixture,
        "tokenizers": {"student": _with_processor(pair.student_info, processors, "student"),
                       "teacher": _with_processor(pair.teacher_info, processors, "teacher"),
                       "teacher_tokenization": builder.teacher_tokenization,
                       "teacher_tokenization_reason": builder.teacher_reason,
                       "chat_template_applied": builder.student.use_template},
        "preflight": pair.report,
        "cross_tokenizer": cross_tokenizer,
        "bad_rows": {"count": len(builder.bad), "file": "bad_rows.jsonl",
                     "by_reason": dict(Counter(_reason_kind(b) for b in builder.bad)),
                     "rows": builder.bad[:MAX_LISTED]},
        "length": {"policy": data.length_policy, "max_len": data.max_len,
                   "prompt_max_len": data.prompt_max_len,
                   **{k: dict(v) for k, v in builder.length.items()},
                   "filtered_ids": builder.filtered_ids},
    }
    storage.write_json_atomic(manifest_uri, manifest)  # last: marks the folder complete
    log.info("prepare: wrote %s: train %d rows / %d tokens, eval %d rows, %d bad rows, "
             "length %s", out, splits["train"]["rows"], splits["train"]["tokens"],
             splits["eval"]["rows"], len(builder.bad),
             {k: dict(v) for k, v in builder.length.items()})
    return manifest


def _with_processor(info: dict[str, Any] | None, processors: dict[str, str],
                    side: str) -> dict[str, Any] | None:
    """A tokenizer report with ``processor_hash`` added in image-text runs (the teacher's
    is the student's when it reads the student's columns)."""
    if info is None or not processors:
        return info
    value = processors.get(f"{side}_processor", processors["student_processor"])
    return {**info, "processor_hash": value}


def _remove(uri: str) -> None:
    if storage.exists(uri):
        fs, path = storage.filesystem(uri)
        fs.rm(path)


def _split_files(rows: dict[str, list]) -> tuple[dict[str, bytes], dict]:
    """The Parquet bytes of each split and the manifest's ``splits``."""
    blobs, splits = {}, {}
    for split, split_rows in rows.items():
        table = prepared.to_table(split_rows)
        blobs[split] = prepared.table_bytes(table)
        splits[split] = {**prepared.split_stats(table), "file": f"{split}.parquet",
                         "sha256": storage.sha256_bytes(blobs[split]),
                         "content_hash": prepared.content_hash(table)}
    return blobs, splits


def _write_data(out: str, blobs: dict[str, bytes], bad: list[dict[str, Any]]) -> None:
    """Write the split files and the bad-row report."""
    for split, blob in blobs.items():
        storage.write_bytes_atomic(storage.join(out, f"{split}.parquet"), blob)
    storage.write_bytes_atomic(storage.join(out, "bad_rows.jsonl"), "".join(
        json.dumps(b, ensure_ascii=False) + "\n" for b in bad).encode())


def _write_vocab_map(out: str, pair, builder: SampleBuilder) -> dict[str, Any] | None:
    """``vocab_map.safetensors`` for a pair with different vocabularies (see
    :mod:`kubedistill.crosstok`); returns the manifest's ``cross_tokenizer`` entry."""
    if builder.ct_tables is None:
        return None
    from kubedistill.crosstok.vocab import VOCAB_MAP_FILE, build_vocab_map

    vmap = build_vocab_map(*builder.ct_tables)
    digest = vmap.save(out)
    ratios = {s: c["aligned"] / max(1, c["loss_tokens"]) for s, c in builder.ct_counts.items()}
    log.info("prepare: vocabulary map of %d shared tokens; aligned loss positions %s",
             len(vmap), {k: round(v, 4) for k, v in ratios.items()})
    return {"vocab_map": {"file": VOCAB_MAP_FILE, "hash": digest, "size": len(vmap)},
            "alignment": "ct_align", "aligned_ratio": ratios,
            "counts": {k: dict(v) for k, v in builder.ct_counts.items()}}


def _read_all(refs: list[str], split_name: str, role: str, builder: SampleBuilder) -> list:
    """[(Source, usable records)] for each reference; read errors go to the bad-row report."""
    out, seen = [], Counter()
    for ref in refs:
        source = read_source(ref, split_name)
        seen[source.name] += 1
        if seen[source.name] > 1:  # two inputs with one file name: keep ids unique
            source.name = f"{source.name}#{seen[source.name]}"
        builder.report_read_errors(source, role)
        _check_columns(source, builder.data)
        out.append((source, [r for r in source.records if r.data is not None]))
        log.info("prepare: read %s (%s, %d files): %d rows", ref, source.format,
                 len(source.files), len(source.records))
    return out


def _check_columns(source, data) -> None:
    """A column the config needs that no row of a file has is one DataError for the file
    (naming the column and the columns it has), not a bad-row report for every row."""
    by_file: dict[str, set[str]] = {}
    for record in source.records:
        if record.data is not None:
            by_file.setdefault(record.file, set()).update(record.data)
    for file, columns in by_file.items():
        missing = missing_columns(columns, data)
        if missing:
            what = ", ".join(f"'{column}' ({key})" for key, column in missing)
            raise DataError(f"{file}: column {what} is missing from every row; the file has "
                            f"columns: {', '.join(sorted(columns)) or '(none)'}")


def _eval_rows(refs: list[str], cfg: Config, builder: SampleBuilder, rows_of: RowBuilder,
               used: Counter) -> tuple:
    """The first ``eval_max_samples`` usable rows of the eval datasets, in order."""
    sources = _read_all(refs, cfg.data.eval_split, "eval", builder)
    items = [(source, record, "", d)
             for d, (source, records) in enumerate(sources) for record in records]
    built = rows_of.build(items, "eval", limit=cfg.data.eval_max_samples,
                          desc="prepare: tokenize eval")
    used.update(("eval", d) for d, _ in built)
    return [row for _, row in built], sources


def _input_entry(source, role: str, used: int, builder: SampleBuilder) -> dict[str, Any]:
    bad = sum(1 for b in builder.bad if b["split"] == role and b["source"] == source.name)
    return {"role": role, "ref": source.ref, "name": source.name, "format": source.format,
            "files": source.files, "rows_read": len(source.records), "rows_bad": bad,
            "rows_used": used}


def _reason_kind(bad: dict[str, Any]) -> str:
    return bad["reason"].split(":")[0].split(" (")[0]


def _relevant_config(cfg: Config) -> dict[str, Any]:
    """The configuration the prepared data depends on (part of the fingerprint)."""
    m = cfg.model
    return {"data": {k: v for k, v in cfg.to_dict()["data"].items() if k not in _OUTPUT_NEUTRAL},
            "student_name_or_path": m.student_name_or_path,
            "teacher_name_or_path": m.teacher_name_or_path, "enable_thinking": m.enable_thinking,
            "disable_fast_tokenizer": m.disable_fast_tokenizer,
            "kd_algorithm": cfg.kd.kd_algorithm, "self_distillation": cfg.kd.self_distillation,
            "seed": cfg.train.seed}


def _fingerprint(cfg: Config, tokenizers: dict[str, Any], train_refs: list[str],
                 eval_refs: list[str]) -> str:
    inputs = []
    for refs, split_name in ((train_refs, cfg.data.train_split),
                             (eval_refs, cfg.data.eval_split)):
        for ref in refs:
            _, _, files = list_files(ref, split_name)
            inputs.append([ref, [storage.sha256_file(f) for f in files]])
    blob = json.dumps({"schema_version": prepared.SCHEMA_VERSION, "inputs": inputs,
                       "tokenizers": tokenizers, "config": _relevant_config(cfg)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _up_to_date(out: str, fingerprint: str) -> dict[str, Any] | None:
    """The existing manifest when it has ``fingerprint`` and its files are intact."""
    uri = storage.join(out, "manifest.json")
    if not storage.exists(uri):
        return None
    try:
        manifest = storage.read_json(uri)
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for info in manifest.get("splits", {}).values():
        file_uri = storage.join(out, info["file"])
        if not storage.exists(file_uri) or storage.sha256_file(file_uri) != info["sha256"]:
            return None
    vmap = (manifest.get("cross_tokenizer") or {}).get("vocab_map")
    if vmap is not None:
        from kubedistill.crosstok.vocab import VocabMap

        uri = storage.join(out, vmap["file"])
        if not storage.exists(uri) or VocabMap.from_bytes(
                storage.read_bytes(uri)).hash() != vmap["hash"]:
            return None
    return manifest
