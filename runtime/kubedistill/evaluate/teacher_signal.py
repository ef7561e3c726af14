"""Teacher logits at the student's prediction positions: from the teacher cache or live.

Both sources answer ``logits(batch, rows, brow) -> (teacher_logits [M, V], keep [N])`` where
``N`` entries are the student's prediction positions of ``batch`` (row-major, as
:meth:`Batch.target_positions`) and ``keep`` marks the ``M`` entries the teacher scored; row
``m`` of ``teacher_logits`` belongs to the ``m``-th marked entry. Which entries are compared
with which teacher position (:func:`compared_pairs`):

- same tokenizer (no vocabulary map): rows whose teacher tokens ARE the student tokens
  (``teacher_input_ids`` null or equal), each target entry with the same position; other
  rows are left out of KL and top-1 agreement.
- cross-tokenizer (``vocab_map`` given): the ``ct_align`` pairs of each row (student
  position ``p``, teacher position ``q`` whose prefixes cover the same text; both predict a
  target), entry ``p`` with the teacher's state at ``q`` of ``teacher_input_ids``. The
  logits are then over the K mapped teacher ids only (``vocab_map.teacher_ids``, in map
  order) and ``student_cols`` (``vocab_map.student_ids``) restricts the student side alike,
  as :class:`~kubedistill.algorithms.simple_ctkd.SimpleCTKD` compares them
  (``space = "shared_vocab_aligned"``; otherwise ``"full_vocab"``).

The cache holds the final hidden states at the teacher's target positions
(``TeacherCache.get(id).positions``: the student's positions for same-tokenizer data, the
teacher's for cross-tokenizer data); a live teacher is run on the teacher's tokens and its
final hidden states are taken at the compared positions. An image-text teacher
(``images``: :class:`~kubedistill.evaluate.vision.EvalImages` with the TEACHER's processor)
reads the rows' images through its own processor, with its own positions.
"""

from __future__ import annotations

import logging

import torch

from kubedistill import storage
from kubedistill.crosstok.align import unflatten_pairs
from kubedistill.crosstok.vocab import VocabMap
from kubedistill.errors import DataError
from kubedistill.evaluate.scoring import Batch, pad_rows
from kubedistill.teacher.head import TeacherHead

log = logging.getLogger(__name__)
Pairs = list[tuple[int, torch.Tensor, torch.Tensor]]  # (batch row, entries [n], teacher pos [n])


def same_tokens(row: dict) -> bool:
    t = row.get("teacher_input_ids")
    return t is None or list(t) == list(row["input_ids"])


def is_compared(row: dict, cross_tokenizer: bool) -> bool:
    """Whether KL / top-1 cover this row (see the module docstring)."""
    return bool(row.get("ct_align")) if cross_tokenizer else same_tokens(row)


def compared_pairs(batch: Batch, rows: list[dict], cross_tokenizer: bool) -> Pairs:
    """Per compared row ``k`` of ``batch``: the entries (indexes into the ``N`` prediction
    positions, ascending) and the teacher positions they are compared with."""
    b, pos = batch.target_positions()
    out: Pairs = []
    for k, r in enumerate(batch.rows):
        idx = (b == k).nonzero(as_tuple=True)[0]
        if not len(idx) or not is_compared(rows[r], cross_tokenizer):
            continue
        if not cross_tokenizer:
            out.append((k, idx, pos[idx]))
            continue
        pairs = torch.from_numpy(unflatten_pairs(rows[r]["ct_align"]).T.copy())
        p = pos[idx]
        j = torch.searchsorted(p, pairs[0]).clamp(max=len(p) - 1)
        if not torch.equal(p[j], pairs[0]):
            raise DataError(f"eval sample {rows[r]['id']!r}: ct_align names student positions "
                            "that do not predict a target of loss_mask")
        out.append((k, idx[j], pairs[1]))
    return out


class _Signal:
    kind = ""

    def __init__(self, head: TeacherHead, vocab_map: VocabMap | None):
        self.student_cols = None if vocab_map is None else vocab_map.student_ids
        self.space = "full_vocab" if vocab_map is None else "shared_vocab_aligned"
        self.head = head if vocab_map is None else head.select(vocab_map.teacher_ids)

    def logits(self, batch: Batch, rows: list[dict], brow: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.zeros(brow.shape[0], dtype=torch.bool)
        parts: list[torch.Tensor] = []
        pairs = compared_pairs(batch, rows, self.student_cols is not None)
        for entries, hidden in self._states(batch, rows, pairs):
            keep[entries] = True
            parts.append(hidden)
        if not parts:
            return torch.zeros((0, self.head.vocab_size)), keep.to(brow.device)
        return self.head.logits(torch.cat(parts)), keep.to(brow.device)

    def _states(self, batch: Batch, rows: list[dict], pairs: Pairs
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(entries, teacher hidden states [n, d]) per compared row, rows in batch order."""
        raise NotImplementedError


class LiveSignal(_Signal):
    """A teacher model run on the teacher's tokens of the batch's rows."""

    kind = "live"

    def __init__(self, model: torch.nn.Module, device: str, vocab_map: VocabMap | None = None,
                 images=None):
        super().__init__(TeacherHead.from_model(model), vocab_map)
        self.model, self.device, self.images = model, device, images

    def _states(self, batch, rows, pairs):
        if not pairs:
            return []
        if self.student_cols is None:  # same tokens: the student's batch itself
            tb, at = batch, [k for k, _, _ in pairs]
        else:
            picked = [rows[batch.rows[k]] for k, _, _ in pairs]
            tb = pad_rows([r["teacher_input_ids"] for r in picked],
                          [r["teacher_loss_mask"] for r in picked], [0] * len(picked))
            at = list(range(len(pairs)))
        kwargs = {"input_ids": tb.input_ids, "attention_mask": tb.attention_mask}
        if self.images is not None:  # same tokens (cross-tokenizer VLM pairs are refused):
            sel = torch.as_tensor(at)  # only the compared rows, whose expansion is shared
            kwargs = self.images.forward_inputs(self.model, tb.input_ids[sel],
                                                tb.attention_mask[sel],
                                                [batch.rows[k] for k in at])
            at = list(range(len(at)))
        out = self.model.base_model(**{k: v.to(self.device) for k, v in kwargs.items()})
        h = out.last_hidden_state
        return [(e, h[a, q.to(h.device)]) for a, (_, e, q) in zip(at, pairs, strict=True)]


class CacheSignal(_Signal):
    """Cached final hidden states (``TeacherCache.get(id)``) through the cached teacher head;
    compared positions the cache lacks are left out."""

    kind = "cache"

    def __init__(self, cache, vocab_map: VocabMap | None = None):
        super().__init__(cache.head(), vocab_map)
        self.cache = cache

    def _states(self, batch, rows, pairs):
        out = []
        for k, entries, q in pairs:
            sid = rows[batch.rows[k]]["id"]
            if sid not in self.cache:
                continue
            states = self.cache.get(sid)
            where = {int(p): j for j, p in enumerate(states.positions.tolist())}
            hits = [i for i, p in enumerate(q.tolist()) if p in where]
            if hits:
                out.append((entries[hits],
                            states.hidden[[where[int(q[i])] for i in hits]]))
        return out


def open_cache_signal(uri: str, rows: list[dict], teacher_dir: str | None = None,
                      vocab_map: VocabMap | None = None) -> CacheSignal | None:
    """A :class:`CacheSignal` when a complete cache at ``uri`` holds the compared eval
    samples and (when ``teacher_dir`` is given) was built from that teacher's weights and
    tokenizer."""
    try:
        if not storage.exists(storage.join(uri, "manifest.json")):
            return None
        from kubedistill.teacher.reader import TeacherCache

        cache = TeacherCache(uri)
        if not cache.has_hidden:
            raise ValueError("it holds top-k log-probs only")
        if teacher_dir is not None:
            from kubedistill.teacher.key import tokenizer_hash, weights_hash

            key = cache.manifest.get("key", {})
            if (key.get("teacher_weights") != weights_hash(teacher_dir)
                    or key.get("tokenizer") != tokenizer_hash(teacher_dir)):
                raise ValueError("it was built from another teacher")
    except Exception as exc:  # no usable cache: the caller falls back to a live teacher
        log.info("teacher cache at %s not used (%s); using a live teacher", uri, exc)
        return None
    wanted = [r["id"] for r in rows if is_compared(r, vocab_map is not None)]
    present = sum(sid in cache for sid in wanted)
    if not wanted or present < len(wanted):
        log.info("teacher cache at %s holds %d of %d eval samples; using a live teacher",
                 uri, present, len(wanted))
        return None
    return CacheSignal(cache, vocab_map)
