"""`import-logprobs`: vLLM / SGLang / OpenAI-shaped top-k logprob files of the real tiny
teacher give the SAME cache as `cache-teacher --teacher_signal topk` (byte-identical
shards, same manifest); bad records are all named and nothing is written."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _prepared import write_prepared

from kubedistill import storage
from kubedistill.config import load_config
from kubedistill.errors import DataError
from kubedistill.teacher.cache import (
    SPLITS,
    cache_teacher,
    plan_shards,
    read_teacher_rows,
    teacher_rows,
)
from kubedistill.teacher.engine import load_hf_teacher, make_engine
from kubedistill.teacher.head import TeacherHead
from kubedistill.teacher.import_logprobs import import_logprobs
from kubedistill.teacher.reader import TeacherCache

K = 4


@pytest.fixture(scope="module")
def prepared(smollm2_dir, tmp_path_factory) -> str:
    return write_prepared(str(tmp_path_factory.mktemp("prep") / "prepared"), smollm2_dir,
                          n_train=5, n_eval=2, max_tokens=40)


def make_cfg(teacher, prepared, cache, **extra):
    return load_config(None, {"teacher_name_or_path": teacher, "prepared_path": prepared,
                              "teacher_cache_path": cache, "cache_rows_per_shard": 3,
                              "attn_implementation": "sdpa", "teacher_signal": "topk",
                              "cache_topk": K, **extra})


@pytest.fixture(scope="module")
def served(tiny_teacher_dir, prepared, tmp_path_factory):
    """What a server would return per sample: token ids, per-token candidates (the exact
    float32 numbers the cache stage computes at loss positions, computed the same way),
    and the reference cache built by cache-teacher."""
    root = tmp_path_factory.mktemp("served")
    cfg = make_cfg(tiny_teacher_dir, prepared, str(root / "reference"))
    assert cache_teacher(cfg)["status"] == "written"
    model = load_hf_teacher(cfg, tiny_teacher_dir)
    head, engine = TeacherHead.from_model(model).to("cpu").float(), make_engine(cfg, tiny_teacher_dir, model)
    samples = []
    for split in SPLITS:
        data = read_teacher_rows(prepared, split)
        for plan in plan_shards({s: read_teacher_rows(prepared, s) for s in SPLITS}, 3):
            if plan.split != split:
                continue
            sl = slice(plan.row_start, plan.row_end)
            rows = teacher_rows(engine, head, cfg, data.ids[sl], data.tokens[sl],
                                data.positions[sl])
            for row, tok in zip(rows, data.tokens[sl], strict=True):
                cands = {}
                for p, lp, ids in zip(row.positions.tolist(), row.topk_logprobs.tolist(),
                                      row.topk_ids.tolist(), strict=True):
                    cands[p + 1] = list(zip(ids, lp, strict=True))
                samples.append({"id": row.id, "split": split, "tokens": tok.tolist(),
                                "cands": cands, "first": min(cands) if cands else len(tok)})
    engine.close()
    return samples, str(root / "reference")


def _vllm(s):
    entries = [None] * len(s["tokens"])
    for i, cands in s["cands"].items():
        entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": "x"}
                 for r, (t, lp) in enumerate(cands)}
        actual = s["tokens"][i]
        if str(actual) not in entry:  # vLLM adds the prompt token itself, outside the top-k
            entry[str(actual)] = {"logprob": cands[-1][1] - 1.0, "rank": 999}
        entries[i] = entry
    for i in range(1, len(entries)):  # positions that are no loss target: ignored
        entries[i] = entries[i] or {str(s["tokens"][i]): {"logprob": -0.5, "rank": 1}}
    return {"id": s["id"], "split": s["split"], "prompt_token_ids": s["tokens"],
            "prompt_logprobs": entries}


def _sglang(s):
    entries = [None] * len(s["tokens"])
    for i, cands in s["cands"].items():
        entries[i] = [[lp, t, None] for t, lp in reversed(cands)]  # any order: sorted here
    return {"id": s["id"], "split": s["split"], "input_ids": s["tokens"],
            "meta_info": {"input_top_logprobs": entries}}


def _openai(s):
    content = []
    for i in range(s["first"], len(s["tokens"])):
        cands = s["cands"].get(i, [(s["tokens"][i], -0.1)] * K)
        content.append({"token": f"token_id:{s['tokens'][i]}", "logprob": cands[0][1],
                        "top_logprobs": [{"token": f"token_id:{t}", "logprob": lp}
                                         for t, lp in cands]})
    return {"id": s["id"], "split": s["split"], "logprobs": {"content": content}}


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _shards(cache):
    manifest = storage.read_json(os.path.join(cache, "manifest.json"))
    return manifest, {e["file"]: open(os.path.join(cache, e["file"]), "rb").read()
                      for e in manifest["shards"]}


@pytest.mark.parametrize("shape", ["vllm", "sglang", "openai-parquet"])
def test_imported_file_is_the_same_cache_as_cache_teacher(shape, served, tiny_teacher_dir,
                                                          prepared, tmp_path):
    samples, reference = served
    if shape == "openai-parquet":
        src = str(tmp_path / "logprobs.parquet")
        pq.write_table(pa.Table.from_pylist([_openai(s) for s in samples]), src)
    else:
        make = _vllm if shape == "vllm" else _sglang
        src = _write_jsonl(tmp_path / "logprobs.jsonl", [make(s) for s in samples])
    cache = str(tmp_path / "imported")
    out = import_logprobs(make_cfg(tiny_teacher_dir, prepared, cache, logprobs_path=src))
    assert out["status"] == "written"
    ref_manifest, ref_bytes = _shards(reference)
    got_manifest, got_bytes = _shards(cache)
    assert got_manifest["key"] == ref_manifest["key"]
    assert got_bytes == ref_bytes  # byte-identical shards
    assert got_manifest == ref_manifest  # hence the same checksums, sizes and layout
    assert not os.path.exists(os.path.join(cache, "lm_head.safetensors"))
    loaded = TeacherCache(cache)
    first = loaded.get(samples[0]["id"])
    assert first.hidden is None and loaded.head() is None and first.topk_ids.shape[1] == K
    assert torch.all(first.topk_logprobs[:, :-1] >= first.topk_logprobs[:, 1:])


def test_bad_records_are_all_named_and_nothing_is_written(served, tiny_teacher_dir, prepared,
                                                          tmp_path):
    samples, _ = served
    records = [_vllm(s) for s in samples]
    records[1]["prompt_token_ids"][3] += 1  # another tokenizer / template
    first_loss = min(samples[2]["cands"])
    records[2]["prompt_logprobs"][first_loss] = {"5": {"logprob": -1.0}}  # too few candidates
    records[3]["id"] = "no-such-sample"
    src = _write_jsonl(tmp_path / "bad.jsonl", records[:-1])  # and the last sample is missing
    cache = tmp_path / "imported"
    with pytest.raises(DataError) as info:
        import_logprobs(make_cfg(tiny_teacher_dir, prepared, str(cache), logprobs_path=src))
    text = str(info.value)
    assert f"bad.jsonl:2 (id {samples[1]['id']}): token ids differ" in text
    assert "at position 3" in text
    assert f"bad.jsonl:3 (id {samples[2]['id']}): token {first_loss} " in text
    assert "1 top logprobs, 4 needed" in text
    assert "bad.jsonl:4: id 'no-such-sample' is not a prepared sample" in text
    assert samples[3]["id"] in text and samples[-1]["id"] in text  # both have no record
    assert not (cache / "manifest.json").exists()


def test_import_refuses_a_hidden_signal(tiny_teacher_dir, prepared, tmp_path):
    from kubedistill.errors import ConfigError

    cfg = make_cfg(tiny_teacher_dir, prepared, str(tmp_path / "c"), teacher_signal="hidden",
                   logprobs_path=str(tmp_path / "x.jsonl"))
    with pytest.raises(ConfigError, match="set teacher_signal topk"):
        import_logprobs(cfg)


def test_sglang_meta_info_converts_to_the_cache_columns():
    """The conversion the sglang engine uses for teacher_signal topk (no GPU needed)."""
    from kubedistill.teacher.sglang import topk_from_meta_info

    meta = {"input_top_logprobs": [None, [[-0.5, 7, "a"], [-2.0, 3, None], [-1.0, 9, "b"]],
                                   [[-0.1, 1, None], [-3.0, 2, None], [-0.2, 4, None]]]}
    lps, ids = topk_from_meta_info(meta, [0, 1], 2)
    assert ids.tolist() == [[7, 9], [1, 4]]
    assert lps.dtype == torch.float32 and lps.tolist() == [[-0.5, -1.0],
                                                           [pytest.approx(-0.1), pytest.approx(-0.2)]]
    with pytest.raises(DataError, match="token 3 .* 0 top logprobs, 2 needed"):
        topk_from_meta_info(meta, [2], 2)


@pytest.mark.gpu
def test_sglang_backend_writes_the_same_top_k_as_hf(smollm2_dir, prepared, tmp_path):
    """GPU only: cache-teacher with the sglang backend and teacher_signal topk (top-k
    straight from SGLang) against the hf backend: same ids at >= 95% of positions, log-probs
    within bf16 noise."""
    pytest.importorskip("sglang")
    caches = {}
    for backend in ("hf", "sglang"):
        cfg = make_cfg(smollm2_dir, prepared, str(tmp_path / backend), teacher_backend=backend,
                       teacher_mem_fraction_static=0.3, teacher_tp_size=1)
        cache_teacher(cfg)
        caches[backend] = TeacherCache(str(tmp_path / backend))
    same = total = 0
    for sid in caches["hf"].sample_ids():
        a, b = caches["hf"].get(sid), caches["sglang"].get(sid)
        same += int((a.topk_ids[:, 0] == b.topk_ids[:, 0]).sum())
        total += a.topk_ids.shape[0]
        assert (a.topk_logprobs[:, 0] - b.topk_logprobs[:, 0]).abs().max() < 0.1
    assert same >= 0.95 * total
