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
joins and checks them as it does for the off-policy cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

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

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(prepared_path: str, split: str, prompt_max_len: int) -> PromptSet:
    from kubedistill.data.prepared import load_split

    table = load_split(prepared_path, split)
    if table is None or table.num_rows == 0:
        raise DataError(f"no '{split}' split in {prepared_path}")
    cols = {c: table.column(c).to_pylist() for c in
            ("id", "input_ids", "prompt_len", "teacher_input_ids", "teacher_prompt_len")}
    out = PromptSet([], [], [], [])
    for i, sid in enumerate(cols["id"]):
        plen = cols["prompt_len"][i] or 0
        prompt = list(cols["input_ids"][i][:plen])
        t_ids, t_plen = cols["teacher_input_ids"][i], cols["teacher_prompt_len"][i]
        teacher = list(t_ids[:t_plen]) if t_ids is not None and t_plen else prompt
        if not prompt or len(prompt) > prompt_max_len:
            out.skipped.append(str(sid))
            continue
        out.ids.append(str(sid))
        out.prompts.append(prompt)
        out.teacher_prompts.append(teacher)
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


def teacher_request(sample: Sample, teacher_prompt: list[int]) -> tuple[list[int], list[int]]:
    """``(teacher tokens, positions)``: the hidden states that predict the response."""
    n, tp = len(sample.response_ids), len(teacher_prompt)
    return list(teacher_prompt) + list(sample.response_ids), list(range(tp - 1, tp - 1 + n))


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


def rollout_split(sample_ids: list[str], samples: list[Sample]) -> PreparedSplit:
    tokens, masks, offsets = [], [], [0]
    for s in samples:
        t, m = sample_arrays(s)
        tokens += t
        masks += m
        offsets.append(offsets[-1] + len(t))
    return PreparedSplit(list(sample_ids), np.asarray(tokens, dtype=np.int64),
                         np.asarray(masks, dtype=np.int8), np.asarray(offsets, dtype=np.int64))


def rollout_teacher(sample_ids: list[str], samples: list[Sample],
                    hidden: list[torch.Tensor]) -> RolloutTeacher:
    states = {}
    for sid, s, h in zip(sample_ids, samples, hidden, strict=True):
        p = len(s.prompt_ids)
        states[sid] = RolloutStates(torch.arange(p - 1, p - 1 + len(s.response_ids)), h)
    return RolloutTeacher(states)
