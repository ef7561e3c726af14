"""Arrow schema of a teacher-cache shard, and the hidden-state encodings.

Schema version ``SCHEMA_VERSION`` = 2 (2 added the teacher signal: ``hidden`` is absent
from ``topk`` caches; version-1 caches must be rebuilt). A shard is one Arrow IPC *file* (``.arrow``) holding
record batches of at most ``ROWS_PER_BATCH`` rows, one row per sample:

==================  ===================  ==================================================
column              type                 meaning
==================  ===================  ==================================================
``id``              string               the prepared sample id
``positions``       list<int32>          ``[i - 1 for i with m[i] == 1]``: the positions
                                         (in teacher tokens) that predict a target, where
                                         ``m`` is the teacher-side loss mask
``hidden``          list<T>              signal ``hidden``/``both`` only: the teacher's
                                         final post-norm hidden states at ``positions``,
                                         row-major ``[n, d]`` flattened
``hidden_scale``    list<float32>        fp8 only (with ``hidden``): one scale per
                                         position, ``[n]``
``topk_logprobs``   list<float32>        ``cache_topk > 0`` only: ``[n, k]`` flattened,
                                         the teacher's top-k log-probs (temperature 1),
                                         descending
``topk_ids``        list<int32>          ``cache_topk > 0`` only: their token ids
==================  ===================  ==================================================

``T`` and the decoding, per ``dtype`` (schema metadata ``kubedistill.dtype``):

- ``bf16`` (default): uint16, the raw bfloat16 bit patterns (``h.view(int16)``);
- ``fp16``: uint16, the raw IEEE half bit patterns;
- ``fp32``: float32;
- ``fp8``: uint8, float8 e4m3fn bit patterns of ``h / s`` with the per-token fp32 scale
  ``s = max(|h|) / 448`` (448 = largest e4m3fn value; ``s = 1`` for an all-zero row);
  decoded as ``q.float() * s``.

Teacher signal (``teacher_signal``, schema metadata ``kubedistill.teacher_signal``):
``hidden`` (hidden states; top-k columns too when ``cache_topk > 0``), ``topk`` (top-k
columns only: 8k bytes per position, no lm_head needed to train) or ``both``.

Schema metadata (all strings): ``kubedistill.schema_version``, ``kubedistill.dtype``,
``kubedistill.hidden_size``, ``kubedistill.topk``, ``kubedistill.teacher_signal``. Shard bytes hold no timestamps, so the
same inputs give byte-identical shards.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = 2
SIGNALS = ("hidden", "topk", "both")
ROWS_PER_BATCH = 16
DTYPES = ("bf16", "fp16", "fp32", "fp8")
FP8_MAX = 448.0

_STORAGE = {"bf16": pa.uint16(), "fp16": pa.uint16(), "fp32": pa.float32(), "fp8": pa.uint8()}
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp8": torch.float8_e4m3fn}
_BITS = {"bf16": torch.int16, "fp16": torch.int16, "fp32": torch.float32, "fp8": torch.uint8}


def has_hidden(signal: str) -> bool:
    return signal in ("hidden", "both")


def shard_schema(dtype: str, hidden_size: int, topk: int, signal: str = "hidden") -> pa.Schema:
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
    if signal not in SIGNALS:
        raise ValueError(f"teacher_signal must be one of {SIGNALS}, got {signal!r}")
    if signal != "hidden" and topk <= 0:
        raise ValueError(f"teacher_signal {signal!r} needs cache_topk > 0")
    fields = [pa.field("id", pa.string(), nullable=False),
              pa.field("positions", pa.list_(pa.int32()), nullable=False)]
    if has_hidden(signal):
        fields.append(pa.field("hidden", pa.list_(_STORAGE[dtype]), nullable=False))
        if dtype == "fp8":
            fields.append(pa.field("hidden_scale", pa.list_(pa.float32()), nullable=False))
    if topk > 0:
        fields += [pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),
                   pa.field("topk_ids", pa.list_(pa.int32()), nullable=False)]
    meta = {"kubedistill.schema_version": str(SCHEMA_VERSION), "kubedistill.dtype": dtype,
            "kubedistill.hidden_size": str(hidden_size), "kubedistill.topk": str(topk),
            "kubedistill.teacher_signal": signal}
    return pa.schema(fields, metadata=meta)


def encode_hidden(hidden: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``[n, d]`` float hidden states -> (flat storage array, per-token scales or None)."""
    h = hidden.detach().to("cpu", torch.float32)
    scale = None
    if dtype == "fp8":
        amax = h.abs().amax(dim=-1, keepdim=True) if h.numel() else h.new_zeros(h.shape[0], 1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        h = h / s
        scale = s.reshape(-1).numpy().astype(np.float32)
    bits = h.to(_TORCH[dtype]).contiguous().view(_BITS[dtype]).reshape(-1).numpy()
    storage = {"bf16": np.uint16, "fp16": np.uint16, "fp32": np.float32, "fp8": np.uint8}
    return bits.view(storage[dtype]), scale


def decode_hidden(flat: np.ndarray, scale: np.ndarray | None, dtype: str, hidden_size: int,
                  out_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Inverse of :func:`encode_hidden`: ``[n, d]`` in ``out_dtype`` (None: stored dtype;
    fp8 then decodes to bfloat16). With ``out_dtype=None`` and no scale, the tensor shares
    memory with ``flat`` (zero-copy); treat it as read-only."""
    raw = torch.from_numpy(flat) if flat.flags.writeable else _readonly_tensor(flat)
    if dtype in ("bf16", "fp16"):
        t = raw.view(torch.int16).view(_TORCH[dtype])
    elif dtype == "fp32":
        t = raw
    else:
        t = raw.view(torch.float8_e4m3fn).to(torch.float32)
    t = t.reshape(-1, hidden_size)
    if scale is not None:
        t = t * torch.from_numpy(np.array(scale, dtype=np.float32)).reshape(-1, 1)
        if out_dtype is None:
            out_dtype = torch.bfloat16
    return t if out_dtype is None or t.dtype == out_dtype else t.to(out_dtype)


def _readonly_tensor(arr: np.ndarray) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": we never write
        dtype = torch.from_numpy(np.empty(0, arr.dtype)).dtype
        if arr.size == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(arr.data, dtype=dtype)


def list_values(column: pa.ListArray, row: int) -> np.ndarray:
    """Values of one list cell as a numpy view (zero-copy) over the Arrow buffer."""
    start, stop = column.offsets[row].as_py(), column.offsets[row + 1].as_py()
    return column.values.slice(start, stop - start).to_numpy(zero_copy_only=True)
