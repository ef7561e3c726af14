"""Token-level scores on reference responses: cross-entropy, KL(teacher || student), top-1.

Contract (docs/contracts.md): token ``i`` is a target iff ``loss_mask[i] == 1`` and is predicted
at position ``i - 1``. Only the hidden states at those positions go through the output layer,
so memory is ``targets x vocab`` rather than ``tokens x vocab``. Per target token::

    CE  = -log softmax(z_s)[y]
    KL  = sum_v p_t(v) (log p_t(v) - log p_s(v))       p = softmax(z)   (float32)
    top1 = [argmax z_t == argmax z_s]

KL and top-1 are per-token means over the compared positions (``eval_kl_tokens`` of them).
Same tokenizer: every target whose row the teacher scored, full vocabulary; when the two
vocabularies differ in size (padded embeddings) the first ``min(V_s, V_t)`` entries are
compared. Cross-tokenizer (``student_cols`` given): the compared positions are the aligned
pairs (:mod:`kubedistill.evaluate.teacher_signal`), ``z_s = z_s[student_ids]`` and
``z_t = z_t[teacher_ids]`` of the vocabulary map, so both softmaxes renormalise over the K
shared ids and top-1 compares indices into the map.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kubedistill.teacher.head import TeacherHead

CHUNK = 512  # target rows per output-layer chunk


@dataclass
class Batch:
    """Right-padded rows: ``input_ids``/``attention_mask`` [B, T]; ``rows`` index the split."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor  # [B, T] int8, the contract's mask (target tokens)
    rows: list[int]

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, position) of each prediction ``i - 1`` of a target ``i``, row-major."""
        target = self.loss_mask.bool() & self.attention_mask.bool()
        target[:, 0] = False
        b, i = target.nonzero(as_tuple=True)
        return b, i - 1


def make_batches(input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]],
                 max_tokens: int, pad_id: int = 0) -> Iterator[Batch]:
    """Rows sorted by length (longest first) and grouped so ``rows x max_len <= max_tokens``
    (a single longer row still gets its own batch)."""
    order = sorted(range(len(input_ids)), key=lambda r: -len(input_ids[r]))
    group: list[int] = []
    for r in order + [None]:
        if r is not None and (not group or len(input_ids[group[0]]) * (len(group) + 1)
                              <= max_tokens):
            group.append(r)
            continue
        if group:
            yield pad_rows([input_ids[g] for g in group], [loss_masks[g] for g in group],
                           group, pad_id)
        group = [r] if r is not None else []


def pad_rows(input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]],
             rows: list[int], pad_id: int = 0) -> Batch:
    """The sequences right-padded to the longest, in the given order, as one :class:`Batch`."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.int8)
    for k, (seq, m) in enumerate(zip(input_ids, loss_masks, strict=True)):
        n = len(seq)
        ids[k, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        attn[k, :n] = 1
        mask[k, :n] = torch.as_tensor(list(m), dtype=torch.int8)
    return Batch(ids, attn, mask, list(rows))


def target_hidden(model: torch.nn.Module, batch: Batch, device: torch.device | str,
                  images=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final post-norm hidden states at prediction positions [N, d], their targets [N] and
    batch-row index [N] (all on ``device``). ``images``
    (:class:`~kubedistill.evaluate.vision.EvalImages`, image-text models) adds the rows'
    pixels and the model's own positions to the forward."""
    ids = batch.input_ids.to(device)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if images is not None:
        kwargs = images.forward_inputs(model, batch.input_ids, batch.attention_mask, batch.rows)
    out = model.base_model(**{k: v.to(device) for k, v in kwargs.items()})
    b, pos = batch.target_positions()
    b, pos = b.to(device), pos.to(device)
    return out.last_hidden_state[b, pos], ids[b, pos + 1], b


@dataclass
class TokenStats:
    """Sums over target tokens; ``means()`` gives per-token values."""

    tokens: int = 0
    ce_sum: float = 0.0
    kl_sum: float = 0.0
    agree: int = 0
    kl_tokens: int = 0
    per_row_ce: dict[int, float] = field(default_factory=dict)

    def add(self, head: TeacherHead, hidden: torch.Tensor, targets: torch.Tensor,
            rows: torch.Tensor, teacher_logits: torch.Tensor | None = None,
            keep: torch.Tensor | None = None, student_cols: torch.Tensor | None = None) -> None:
        """Accumulate CE for student ``hidden`` [N, d] (through ``head``) and, if given, KL and
        top-1 against ``teacher_logits`` [M, V_t], whose rows are the entries of ``hidden``
        selected by the bool mask ``keep`` [N] (all when None). With ``student_cols`` [K] the
        student logits are restricted to those columns (``teacher_logits`` is then [M, K],
        restricted alike by the caller) before both softmaxes."""
        if teacher_logits is not None and keep is None:
            keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        offset = 0
        for start in range(0, hidden.shape[0], CHUNK):
            sl = slice(start, start + CHUNK)
            logits = head.logits(hidden[sl])
            ce = F.cross_entropy(logits, targets[sl], reduction="none")
            self.ce_sum += float(ce.sum())
            self.tokens += ce.numel()
            for r, v in zip(rows[sl].tolist(), ce.tolist(), strict=True):
                self.per_row_ce[r] = self.per_row_ce.get(r, 0.0) + v
            if teacher_logits is None:
                continue
            k = keep[sl]
            n = int(k.sum())
            if n == 0:
                continue
            t = teacher_logits[offset:offset + n].to(logits.device, torch.float32)
            offset += n
            s = logits[k]
            if student_cols is not None:
                s = s.index_select(-1, student_cols.to(s.device))
            v = min(t.shape[-1], s.shape[-1])
            s_logp = F.log_softmax(s[:, :v], dim=-1)
            t_logp = F.log_softmax(t[:, :v], dim=-1)
            self.kl_sum += float((t_logp.exp() * (t_logp - s_logp)).sum())
            self.agree += int((t_logp.argmax(-1) == s_logp.argmax(-1)).sum())
            self.kl_tokens += n

    def means(self) -> dict[str, float]:
        out = {"eval_tokens": float(self.tokens)}
        if self.tokens:
            out["eval_ce"] = self.ce_sum / self.tokens
        if self.kl_tokens:
            out["eval_kl"] = self.kl_sum / self.kl_tokens
            out["eval_top1_agreement"] = self.agree / self.kl_tokens
            out["eval_kl_tokens"] = float(self.kl_tokens)
        return out


def token_ce(model: torch.nn.Module, batches: Iterator[Batch], device: str,
             images=None) -> tuple[float, int]:
    """Mean CE of ``model`` over all target tokens of ``batches`` and the token count
    (``images`` as for :func:`target_hidden`)."""
    head = TeacherHead.from_model(model)
    stats = TokenStats()
    with torch.inference_mode():
        for batch in batches:
            hidden, targets, rows = target_hidden(model, batch, device, images)
            stats.add(head, hidden, targets, rows)
    return (stats.ce_sum / stats.tokens if stats.tokens else float("nan")), stats.tokens
