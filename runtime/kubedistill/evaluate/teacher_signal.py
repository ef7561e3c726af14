"""Teacher logits at the student's prediction positions: from the teacher cache or live.

Both sources answer ``logits(batch, rows, brow) -> (teacher_logits [M, V], keep [N])`` where
``N`` entries are the student's prediction positions of ``batch`` (row-major, as
:meth:`Batch.target_positions`) and ``keep`` marks the ``M`` entries the teacher scored.
Only rows whose teacher tokens ARE the student tokens (``teacher_input_ids`` null or equal)
are comparable token by token; other rows are left out of KL and top-1 agreement.
"""

from __future__ import annotations

import logging

import torch

from kubedistill import storage
from kubedistill.evaluate.scoring import Batch, target_hidden
from kubedistill.teacher.head import TeacherHead

log = logging.getLogger(__name__)


def same_tokens(row: dict) -> bool:
    t = row.get("teacher_input_ids")
    return t is None or list(t) == list(row["input_ids"])


def _comparable(batch: Batch, rows: list[dict], brow: torch.Tensor) -> torch.Tensor:
    ok = torch.tensor([same_tokens(rows[r]) for r in batch.rows], dtype=torch.bool)
    return ok.to(brow.device)[brow]


class LiveSignal:
    """A teacher model run on the same batch (same tokens, same positions)."""

    kind = "live"

    def __init__(self, model: torch.nn.Module, device: str):
        self.model, self.device = model, device
        self.head = TeacherHead.from_model(model)

    def logits(self, batch: Batch, rows: list[dict], brow: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = _comparable(batch, rows, brow)
        hidden, _, _ = target_hidden(self.model, batch, self.device)
        return self.head.logits(hidden[keep]), keep


class CacheSignal:
    """Cached final hidden states (``TeacherCache.get(id)``) through the cached teacher head."""

    kind = "cache"

    def __init__(self, cache):
        self.cache = cache
        self.head = cache.head()

    def logits(self, batch: Batch, rows: list[dict], brow: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        comparable = _comparable(batch, rows, brow).cpu()
        b, pos = batch.target_positions()
        keep = torch.zeros_like(comparable)
        parts: list[torch.Tensor] = []
        for k, r in enumerate(batch.rows):
            idx = (b == k).nonzero(as_tuple=True)[0]
            if not len(idx) or not bool(comparable[idx[0]]) or rows[r]["id"] not in self.cache:
                continue
            states = self.cache.get(rows[r]["id"])
            where = {int(p): j for j, p in enumerate(states.positions.tolist())}
            hits = [(int(i), where[int(pos[i])]) for i in idx if int(pos[i]) in where]
            if not hits:
                continue
            keep[[i for i, _ in hits]] = True
            parts.append(states.hidden[[j for _, j in hits]])
        if not parts:
            return torch.zeros((0, self.head.vocab_size)), keep.to(brow.device)
        return self.head.logits(torch.cat(parts)), keep.to(brow.device)


def open_cache_signal(uri: str, rows: list[dict], teacher_dir: str | None = None
                      ) -> CacheSignal | None:
    """A :class:`CacheSignal` when a complete cache at ``uri`` holds the eval samples and
    (when ``teacher_dir`` is given) was built from that teacher's weights and tokenizer."""
    try:
        if not storage.exists(storage.join(uri, "manifest.json")):
            return None
        from kubedistill.teacher.reader import TeacherCache

        cache = TeacherCache(uri)
        if teacher_dir is not None:
            from kubedistill.teacher.key import tokenizer_hash, weights_hash

            key = cache.manifest.get("key", {})
            if (key.get("teacher_weights") != weights_hash(teacher_dir)
                    or key.get("tokenizer") != tokenizer_hash(teacher_dir)):
                raise ValueError("it was built from another teacher")
    except Exception as exc:  # no usable cache: the caller falls back to a live teacher
        log.info("teacher cache at %s not used (%s); using a live teacher", uri, exc)
        return None
    wanted = [r["id"] for r in rows if same_tokens(r)]
    present = sum(sid in cache for sid in wanted)
    if not wanted or present < len(wanted):
        log.info("teacher cache at %s holds %d of %d eval samples; using a live teacher",
                 uri, present, len(wanted))
        return None
    return CacheSignal(cache)
