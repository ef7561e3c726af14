"""Shard schema, encodings, writer determinism, planning helpers (no model needed)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from kubedistill import storage
from kubedistill.errors import ArtifactMismatch
from kubedistill.shards import SCHEMA_VERSION, ShardRow, check_key, shard_schema, write_shard
from kubedistill.shards.schema import FP8_MAX, decode_hidden, encode_hidden
from kubedistill.teacher.cache import ShardPlan, assign_ranges, loss_positions
from kubedistill.teacher.hf import token_budget_batches


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("bf16", 2 ** -8), ("fp16", 2 ** -11),
                                       ("fp8", 2 ** -3)])
def test_encode_decode_round_trip(dtype, tol):
    torch.manual_seed(0)
    h = torch.randn(7, 32) * torch.logspace(-2, 2, 7)[:, None]  # rows of very different size
    flat, scale = encode_hidden(h, dtype)
    back = decode_hidden(flat, scale, dtype, 32)
    assert back.dtype == torch.float32 and back.shape == h.shape
    rel = ((back - h).abs() / h.abs().amax(dim=1, keepdim=True)).max()
    assert rel <= tol
    if dtype == "fp8":
        assert np.allclose(scale, h.abs().amax(dim=1).numpy() / FP8_MAX)
    if dtype == "bf16":  # stored bits are exactly torch's bf16 bits
        bits = h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(-1)
        assert np.array_equal(flat, bits)
        assert decode_hidden(flat, None, "bf16", 32, None).dtype == torch.bfloat16


def test_zero_rows_and_zero_vectors():
    flat, scale = encode_hidden(torch.zeros(0, 8), "fp8")
    assert flat.size == 0 and scale.size == 0
    assert decode_hidden(flat, scale, "fp8", 8).shape == (0, 8)
    flat, scale = encode_hidden(torch.zeros(2, 8), "fp8")
    assert np.all(scale == 1.0) and decode_hidden(flat, scale, "fp8", 8).abs().sum() == 0


def test_schema_is_versioned_and_documented():
    schema = shard_schema("fp8", 64, 4)
    assert schema.names == ["id", "positions", "hidden", "hidden_scale", "topk_logprobs",
                            "topk_ids"]
    assert schema.metadata[b"kubedistill.schema_version"] == str(SCHEMA_VERSION).encode()
    assert shard_schema("bf16", 64, 0).field("hidden").type == pa.list_(pa.uint16())
    import kubedistill.shards.schema as mod

    for column in schema.names:
        assert f"``{column}``" in mod.__doc__


def _rows(seed: int) -> list[ShardRow]:
    g = torch.Generator().manual_seed(seed)
    return [ShardRow(f"s:{i}", list(range(i)), torch.randn(i, 16, generator=g), i + 3,
                     torch.randn(i, 2, generator=g), torch.randint(0, 99, (i, 2), generator=g))
            for i in range(20)]


def test_writer_is_deterministic_and_ranges_verify(tmp_path):
    entries = [write_shard(str(tmp_path / d), "train-00000", _rows(0), dtype="bf16",
                           hidden_size=16, topk=2, meta={"split": "train", "index": 0})
               for d in ("a", "b")]
    a = (tmp_path / "a" / "train-00000.arrow").read_bytes()
    assert a == (tmp_path / "b" / "train-00000.arrow").read_bytes()
    assert entries[0] == entries[1] and entries[0]["sha256"] == hashlib.sha256(a).hexdigest()
    assert [b["rows"] for b in entries[0]["batches"]] == [16, 4]
    schema = shard_schema("bf16", 16, 2)
    for b in entries[0]["batches"]:  # each byte range is one record batch message
        block = a[b["offset"]:b["offset"] + b["length"]]
        assert hashlib.sha256(block).hexdigest() == b["sha256"]
        batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(block)), schema)
        assert batch.num_rows == b["rows"]
    marker = storage.read_json(str(tmp_path / "a" / "markers" / "train-00000.json"))
    assert marker == entries[0] and marker["positions"] == sum(range(20))


def test_loss_positions_policy():
    assert loss_positions(np.array([0, 0, 1, 1, 0, 1])).tolist() == [1, 2, 4]
    assert loss_positions(np.array([1, 0, 0])).tolist() == []  # i = 0 predicts nothing


def test_token_budget_batches_cover_everything_within_budget():
    lengths = [5, 50, 7, 100, 20, 20, 3]
    batches = token_budget_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # by hand, longest first: 100 (over budget) alone; 50 alone (2 x 50 > 60); 20, 20, 7
    # padded to 20 (3 x 20 = 60); 5, 3 padded to 5
    assert batches == [[3], [1], [4, 5, 2], [0, 6]]


def test_assign_ranges_is_contiguous_and_balanced():
    plans = [ShardPlan("train", i, 0, 0, t) for i, t in enumerate([10, 10, 10, 10, 40, 20])]
    ranges = assign_ranges(plans, 2)
    assert [p for r in ranges for p in r] == plans
    assert [sum(p.tokens for p in r) for r in ranges] == [40, 60]
    assert sorted(len(r) for r in assign_ranges(plans[:1], 3)) == [0, 0, 1]  # idle workers ok


def test_check_key_names_each_differing_part():
    key = {"teacher_weights": "a", "tokenizer": "t", "data": "d", "dtype": "bf16",
           "positions_policy": "p", "topk": 0}
    check_key(key, dict(key))
    with pytest.raises(ArtifactMismatch) as err:
        check_key(key, {**key, "tokenizer": "u", "topk": 4})
    assert "tokenizer" in str(err.value) and "topk" in str(err.value)
    assert "data" not in str(err.value)


def test_top_k_signal_has_no_hidden_columns():
    schema = shard_schema("fp8", 0, 16, "topk")
    assert schema.names == ["id", "positions", "topk_logprobs", "topk_ids"]
    assert schema.metadata[b"kubedistill.teacher_signal"] == b"topk"
    assert shard_schema("bf16", 64, 4, "both").names[:3] == ["id", "positions", "hidden"]
    with pytest.raises(ValueError, match="needs cache_topk > 0"):
        shard_schema("bf16", 0, 0, "topk")
