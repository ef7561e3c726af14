"""Resumable checkpoints and the final HF export.

Layout under ``ckpt_path`` (a local path or an fsspec URI)::

    step_00000004/         torch.distributed.checkpoint: {"model": ..., "optim": ...}
                           (sharded; loads into any world size), plus
                           rank_00000.pt ...  scheduler, data cursor, RNG states of each rank
    latest.json            {"step": 4, "dir": "step_00000004"}

The model entry holds the student AND the algorithm's state (``algorithm.*`` keys: e.g.
DSKD projectors), without the frozen teacher head. ``latest.json`` is replaced atomically
only after every rank has finished writing, so a crash during a save leaves the previous
checkpoint in charge. The two newest checkpoints are kept.
"""

from __future__ import annotations

import io
import logging
import random
import re
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from kubedistill import storage
from kubedistill.train.fsdp import DistEnv, barrier

log = logging.getLogger(__name__)
LATEST = "latest.json"
KEEP = 2


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values only, so that checkpoints load with
    ``torch.load(weights_only=True)`` (numpy's key array is stored as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                       int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, ckpt_path: str, env: DistEnv):
        self.root = ckpt_path
        self.env = env

    def latest(self) -> str | None:
        """The directory of the newest complete checkpoint, or None."""
        pointer = storage.join(self.root, LATEST)
        if not storage.exists(pointer):
            return None
        return storage.join(self.root, storage.read_json(pointer)["dir"])

    def save(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, cursor: dict[str, Any], keep_key=lambda k: True) -> str:
        """Every rank calls this; returns the checkpoint directory."""
        name = f"step_{step:08d}"
        where = storage.join(self.root, name)
        if self.env.is_main and storage.exists(where):  # debris of a crashed save
            storage.filesystem(where)[0].rm(storage.filesystem(where)[1], recursive=True)
        barrier()
        msd, osd = get_state_dict(module, optimizer)
        dcp.save({"model": {k: v for k, v in msd.items() if keep_key(k)}, "optim": osd},
                 storage_writer=_writer(where))
        extra = {"scheduler": scheduler.state_dict(), "cursor": cursor, "rng": rng_state(),
                 "world_size": self.env.world_size}
        buf = io.BytesIO()
        torch.save(extra, buf)
        storage.write_bytes_atomic(storage.join(where, f"rank_{self.env.rank:05d}.pt"),
                                   buf.getvalue())
        barrier()
        if self.env.is_main:
            storage.write_json_atomic(storage.join(self.root, LATEST), {"step": step, "dir": name})
            self._prune(keep=name)
        barrier()
        return where

    def load(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             keep_key=lambda k: True) -> dict[str, Any] | None:
        """Restore the newest checkpoint in place; returns its data cursor (None: none)."""
        where = self.latest()
        if where is None:
            return None
        msd, osd = get_state_dict(module, optimizer)
        state = {"model": {k: v for k, v in msd.items() if keep_key(k)}, "optim": osd}
        dcp.load(state, storage_reader=_reader(where))
        set_state_dict(module, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        mine = storage.join(where, f"rank_{self.env.rank:05d}.pt")
        if not storage.exists(mine):  # fewer ranks saved than now run: reuse rank 0's RNG
            log.warning("%s: no state for rank %d; using rank 0's", where, self.env.rank)
            mine = storage.join(where, "rank_00000.pt")
        extra = torch.load(io.BytesIO(storage.read_bytes(mine)), weights_only=True)
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        log.info("resumed from %s (step %s)", where, extra["cursor"]["global_step"])
        return extra["cursor"]

    def _prune(self, keep: str) -> None:
        fs, path = storage.filesystem(self.root)
        steps = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                       if re.fullmatch(r"step_\d{8}", p.rstrip("/").rsplit("/", 1)[-1]))
        for old in [s for s in steps if s < keep][:-(KEEP - 1) or None]:
            fs.rm(f"{path.rstrip('/')}/{old}", recursive=True)


def _writer(uri: str):
    if storage.is_local(uri):
        return dcp.FileSystemWriter(storage.local_path(uri))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(uri, **_fsspec_options(uri))


def _reader(uri: str):
    if storage.is_local(uri):
        return dcp.FileSystemReader(storage.local_path(uri))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(uri, **_fsspec_options(uri))


def _fsspec_options(uri: str) -> dict:
    """The same S3 endpoint settings that :mod:`kubedistill.storage` uses."""
    return storage._s3_options() if uri.startswith(("s3://", "s3a://")) else {}
