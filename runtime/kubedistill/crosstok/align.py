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
on-policy rollouts :func:`align_rollouts` aligns a batch of sampled responses.
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


def align_continuation(student_prompt_len: int, student_response: Sequence[int],
                       teacher_prompt_len: int, teacher_response: Sequence[int],
                       student: TokenTable, teacher: TokenTable) -> np.ndarray:
    """Pairs for a sampled continuation (on-policy): both prompts END at the same point of
    the conversation (the start of the response, right after each chat template's
    assistant header) and the two responses tokenize the same text.

    With ``P = student_prompt_len``, ``Q = teacher_prompt_len``, ``n`` / ``m`` the response
    lengths, the ``[M, 2]`` (student_pos, teacher_pos) pairs over the full sequences are
    ``(P - 1, Q - 1)`` (both predict the first response token) and ``(P + i, Q + j)`` for
    response tokens ``i < n - 1`` and ``j < m - 1`` that end at the same offset of the
    response text (:func:`align_pairs` on the responses alone, so the prompts' different
    texts cost nothing). Only positions that predict a response token appear.
    """
    n, m = len(student_response), len(teacher_response)
    if not (student_prompt_len and teacher_prompt_len and n and m):
        return np.zeros((0, 2), dtype=np.int64)
    inner = align_pairs(student_response, teacher_response, student, teacher)
    inner = inner[(inner[:, 0] < n - 1) & (inner[:, 1] < m - 1)]
    first = np.array([[student_prompt_len - 1, teacher_prompt_len - 1]], dtype=np.int64)
    return np.concatenate([first, inner + first + 1]).astype(np.int64)


def align_rollouts(student_prompt_lens: Sequence[int], student_responses: Sequence[Sequence[int]],
                   teacher_prompt_lens: Sequence[int],
                   teacher_responses: Sequence[Sequence[int]], student: TokenTable,
                   teacher: TokenTable) -> list[np.ndarray]:
    """:func:`align_continuation` for each rollout of a batch."""
    return [align_continuation(p, s, q, t, student, teacher) for p, s, q, t in
            zip(student_prompt_lens, student_responses, teacher_prompt_lens, teacher_responses,
                strict=True)]


def flatten_pairs(pairs: np.ndarray) -> list[int]:
    """``[M, 2]`` -> ``[s0, t0, s1, t1, ...]`` (the ``ct_align`` column)."""
    return [int(v) for v in np.asarray(pairs, dtype=np.int64).reshape(-1)]


def unflatten_pairs(flat) -> np.ndarray:
    return np.asarray(flat if flat is not None else [], dtype=np.int64).reshape(-1, 2)
