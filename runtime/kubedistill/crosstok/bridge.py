"""Student token ids -> the teacher's tokenization of the same text (on-policy rollouts).

A rollout is sampled in the student's ids; a teacher with another tokenizer has to score the
same text in its own ids. :class:`TokenizerBridge` re-tokenizes a response span by span:

- ordinary tokens: their bytes (:class:`~kubedistill.crosstok.vocab.TokenTable`) decoded as
  UTF-8 (an incomplete trailing character, e.g. of a truncated response, becomes U+FFFD)
  and encoded by the teacher's tokenizer without added special tokens;
- special tokens (e.g. the student's stop token): the teacher id the vocabulary map pairs
  them with (same content, else same role: eos <-> eos, end-of-turn <-> end-of-turn), else
  their content encoded as text.

:meth:`TokenizerBridge.align` then pairs the positions of the two sequences of each rollout
(:func:`~kubedistill.crosstok.align.align_continuation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kubedistill.crosstok.align import align_rollouts
from kubedistill.crosstok.vocab import TokenTable, VocabMap, token_table


class TokenizerBridge:
    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any, vocab_map: VocabMap):
        self.student: TokenTable = token_table(student_tokenizer)
        self.teacher: TokenTable = token_table(teacher_tokenizer)
        self.teacher_tokenizer = teacher_tokenizer
        self.vocab_map = vocab_map
        self.special = {s: t for s, t in zip(vocab_map.student_ids.tolist(),
                                             vocab_map.teacher_ids.tolist(), strict=True)
                        if self.student.special[s]}

    def retokenize(self, student_ids: Sequence[int]) -> list[int]:
        """The teacher's ids for the text of ``student_ids`` (see the module docstring)."""
        out: list[int] = []
        text: list[int] = []
        for i in map(int, student_ids):
            if not self.student.special[i]:
                text.append(i)
                continue
            out += self._encode(text)
            text = []
            out += [self.special[i]] if i in self.special else self._encode([i])
        return out + self._encode(text)

    def _encode(self, ids: list[int]) -> list[int]:
        if not ids:
            return []
        text = self.student.text(ids).decode("utf-8", errors="replace")
        return list(self.teacher_tokenizer.encode(text, add_special_tokens=False))

    def align(self, student_prompt_lens: Sequence[int],
              student_responses: Sequence[Sequence[int]], teacher_prompt_lens: Sequence[int],
              teacher_responses: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per rollout, the ``[M, 2]`` (student_pos, teacher_pos) pairs of the prompt +
        response sequences (:func:`~kubedistill.crosstok.align.align_rollouts`)."""
        return align_rollouts(student_prompt_lens, student_responses, teacher_prompt_lens,
                              teacher_responses, self.student, self.teacher)
