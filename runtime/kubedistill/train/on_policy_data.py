"""On-policy data: prompts from the prepared train split, rollouts -> training samples.

Prompts: ``input_ids[:prompt_len]`` of each prepared train row (and, for the teacher,
``teacher_input_ids[:teacher_prompt_len]`` where the row has them, e.g. with
``teacher_input_key`` or for self-distillation; else the student's prompt). A prompt longer
than ``prompt_max_len`` (or empty) is NOT cut: it is left out, counted and logged with its id.

A rollout becomes a training sample ``prompt + response`` whose loss mask is 1 exactly on
the response (the sampled tokens: a ``"stop"`` response ends with the sampled stop token, a
``"length"`` one has no stop token). The positions predicting them are
``prompt_len - 1 ... prompt_len + len(response) - 2``; the teacher is run on
``teacher_prompt + response`` at ``teacher_prompt_len - 1 ...`` (the same targets), and its
states are keyed by the student positions, so :class:`kubedistill.train.data.BatchBuilder`
joins and checks them as it does for the off-policy cache. A teacher with another tokenizer
scores the re-tokenized response; its states keep the teacher's positions and the sample
carries the alignment pairs, as a cross-tokenizer prepared split does (:class:`TeacherRequest`).

Images (image-text data): each prompt carries its row's stored image bytes (the prepared
``images`` column, None for a text row). Both prompts already hold the expanded image tokens
(the student's processor for ``input_ids``, the teacher's for ``teacher_input_ids``), so the
same bytes go to the rollout (``Sample.images``), to the teacher (``TeacherRequest.images``,
``final_states(..., images)``) and to the training split (``PreparedSplit.images``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kubedistill.crosstok.bridge import TokenizerBridge
from kubedistill.errors import DataError
from kubedistill.rollout.engine import Sample
from kubedistill.train.data import PreparedSplit

log = logging.getLogger(__name__)


@dataclass
class PromptSet:
    ids: list[str]
    prompts: list[list[int]]
    teacher_prompts: list[list[int]]
    skipped: list[str]  # ids of prompts over prompt_max_len (or empty), left out
    images: list[list[bytes] | None] | None = None  # per prompt its stored images; None: text

    def images_of(self, indexes: list[int]) -> list[list[bytes] | None] | None:
        """The stored images of the prompts at ``indexes`` (None for a text split)."""
        return None if self.images is None else [self.images[i] for i in indexes]

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(prepared_path: str, split: str, prompt_max_len: int,
                 teacher_ids_required: bool = False) -> PromptSet:
    """The split's prompts; ``teacher_ids_required`` (a teacher with another tokenizer):
    a row without its teacher tokenization is a DataError naming the row."""
    from kubedistill.data.prepared import load_split

    table = load_split(prepared_path, split)
    if table is None or table.num_rows == 0:
        raise DataError(f"no '{split}' split in {prepared_path}")
    cols = {c: table.column(c).to_pylist() for c in
            ("id", "input_ids", "prompt_len", "teacher_input_ids", "teacher_prompt_len")}
    stored = table.column("images").to_pylist() if "images" in table.column_names \
        else [None] * table.num_rows
    out = PromptSet([], [], [], [], [])
    for i, sid in enumerate(cols["id"]):
        plen = cols["prompt_len"][i] or 0
        prompt = list(cols["input_ids"][i][:plen])
        t_ids, t_plen = cols["teacher_input_ids"][i], cols["teacher_prompt_len"][i]
        if teacher_ids_required and (t_ids is None or not t_plen):
            raise DataError(f"{prepared_path}/{split} row {i} (id {sid!r}): no "
                            "teacher_input_ids/teacher_prompt_len, but the teacher has another "
                            "tokenizer; rerun prepare with this teacher")
        teacher = list(t_ids[:t_plen]) if t_ids is not None and t_plen else prompt
        if not prompt or len(prompt) > prompt_max_len:
            out.skipped.append(str(sid))
            continue
        out.ids.append(str(sid))
        out.prompts.append(prompt)
        out.teacher_prompts.append(teacher)
        out.images.append(list(stored[i]) if stored[i] else None)
    if not any(out.images):
        out.images = None
    if out.skipped:
        log.warning("%d prompt(s) longer than prompt_max_len %d (or empty) left out: %s%s",
                    len(out.skipped), prompt_max_len, ", ".join(out.skipped[:10]),
                    " ..." if len(out.skipped) > 10 else "")
    if not out.ids:
        raise DataError(f"{prepared_path}/{split}: no prompt within prompt_max_len "
                        f"{prompt_max_len}")
    return out


def sample_arrays(sample: Sample) -> tuple[list[int], list[int]]:
    """``(tokens, loss_mask)`` of one rollout: mask 1 exactly on the sampled response."""
    tokens = list(sample.prompt_ids) + list(sample.response_ids)
    return tokens, [0] * len(sample.prompt_ids) + [1] * len(sample.response_ids)


@dataclass
class TeacherRequest:
    """What the teacher scores for one rollout.

    ``tokens``: teacher prompt + response in the teacher's ids (image tokens expanded by the
    teacher's processor); ``images``: the prompt's stored images; ``positions``: the teacher
    positions whose final states are needed (those predicting the response tokens);
    ``keys``: the positions the states are filed under for
    :class:`~kubedistill.train.data.BatchBuilder` -- the student's positions for the same
    tokenizer (one state per student target), the teacher's own positions for a
    cross-tokenizer teacher, joined through ``pairs`` ([M, 2] student/teacher positions).
    """

    tokens: list[int]
    positions: list[int]
    keys: list[int]
    pairs: np.ndarray | None = None
    images: list[bytes] | None = None


def teacher_requests(samples: list[Sample], teacher_prompts: list[list[int]],
                     bridge: TokenizerBridge | None = None) -> list[TeacherRequest]:
    """The teacher's view of each rollout (``teacher_prompts[i]`` is sample ``i``'s teacher
    prompt). With a ``bridge`` (a teacher with another tokenizer) the responses are
    re-tokenized and the batch is aligned
    (:class:`~kubedistill.crosstok.bridge.TokenizerBridge`)."""
    responses = [list(s.response_ids) if bridge is None else bridge.retokenize(s.response_ids)
                 for s in samples]
    pairs: list = [None] * len(samples)
    if bridge is not None:
        pairs = bridge.align([len(s.prompt_ids) for s in samples],
                             [s.response_ids for s in samples],
                             [len(q) for q in teacher_prompts], responses)
    out = []
    for s, prompt, response, pair in zip(samples, teacher_prompts, responses, pairs,
                                         strict=True):
        q, m = len(prompt), len(response)
        positions = list(range(q - 1, q - 1 + m))
        p = len(s.prompt_ids)
        keys = positions if bridge is not None else list(range(p - 1, p - 1 + m))
        out.append(TeacherRequest(list(prompt) + response, positions, keys, pair, s.images))
    return out


@dataclass
class RolloutStates:
    positions: torch.Tensor
    hidden: torch.Tensor


class RolloutTeacher:
    """``get(sample_id) -> RolloutStates``: the live teacher's states of one iteration."""

    def __init__(self, states: dict[str, RolloutStates]):
        self.states = states

    def get(self, sample_id: str) -> RolloutStates:
        return self.states[sample_id]


def rollout_split(sample_ids: list[str], samples: list[Sample],
                  requests: list[TeacherRequest] | None = None) -> PreparedSplit:
    """The iteration's training samples (with the cross-tokenizer pairs of ``requests``, and
    the samples' images when any has one)."""
    tokens, masks, offsets = [], [], [0]
    for s in samples:
        t, m = sample_arrays(s)
        tokens += t
        masks += m
        offsets.append(offsets[-1] + len(t))
    pairs = teacher_tokens = None
    if requests is not None and any(r.pairs is not None for r in requests):
        pairs = [r.pairs for r in requests]
        teacher_tokens = [np.asarray(r.tokens, dtype=np.int64) for r in requests]
    images = [s.images for s in samples] if any(s.images for s in samples) else None
    return PreparedSplit(list(sample_ids), np.asarray(tokens, dtype=np.int64),
                         np.asarray(masks, dtype=np.int8), np.asarray(offsets, dtype=np.int64),
                         pairs, teacher_tokens, images)


def rollout_teacher(sample_ids: list[str], requests: list[TeacherRequest],
                    hidden: list[torch.Tensor]) -> RolloutTeacher:
    return RolloutTeacher({sid: RolloutStates(torch.tensor(r.keys, dtype=torch.long), h)
                           for sid, r, h in zip(sample_ids, requests, hidden, strict=True)})
