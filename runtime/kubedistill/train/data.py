"""Training data: prepared samples joined with cached teacher states, planned into steps.

The step plan is the contract the loss normalisation rests on:

- Epoch ``e`` orders the N samples by a permutation seeded with ``(seed, e)``. Step ``k`` of
  the epoch holds ``order[k*G:(k+1)*G]`` with ``G = train_batch_size``; the last step of an
  epoch holds the remainder, never dropped. What a step holds does not depend on the world
  size, packing or dynamic batching, so those settings all give the same loss curve.
- A step's samples are spread over ranks (round robin for fixed micro-batches, greedy token
  balancing for ``use_dynamic_bsz``), then cut into micro-batches (``micro_train_batch_size``
  samples, or token budgets of ``max_token_len_per_gpu``: padded tokens, or packed tokens
  with ``packing_samples``).
- Every rank runs the same number of micro-batches: a rank with fewer gets zero-weight
  padding micro-batches (a real sample whose loss is multiplied by 0), so that FSDP's
  collectives line up and no rank waits forever.

A packed micro-batch is one row: samples back to back, ``position_ids`` restarting at 0 for
each, ``attention_mask=None`` (transformers then isolates the samples: block-diagonal mask
for sdpa/eager, varlen for flash-attention 2) -- provided the body runs with
``use_cache=False``: with a KV cache transformers does not look for packed rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from kubedistill.algorithms.base import MicroBatch
from kubedistill.errors import ArtifactMismatch, ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedSplit:
    """One split of the prepared dataset, flattened: sample ``i`` is
    ``tokens[offsets[i]:offsets[i+1]]`` (and the same slice of ``loss_mask``)."""

    ids: list[str]
    tokens: np.ndarray  # [total] int64
    loss_mask: np.ndarray  # [total] int8
    offsets: np.ndarray  # [N + 1] int64
    # cross-tokenizer: per sample [M, 2] (student_pos, teacher_pos) pairs (``ct_align``)
    ct_align: list[np.ndarray] | None = None
    teacher_tokens: list[np.ndarray] | None = None  # cross-tokenizer: the teacher's tokens
    # image-text data: per sample the stored image bytes (``images`` column; None: no images)
    images: list[list[bytes] | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def loss_tokens(self) -> np.ndarray:
        """Targets per sample (positions ``i >= 1`` with ``loss_mask[i] == 1``)."""
        masked = self.loss_mask.astype(np.int64).copy()
        masked[self.offsets[:-1][self.lengths > 0]] = 0
        cums = np.concatenate([[0], np.cumsum(masked)])
        return cums[self.offsets[1:]] - cums[self.offsets[:-1]]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.loss_mask[lo:hi]


def load_prepared(prepared_path: str, split: str) -> PreparedSplit | None:
    """The ``split`` of the prepared dataset, or None when the split is absent or empty."""
    import pyarrow as pa

    from kubedistill.data.prepared import load_split

    columns = ["id", "input_ids", "loss_mask"]
    try:  # the alignment (cross-tokenizer) and image columns, where the data has them
        table = load_split(prepared_path, split, columns=[*columns, "ct_align", "images"])
    except pa.ArrowInvalid:
        table = load_split(prepared_path, split, columns=columns)
    if table is None or table.num_rows == 0:
        return None
    ct_align = teacher_tokens = None
    if "ct_align" in table.column_names and table.column("ct_align").null_count < table.num_rows:
        from kubedistill.crosstok.align import unflatten_pairs

        ct_align = [unflatten_pairs(x) for x in table.column("ct_align").to_pylist()]
        teacher_tokens = [np.asarray(x if x is not None else [], dtype=np.int64) for x in
                          load_split(prepared_path, split, columns=["teacher_input_ids"])
                          .column("teacher_input_ids").to_pylist()]
    images = _images(table)
    ids = [str(x) for x in table.column("id").to_pylist()]
    if len(set(ids)) != len(ids):
        raise DataError(f"{prepared_path}/{split}: sample ids are not unique")
    tokens = table.column("input_ids").combine_chunks()
    mask = table.column("loss_mask").combine_chunks()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    if not np.array_equal(offsets, mask.offsets.to_numpy()):
        raise DataError(f"{prepared_path}/{split}: input_ids and loss_mask lengths differ")
    base = offsets[0]
    return PreparedSplit(ids, tokens.values.to_numpy()[base:offsets[-1]].astype(np.int64),
                         mask.values.to_numpy()[base:offsets[-1]].astype(np.int8),
                         offsets - base, ct_align, teacher_tokens, images)


def _images(table) -> list[list[bytes] | None] | None:
    """The ``images`` column (per sample the stored bytes, None for a text row), or None
    when no row of the split has an image."""
    if "images" not in table.column_names:
        return None
    column = table.column("images")
    if column.null_count == len(column):
        return None
    images = [x or None for x in column.to_pylist()]
    return images if any(images) else None


# ---- planning --------------------------------------------------------------------------
@dataclass
class StepPlan:
    """What every rank runs in one optimizer step; ``micro[rank]`` lists (samples, weight)."""

    epoch: int
    step_in_epoch: int
    samples: list[int]
    micro: list[list[tuple[list[int], float]]] = field(default_factory=list)

    @property
    def num_micro(self) -> int:
        return len(self.micro[0]) if self.micro else 0


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded shuffle of epoch ``epoch`` (identical on every rank)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=gen).numpy()


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def split_over_ranks(samples: list[int], lengths: np.ndarray, world: int, *, micro_bsz: int,
                     max_tokens: int = 0, packing: bool = False,
                     ) -> list[list[tuple[list[int], float]]]:
    """Rank -> micro-batches (sample indexes, weight 1.0), padded to equal counts (weight 0).

    ``max_tokens > 0`` selects dynamic batching: ranks get balanced token totals and
    micro-batches fill a budget of ``max_tokens`` (padded tokens ``rows x longest``, or the
    sum of lengths when packing); a sample longer than the budget goes alone.
    """
    if max_tokens > 0:
        loads = [0] * world
        per_rank: list[list[int]] = [[] for _ in range(world)]
        for i in sorted(samples, key=lambda s: (-int(lengths[s]), s)):
            r = loads.index(min(loads))
            per_rank[r].append(i)
            loads[r] += int(lengths[i])
        micro = [_fill_budget(rank_samples, lengths, max_tokens, packing)
                 for rank_samples in per_rank]
    else:
        per_rank = [samples[r::world] for r in range(world)]
        micro = [[s[j:j + micro_bsz] for j in range(0, len(s), micro_bsz)] for s in per_rank]
    count = max(1, max(len(m) for m in micro))
    pad = [samples[0]] if samples else []
    return [[(m, 1.0) for m in rank] + [(pad, 0.0)] * (count - len(rank)) for rank in micro]


def _fill_budget(samples: list[int], lengths: np.ndarray, budget: int,
                 packing: bool) -> list[list[int]]:
    out: list[list[int]] = []
    cost = 0
    for i in samples:  # longest first, so a padded row costs rows x its first length
        n = int(lengths[i])
        if out:
            grown = cost + n if packing else (len(out[-1]) + 1) * int(lengths[out[-1][0]])
            if grown <= budget:
                out[-1].append(i)
                cost = grown
                continue
        out.append([i])
        cost = n
    return out


def plan_step(order: np.ndarray, epoch: int, step_in_epoch: int, lengths: np.ndarray,
              world: int, *, batch_size: int, micro_bsz: int, max_tokens: int = 0,
              packing: bool = False) -> StepPlan:
    samples = [int(x) for x in order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]]
    return StepPlan(epoch, step_in_epoch, samples,
                    split_over_ranks(samples, lengths, world, micro_bsz=micro_bsz,
                                     max_tokens=max_tokens, packing=packing))


# ---- micro-batches -----------------------------------------------------------------------
class BatchBuilder:
    """Builds :class:`MicroBatch` es from sample indexes, joining teacher states by id.

    ``teacher`` is a ``TeacherCache`` (or anything with ``.get(sample_id)`` returning an
    object with ``positions`` [n] and ``hidden`` [n, d] and/or ``topk_ids`` /
    ``topk_logprobs`` [n, k]); its rows must be the positions that predict a target, in
    order, one per target (checked; the error names the sample). A top-k-only cache fills
    ``teacher_topk_*`` and leaves ``teacher_hidden`` None (packing and dynamic batches are
    the same concatenation of rows); cross-tokenizer joins need hidden states.

    Image-text students: ``images`` is a :class:`kubedistill.train.vision.ImageBatcher`; it
    adds each micro-batch's pixels (each image once) and the model's own positions. A split
    with images needs one, and refuses packing.

    Cross-tokenizer splits (``split.ct_align``): the teacher rows are the teacher-side
    target positions, joined through the alignment instead: ``teacher_hidden`` holds every
    cached row, and ``extras`` get ``ct_student_index`` / ``ct_teacher_index`` [M] (aligned
    rows of ``loss_index`` and of ``teacher_hidden``), ``ct_student_sample`` [N] and
    ``ct_teacher_sample`` [N_t] (the sample of each row, 0..B-1) and, when the split has the
    teacher's tokens, ``ct_teacher_input_ids`` / ``ct_teacher_target_ids`` [N_t] (the teacher
    token at each teacher row's position and the next one, its target).
    """

    def __init__(self, split: PreparedSplit, *, pad_id: int, packing: bool, teacher=None,
                 images=None):
        if split.images is not None and images is None:
            raise ConfigError("the prepared data holds images but the student is not an "
                              "image-text model (its config.json has no vision_config)")
        if split.images is not None and packing:
            raise ConfigError("packing_samples is not supported with images (each image-text "
                              "sample needs its own M-RoPE positions and pixels); set "
                              "packing_samples false (use_dynamic_bsz works with images)")
        self.split = split
        self.images = images
        self.loss_tokens = split.loss_tokens  # [N] targets per sample
        self.pad_id = pad_id
        self.packing = packing
        self.teacher = teacher

    def build(self, indices: list[int]) -> MicroBatch:
        seqs = [self.split.sample(i) for i in indices]
        if self.packing:
            rows, width = 1, sum(len(t) for t, _ in seqs)
        else:
            rows, width = len(seqs), max(len(t) for t, _ in seqs)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((rows, width), dtype=torch.long)
        attention = None if self.packing else torch.zeros((rows, width), dtype=torch.long)
        loss_index, targets, start = [], [], 0
        for row, (tokens, mask) in enumerate(seqs):
            n = len(tokens)
            r, c = (0, start) if self.packing else (row, 0)
            input_ids[r, c:c + n] = torch.from_numpy(tokens)
            position_ids[r, c:c + n] = torch.arange(n)
            if attention is not None:
                attention[r, :n] = 1
            pos = np.nonzero(mask[1:])[0]  # position p predicts token p + 1
            loss_index.append(torch.from_numpy(r * width + c + pos))
            targets.append(torch.from_numpy(tokens[pos + 1]))
            start += n
        batch = MicroBatch(input_ids=input_ids, position_ids=position_ids,
                           attention_mask=attention, loss_index=torch.cat(loss_index).long(),
                           target_ids=torch.cat(targets).long(),
                           sample_ids=[self.split.ids[i] for i in indices])
        if self.images is not None:
            self.images.fill(batch, [self.split.images[i] if self.split.images else None
                                     for i in indices])
        if self.teacher is not None and self.split.ct_align is not None:
            self._join_aligned(batch, indices, [np.nonzero(m[1:])[0] for _, m in seqs])
        elif self.teacher is not None:
            self._join_teacher(batch, [np.nonzero(m[1:])[0] for _, m in seqs])
        return batch

    def _join_aligned(self, batch: MicroBatch, indices: list[int],
                      positions: list[np.ndarray]) -> None:
        hidden, s_index, t_index, s_sample, t_sample, t_in = [], [], [], [], [], []
        s_base = t_base = 0
        for b, (sid, i, pos) in enumerate(zip(batch.sample_ids, indices, positions,
                                              strict=True)):
            states = self.teacher.get(sid)
            if states.hidden is None:
                raise ConfigError("cross-tokenizer data needs teacher hidden states; this "
                                  "teacher cache holds only top-k (teacher_signal topk): "
                                  "rebuild it with teacher_signal hidden")
            t_pos = states.positions.cpu().numpy() if hasattr(states.positions, "cpu") \
                else np.asarray(states.positions)
            t_pos = t_pos.astype(np.int64)
            pairs = self.split.ct_align[i]
            s_row = np.searchsorted(pos, pairs[:, 0])
            t_row = np.searchsorted(t_pos, pairs[:, 1])
            if len(pairs) and (s_row.max() >= len(pos) or t_row.max() >= len(t_pos)
                               or not np.array_equal(pos[s_row], pairs[:, 0])
                               or not np.array_equal(t_pos[t_row], pairs[:, 1])):
                raise ArtifactMismatch(f"teacher cache sample {sid!r}: the cross-tokenizer "
                                       "alignment names positions that are not loss positions "
                                       "of the prepared data / the cache (stale cache?)")
            hidden.append(states.hidden)
            s_index.append(torch.from_numpy(s_row + s_base))
            t_index.append(torch.from_numpy(t_row + t_base))
            s_sample.append(torch.full((len(pos),), b, dtype=torch.long))
            t_sample.append(torch.full((len(t_pos),), b, dtype=torch.long))
            if self.split.teacher_tokens is not None:
                t_in.append(_token_pairs(self.split.teacher_tokens[i], t_pos, sid))
            s_base += len(pos)
            t_base += len(t_pos)
        batch.teacher_hidden = torch.cat(hidden)
        batch.extras.update(ct_student_index=torch.cat(s_index).long(),
                            ct_teacher_index=torch.cat(t_index).long(),
                            ct_student_sample=torch.cat(s_sample),
                            ct_teacher_sample=torch.cat(t_sample))
        if t_in:
            pairs = torch.cat(t_in)
            batch.extras.update(ct_teacher_input_ids=pairs[:, 0].contiguous(),
                                ct_teacher_target_ids=pairs[:, 1].contiguous())

    def _join_teacher(self, batch: MicroBatch, positions: list[np.ndarray]) -> None:
        hidden, topk_lp, topk_ids = [], [], []
        for sid, pos in zip(batch.sample_ids, positions, strict=True):
            states = self.teacher.get(sid)
            got = states.positions.cpu().numpy() if hasattr(states.positions, "cpu") \
                else np.asarray(states.positions)
            if len(got) != len(pos):
                raise ArtifactMismatch(
                    f"teacher cache sample {sid!r}: {len(got)} cached positions for "
                    f"{len(pos)} student loss positions (same-tokenizer KD needs one per target)")
            if not np.array_equal(got.astype(np.int64), pos):
                raise ArtifactMismatch(f"teacher cache sample {sid!r}: cached positions differ "
                                       "from the prepared loss mask (stale cache?)")
            hidden.append(states.hidden)
            if getattr(states, "topk_logprobs", None) is not None:
                topk_lp.append(states.topk_logprobs)
                topk_ids.append(states.topk_ids)
        if all(h is not None for h in hidden):
            batch.teacher_hidden = torch.cat(hidden)
        if topk_lp and len(topk_lp) == len(hidden):
            batch.teacher_topk_logprobs = torch.cat(topk_lp)
            batch.teacher_topk_ids = torch.cat(topk_ids)


def _token_pairs(tokens: np.ndarray, positions: np.ndarray, sid: str) -> torch.Tensor:
    """[n, 2] (token at p, token at p + 1) for teacher positions p."""
    if len(positions) and positions.max() + 1 >= len(tokens):
        raise ArtifactMismatch(f"teacher cache sample {sid!r}: a teacher position is past the "
                               "prepared teacher tokens (stale cache?)")
    t = torch.from_numpy(tokens)
    p = torch.from_numpy(positions)
    return torch.stack([t[p], t[p + 1]], dim=1).long()
