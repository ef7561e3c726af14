"""The cache-teacher stage on a tiny real-tokenizer teacher: restart rules, fan-out, S3,
key and checksum checks, teacher-side tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _prepared import write_prepared

from kubedistill import storage
from kubedistill.config import load_config
from kubedistill.errors import ArtifactMismatch
from kubedistill.teacher.cache import cache_teacher, merge_cache, read_teacher_rows
from kubedistill.teacher.key import expected_cache_key
from kubedistill.teacher.reader import TeacherCache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prepared(smollm2_dir, tmp_path_factory) -> str:
    return write_prepared(str(tmp_path_factory.mktemp("prep") / "prepared"), smollm2_dir,
                          n_train=12, n_eval=4, max_tokens=48, teacher_variant=True)


def make_cfg(teacher: str, prepared: str, cache: str, **extra):
    overrides = {"teacher_name_or_path": teacher, "prepared_path": prepared,
                 "teacher_cache_path": cache, "cache_rows_per_shard": 3,
                 "attn_implementation": "sdpa", **extra}
    return load_config(None, overrides)


def shard_bytes(cache: str) -> dict[str, bytes]:
    manifest = storage.read_json(storage.join(cache, "manifest.json"))
    return {e["file"]: storage.read_bytes(storage.join(cache, e["file"]))
            for e in manifest["shards"]}


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, prepared, tmp_path_factory) -> str:
    """An uninterrupted single-process run (bf16) that other runs are compared with."""
    cache = str(tmp_path_factory.mktemp("ref") / "cache")
    out = cache_teacher(make_cfg(tiny_teacher_dir, prepared, cache))
    assert out["status"] == "written" and out["shards"] == 6  # 12/3 train + 4/3 eval
    return cache


def test_rerun_on_complete_cache_does_nothing(tiny_teacher_dir, prepared, reference):
    before = {f: os.stat(os.path.join(reference, f)).st_mtime_ns for f in os.listdir(reference)}
    out = cache_teacher(make_cfg(tiny_teacher_dir, prepared, reference))
    assert out["status"] == "complete" and out["shards_written"] == 0
    after = {f: os.stat(os.path.join(reference, f)).st_mtime_ns for f in os.listdir(reference)}
    assert before == after


def test_manifest_counts_and_positions(tiny_teacher_dir, prepared, reference):
    cache = TeacherCache(reference)
    m = cache.manifest
    assert m["splits"]["train"]["rows"] == 12 and m["splits"]["eval"]["rows"] == 4
    assert [e["file"] for e in m["shards"]][:2] == ["eval-00000.arrow", "eval-00001.arrow"]
    rows = read_teacher_rows(prepared, "train")
    assert m["splits"]["train"]["tokens"] == sum(len(t) for t in rows.tokens)
    assert m["splits"]["train"]["positions"] == sum(len(p) for p in rows.positions)
    for e in m["shards"]:
        assert os.path.getsize(os.path.join(reference, e["file"])) == e["bytes"]
        assert storage.sha256_file(os.path.join(reference, e["file"])) == e["sha256"]
    st = cache.get("gsm8k-train:0", dtype=None)
    assert st.hidden.dtype == torch.bfloat16 and st.hidden.shape[1] == 96


def test_teacher_tokens_and_mask_are_used(tiny_teacher_dir, prepared, reference):
    """Rows with teacher_input_ids are run on those tokens, at their own mask's positions."""
    import pyarrow.parquet as pq

    from kubedistill.models import load_causal_lm

    table = pq.read_table(os.path.join(prepared, "train.parquet")).to_pylist()
    row = next(r for r in table if r["teacher_input_ids"] is not None)
    assert row["teacher_input_ids"] != row["input_ids"]
    mask = row["teacher_loss_mask"]
    expected_pos = [i - 1 for i in range(len(mask)) if mask[i] == 1]
    got = TeacherCache(reference).get(row["id"])
    assert got.positions.tolist() == expected_pos
    model = load_causal_lm(tiny_teacher_dir)
    with torch.inference_mode():
        h = model.model(torch.tensor([row["teacher_input_ids"]])).last_hidden_state[0]
    want = h[expected_pos].to(torch.bfloat16).float()
    assert torch.allclose(got.hidden, want, atol=2e-2, rtol=2e-2)
    plain = next(r for r in table if r["teacher_input_ids"] is None)
    assert TeacherCache(reference).get(plain["id"]).positions.tolist() == [
        i - 1 for i, m in enumerate(plain["loss_mask"]) if m == 1]


_SLOW_SCRIPT = """
import sys, time
from kubedistill.cli import main
from kubedistill.teacher import hf
_orig = hf.HFTeacherEngine.final_states
def slow(self, *a, **k):
    time.sleep(0.4)
    return _orig(self, *a, **k)
hf.HFTeacherEngine.final_states = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_matches_uninterrupted(tiny_teacher_dir, prepared, reference,
                                                   tmp_path):
    cache = str(tmp_path / "cache")
    argv = ["cache-teacher", "--teacher_name_or_path", tiny_teacher_dir,
            "--prepared_path", prepared, "--teacher_cache_path", cache,
            "--cache_rows_per_shard", "3", "--attn_implementation", "sdpa"]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "tests")}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SCRIPT, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = os.path.join(cache, "markers")
    deadline = time.time() + 60
    def committed() -> list[str]:
        names = os.listdir(markers) if os.path.isdir(markers) else []
        return sorted(f for f in names
                      if f.endswith(".json") and f.startswith(("train-", "eval-")))

    while time.time() < deadline and not committed():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = committed()
    assert 1 <= len(done) < 6, "the kill must land part-way"
    assert not os.path.exists(os.path.join(cache, "manifest.json"))
    kept = {f: os.stat(os.path.join(cache, f.replace(".json", ".arrow"))).st_ino for f in done}

    out = cache_teacher(make_cfg(tiny_teacher_dir, prepared, cache))
    assert out["shards_written"] == 6 - len(done)
    for f, inode in kept.items():  # finished shards were left untouched
        assert os.stat(os.path.join(cache, f.replace(".json", ".arrow"))).st_ino == inode
    assert storage.read_json(os.path.join(cache, "manifest.json")) == \
        storage.read_json(os.path.join(reference, "manifest.json"))
    assert shard_bytes(cache) == shard_bytes(reference)
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


def test_fan_out_then_merge_equals_single_run(tiny_teacher_dir, prepared, reference, tmp_path):
    cache = str(tmp_path / "cache")
    parts = [cache_teacher(make_cfg(tiny_teacher_dir, prepared, cache, num_shards=2,
                                    shard_index=w)) for w in (0,)]
    with pytest.raises(ArtifactMismatch, match="worker 1 of 2"):
        merge_cache(make_cfg(tiny_teacher_dir, prepared, cache, num_shards=2))
    parts.append(cache_teacher(make_cfg(tiny_teacher_dir, prepared, cache, num_shards=2,
                                        shard_index=1)))
    assert all(p["status"] == "partial" for p in parts)
    assert parts[0]["shards"] + parts[1]["shards"] == 6 and parts[1]["shards"] > 0
    assert abs(parts[0]["tokens"] - parts[1]["tokens"]) < 0.5 * (parts[0]["tokens"] +
                                                                  parts[1]["tokens"])
    assert not os.path.exists(os.path.join(cache, "manifest.json"))
    merged = merge_cache(make_cfg(tiny_teacher_dir, prepared, cache, num_shards=2))
    assert merged["status"] == "merged"
    assert storage.read_json(os.path.join(cache, "manifest.json")) == \
        storage.read_json(os.path.join(reference, "manifest.json"))
    assert shard_bytes(cache) == shard_bytes(reference)


def test_key_mismatch_names_the_part(tiny_teacher_dir, tiny_model_dir, prepared, reference):
    cache = TeacherCache(reference)
    cfg = make_cfg(tiny_teacher_dir, prepared, reference)
    cache.check_key(expected_cache_key(cfg))  # same run: fine
    with pytest.raises(ArtifactMismatch, match="dtype: cache has 'bf16', expected 'fp32'"):
        cache.check_key(expected_cache_key(make_cfg(tiny_teacher_dir, prepared, reference,
                                                    cache_dtype="fp32")))
    with pytest.raises(ArtifactMismatch, match="topk") as err:
        cache.check_key({**expected_cache_key(cfg), "topk": 8, "data": "other"})
    assert "data" in str(err.value) and "teacher_weights" not in str(err.value)
    with pytest.raises(ArtifactMismatch, match="teacher_weights"):  # another teacher, same dir
        cache_teacher(make_cfg(tiny_model_dir, prepared, reference))


def test_checksum_corruption_is_detected(reference, tmp_path):
    import shutil

    cache = str(tmp_path / "cache")
    shutil.copytree(reference, cache)
    entry = TeacherCache(cache).manifest["shards"][2]
    path = os.path.join(cache, entry["file"])
    data = bytearray(open(path, "rb").read())
    span = entry["batches"][0]
    data[span["offset"] + span["length"] - 64] ^= 0xFF  # inside the hidden values
    open(path, "wb").write(bytes(data))
    sid = entry["ids"][0]
    with pytest.raises(ArtifactMismatch, match="sha256"):
        TeacherCache(cache).get(sid)
    TeacherCache(cache, verify=False).get(sid)  # unverified reads go through


def test_s3_round_trip(tiny_teacher_dir, prepared, reference, s3_bucket):
    storage.upload_dir(prepared, f"{s3_bucket}/prepared")
    cache = f"{s3_bucket}/cache"
    out = cache_teacher(make_cfg(tiny_teacher_dir, f"{s3_bucket}/prepared", cache))
    assert out["status"] == "written"
    remote, local = TeacherCache(cache), TeacherCache(reference)
    assert remote.manifest["shards"] == local.manifest["shards"]
    ids = remote.sample_ids()
    for a, b in zip(remote.iter(ids, prefetch=3), local.iter(ids), strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.hidden, b.hidden)
    assert torch.equal(remote.head().weight, local.head().weight)
    # a corrupted remote batch is caught without reading the rest of the shard
    entry = remote.manifest["shards"][0]
    fs, path = storage.filesystem(f"{cache}/{entry['file']}")
    data = bytearray(fs.cat_file(path))
    data[entry["batches"][0]["offset"] + 200] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ArtifactMismatch, match="record batch 0"):
        TeacherCache(cache).get(entry["ids"][0])


def test_topk_logprobs_are_the_heads_top_k(tiny_teacher_dir, prepared, tmp_path):
    cfg = make_cfg(tiny_teacher_dir, prepared, str(tmp_path / "cache"), cache_dtype="fp32",
                   cache_topk=5, cache_rows_per_shard=16)
    cache_teacher(cfg)
    cache = TeacherCache(cfg.teacher_cache_path)
    assert cache.manifest["key"]["topk"] == 5
    head = cache.head()
    for st in cache.iter(cache.sample_ids("eval")):
        logp = torch.log_softmax(head.logits(st.hidden), dim=-1)
        values, ids = logp.topk(5, dim=-1)
        assert st.topk_ids.shape == (st.hidden.shape[0], 5)
        assert torch.equal(st.topk_ids, ids)
        assert torch.allclose(st.topk_logprobs, values, atol=1e-5)


def test_unfinished_cache_of_another_teacher_is_rewritten(tiny_teacher_dir, tiny_model_dir,
                                                          prepared, reference, tmp_path):
    cache = str(tmp_path / "cache")
    cache_teacher(make_cfg(tiny_model_dir, prepared, cache, num_shards=2, shard_index=0))
    out = cache_teacher(make_cfg(tiny_teacher_dir, prepared, cache))
    assert out["shards_written"] == 6  # no stale shard of the other teacher survives
    assert torch.equal(TeacherCache(cache).head().weight, TeacherCache(reference).head().weight)
    assert shard_bytes(cache) == shard_bytes(reference)
