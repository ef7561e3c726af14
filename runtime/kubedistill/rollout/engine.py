"""The ``RolloutEngine`` protocol: the student generating from prompts, on-policy.

    engine.generate(prompts, n_samples_per_prompt=..., max_new_tokens=..., temperature=...,
                    top_p=..., seed=..., images=None) -> list[Sample]

``prompts[i]`` is a list of token ids; the result holds ``n`` samples per prompt, prompt-major
(prompt 0's samples first). ``images[i]`` (image-text students) is prompt ``i``'s stored image
bytes in placeholder order (the prepared ``images`` column; None for a text prompt), whose
image tokens ``prompts[i]`` already holds expanded by the student's processor; each sample
keeps them (``Sample.images``) so the teacher and the trainer see the same pixels. A :class:`Sample` carries the SAMPLED token ids (never decoded and
re-encoded), one sampling log-prob per response token (the log-probability under the
distribution the token was drawn from: after temperature and top-p), and a finish reason:

- ``"stop"``: a stop token (EOS / end of turn) was sampled; it is the LAST response token;
- ``"length"``: ``max_new_tokens`` tokens were sampled and none of them is a stop token.

``load_weights(named_tensors, flush_cache)`` takes ``(name, tensor)`` pairs with the student's
HF names (a bucket at a time, ``flush_cache`` on the last one, see
:mod:`kubedistill.rollout.sync`). ``sleep()`` / ``wake()`` release and resume the engine's
accelerator memory under the state machine of :class:`~kubedistill.lifecycle.EngineLifecycle`
(no-ops where there is nothing to release).

Backends: ``hf`` (:mod:`kubedistill.rollout.hf`, transformers ``generate``, any device) and
``sglang`` (:mod:`kubedistill.rollout.sglang`, in-process ``sglang.Engine``, GPU); several
engines behind one (:mod:`kubedistill.rollout.pool`). The choice is made in
:mod:`kubedistill.rollout.factory`; this module imports no backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

FINISH_REASONS = ("stop", "length")


@dataclass
class Sample:
    """One rollout: ``prompt_ids`` + ``response_ids`` (sampled), see the module docstring."""

    prompt_index: int  # index into the ``prompts`` argument of ``generate``
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] = field(default_factory=list)  # one per response token
    images: list[bytes] | None = None  # the prompt's stored images (image-text prompts)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], *, n_samples_per_prompt: int,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 images: Sequence[Sequence[bytes] | None] | None = None) -> list[Sample]:
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     flush_cache: bool = True) -> None:
        ...

    def sleep(self) -> None:
        ...

    def wake(self) -> None:
        ...

    def close(self) -> None:
        ...


def cut_before(sample: Sample, input_only: set[int]) -> bool:
    """Cut ``sample``'s response before its first ``input_only`` token (an image token or
    marker, which has no pixels behind it in a response); a cut response is a truncation
    (``"length"``). Returns whether it was cut. For engines that cannot suppress them."""
    for i, t in enumerate(sample.response_ids):
        if t in input_only:
            sample.response_ids, sample.logprobs = sample.response_ids[:i], sample.logprobs[:i]
            sample.finish_reason = "length"
            return True
    return False


def finish(tokens: Sequence[int], stop_ids: set[int], max_new_tokens: int,
           ) -> tuple[list[int], str]:
    """Cut a generated continuation after its first stop token.

    -> ``(response_ids, "stop")`` ending with that stop token, or ``(tokens, "length")``
    when none was sampled (the response is then exactly ``max_new_tokens`` long, or shorter
    only if the engine stopped for a reason of its own, which is still a truncation).
    """
    tokens = [int(t) for t in tokens[:max_new_tokens]]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i + 1], "stop"
    return tokens, "length"
