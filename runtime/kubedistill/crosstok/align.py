"""Aligning the student's and the teacher's tokenizations of the same text.

Each token stands for a byte string (:class:`~kubedistill.crosstok.vocab.TokenTable`); a
sequence's text is their concatenation and token ``i`` ENDS at byte offset ``end[i]`` (the
cumulative length). Student position ``p`` and teacher position ``q`` are aligned when their
tokens end at the same offset of the same text, so the prefixes ``ids[:p+1]`` and
``t_ids[:q+1]`` cover the same text and both positions predict the same continuation.

When the two texts differ (e.g. chat templates with different default system prompts), the
offsets are related through the matching blocks of :class:`difflib.SequenceMatcher` over
the two byte strings: student offset ``a`` inside a block ``(i, j, n)`` (``i < a <= i+n``)
corresponds to teacher offset ``j + a - i``. Only the bytes of such blocks can be aligned.
Offsets inside a multi-byte UTF-8 character are never aligned (prefixes are whole text).

With masks, only positions that predict a target are kept: ``p`` with ``mask[p+1] == 1``
(the prepared ``loss_mask`` convention) and likewise ``q`` with ``teacher_mask[q+1] == 1``.
The result is an int array ``[M, 2]`` of ``(student_pos, teacher_pos)``, both ascending.
``prepare`` stores it flattened (``s0, t0, s1, t1, ...``) as the ``ct_align`` column; for
on-policy rollouts :func:`align_batch` aligns a batch of token-id sequences.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from kubedistill.crosstok.vocab import TokenTable


def token_ends(ids: Sequence[int], table: TokenTable) -> np.ndarray:
    """Byte offset at which each token of ``ids`` ends in the decoded text."""
    return np.cumsum(table.lengths(list(map(int, ids))))


def _target_positions(n: int, mask) -> np.ndarray:
    if mask is None:
        return np.arange(n, dtype=np.int64)
    m = np.asarray(mask)
    return np.nonzero(m[1:])[0].astype(np.int64)


def align_pairs(student_ids: Sequence[int], teacher_ids: Sequence[int], student: TokenTable,
                teacher: TokenTable, student_mask=None, teacher_mask=None) -> np.ndarray:
    """``[M, 2]`` int64 (student_pos, teacher_pos) pairs whose tokens end at the same text
    offset (see the module docstring)."""
    s_ids, t_ids = list(map(int, student_ids)), list(map(int, teacher_ids))
    s_end, t_end = token_ends(s_ids, student), token_ends(t_ids, teacher)
    s_pos = _target_positions(len(s_ids), student_mask)
    t_pos = _target_positions(len(t_ids), teacher_mask)
    s_pos = s_pos[s_end[s_pos] > 0] if len(s_pos) else s_pos
    if not len(s_pos) or not len(t_pos):
        return np.zeros((0, 2), dtype=np.int64)
    s_text, t_text = student.text(s_ids), teacher.text(t_ids)
    s_pos = s_pos[_char_boundary(s_text, s_end[s_pos])]
    if not len(s_pos):
        return np.zeros((0, 2), dtype=np.int64)
    if s_text == t_text:
        mapped = s_end[s_pos]
        keep = np.ones(len(s_pos), dtype=bool)
    else:
        mapped = np.full(len(s_pos), -1, dtype=np.int64)
        ends = s_end[s_pos]
        matcher = difflib.SequenceMatcher(None, s_text, t_text, autojunk=False)
        for i, j, n in matcher.get_matching_blocks():
            if n == 0:
                continue
            inside = (ends > i) & (ends <= i + n)
            mapped[inside] = ends[inside] - i + j
        keep = mapped >= 0
    # teacher target position with that end offset (ends are non-decreasing; zero-length
    # tokens share an offset: take the last one, whose prefix is the longest)
    t_ends = t_end[t_pos]
    k = np.searchsorted(t_ends, mapped, side="right") - 1
    ok = keep & (k >= 0)
    ok[ok] = t_ends[k[ok]] == mapped[ok]
    pairs = np.stack([s_pos[ok], t_pos[k[ok]]], axis=1).astype(np.int64)
    if len(pairs) > 1:  # one teacher position per student position and vice versa
        first = np.concatenate([[True], pairs[1:, 1] != pairs[:-1, 1]])
        pairs = pairs[first]
    return pairs


def _char_boundary(text: bytes, ends: np.ndarray) -> np.ndarray:
    """True where offset ``end`` falls between two UTF-8 characters (the next byte is not a
    continuation byte), so the prefix decodes to whole characters."""
    data = np.frombuffer(text + b"\0", dtype=np.uint8)
    return (data[ends] & 0xC0) != 0x80


def align_batch(student_ids, teacher_ids, student: TokenTable, teacher: TokenTable,
                student_mask=None, teacher_mask=None, student_pad: int | None = None,
                teacher_pad: int | None = None) -> list[np.ndarray]:
    """:func:`align_pairs` for each row of a batch (lists of id lists, or [B, T] tensors /
    arrays; trailing ``*_pad`` ids are stripped, as are masks' padded tails)."""
    out = []
    for b in range(len(student_ids)):
        s, t = _row(student_ids[b], student_pad), _row(teacher_ids[b], teacher_pad)
        sm = None if student_mask is None else _row(student_mask[b], None)[:len(s)]
        tm = None if teacher_mask is None else _row(teacher_mask[b], None)[:len(t)]
        out.append(align_pairs(s, t, student, teacher, sm, tm))
    return out


def _row(x, pad: int | None) -> list[int]:
    row = x.tolist() if hasattr(x, "tolist") else list(x)
    if pad is not None:
        while row and row[-1] == pad:
            row.pop()
    return [int(v) for v in row]


def flatten_pairs(pairs: np.ndarray) -> list[int]:
    """``[M, 2]`` -> ``[s0, t0, s1, t1, ...]`` (the ``ct_align`` column)."""
    return [int(v) for v in np.asarray(pairs, dtype=np.int64).reshape(-1)]


def unflatten_pairs(flat) -> np.ndarray:
    return np.asarray(flat if flat is not None else [], dtype=np.int64).reshape(-1, 2)
