"""The teacher signal a KD loss reads from a micro-batch: hidden states or top-k.

``train_signal(config, teacher_head)`` returns one of

- :class:`HiddenSignal` (``teacher_signal`` ``hidden`` or ``both``): teacher logits are
  rebuilt chunk by chunk from ``batch.teacher_hidden`` with the teacher's head; the loss is
  ``LOSSES[kd_loss_fn]``;
- :class:`TopKSignal` (``teacher_signal: topk``): ``batch.teacher_topk_ids`` /
  ``teacher_topk_logprobs`` [N, k] (from the cache: an off-policy signal); the loss is
  ``kubedistill.losses.topk.topk_loss(kd_loss_fn, kd_topk_mode)``; no teacher head.

Both give ``loss(name)`` (the per-token loss function), ``available(batch, head)`` and
``inputs(batch, head)`` (the teacher keyword arguments of :func:`kubedistill.losses.fused_kd_loss`), so an algorithm has no
branch on the signal. :func:`check_topk_config` names the settings a top-k signal cannot
serve (ConfigError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubedistill.algorithms.base import MicroBatch
from kubedistill.errors import ConfigError
from kubedistill.losses import get_loss
from kubedistill.losses.topk import TOPK_LOSSES, TopK, topk_loss

TOPK_ALGORITHMS = ("vanilla_kd",)


class HiddenSignal:
    def loss(self, name: str):
        return get_loss(name)

    def available(self, batch: MicroBatch, head: Any) -> bool:
        return batch.teacher_hidden is not None and head is not None

    def inputs(self, batch: MicroBatch, head: Any) -> dict:
        if not self.available(batch, head):
            raise ValueError("the hidden teacher signal needs batch.teacher_hidden and a "
                             "teacher head")
        return {"teacher_hidden": batch.teacher_hidden, "teacher_head": head}


@dataclass
class TopKSignal:
    mode: str

    def loss(self, name: str):
        return topk_loss(name, self.mode)

    def available(self, batch: MicroBatch, head: Any = None) -> bool:
        return batch.teacher_topk_ids is not None

    def inputs(self, batch: MicroBatch, head: Any = None) -> dict:
        if not self.available(batch):
            raise ValueError("the top-k teacher signal needs batch.teacher_topk_ids / "
                             "teacher_topk_logprobs (a cache built with teacher_signal: topk)")
        return {"teacher_topk": TopK(batch.teacher_topk_ids, batch.teacher_topk_logprobs)}


def check_topk_config(config) -> None:
    """ConfigError naming the keys when ``teacher_signal: topk`` cannot train this run."""
    kd = config.kd
    if config.rollout.rollout_num_engines > 0:
        raise ConfigError("teacher_signal topk is a cached (off-policy) signal; on-policy "
                          "training (rollout_num_engines > 0) scores rollouts with a live "
                          "teacher: use teacher_signal hidden")
    if kd.kd_algorithm not in TOPK_ALGORITHMS:
        raise ConfigError(f"teacher_signal topk: kd_algorithm '{kd.kd_algorithm}' needs teacher "
                          f"hidden states (cross-tokenizer / projector algorithms); use "
                          f"kd_algorithm {', '.join(TOPK_ALGORITHMS)} or teacher_signal hidden")
    if kd.kd_loss_fn not in TOPK_LOSSES:
        raise ConfigError(f"teacher_signal topk: kd_loss_fn '{kd.kd_loss_fn}' is not defined "
                          f"on top-k buckets; use one of {', '.join(TOPK_LOSSES)}")
    if kd.kd_topk_mode == "tail" and kd.kd_temperature != 1.0:
        raise ConfigError(f"teacher_signal topk with kd_topk_mode tail needs kd_temperature 1 "
                          f"(got {kd.kd_temperature}): the teacher's tail mass at T != 1 is not "
                          f"stored; set kd_topk_mode renorm to distil at a temperature")


def train_signal(config) -> HiddenSignal | TopKSignal:
    if config.cache.teacher_signal == "topk":
        check_topk_config(config)
        return TopKSignal(config.kd.kd_topk_mode)
    return HiddenSignal()
