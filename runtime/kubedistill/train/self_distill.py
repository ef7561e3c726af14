"""The on-policy self-distillation teacher theta_T: its updates, engine, head and checkpoints.

Self-distillation is on with ``self_distillation: true`` or, as in KDFlow, when
``teacher_name_or_path`` names the same model as ``student_name_or_path``
(:func:`resolve_self_distillation`, which says so in one info line).

theta_T starts as the student's weights and lives in an HF module on rank 0, which the
teacher engine serves (an SGLang engine serves its own copy and gets theta_T pushed). After
iteration ``k`` (1-based) it is updated from the student's full state theta_S:

- ``use_ema_teacher``: every iteration, ``theta_T <- a theta_T + (1 - a) theta_S`` with
  ``a = teacher_ema_decay``;
- otherwise a copy ``theta_T <- theta_S`` when ``k % teacher_update_freq == 0``.

The training algorithm's teacher head (on every rank) follows theta_T's lm_head by
broadcast from rank 0. Checkpoints: ``{ckpt_path}/teacher_step_{step:08d}.safetensors``
written BEFORE the step's checkpoint commits (its ``latest.json`` comes last), and removed
when that step's checkpoint is pruned.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from kubedistill import storage
from kubedistill.errors import KubedistillError
from kubedistill.rollout.sync import buckets, ema_update
from kubedistill.sglang_engine import SGLangEngine, with_flush_flags
from kubedistill.train.fsdp import DistEnv

PREFIX = "teacher_step_"
log = logging.getLogger(__name__)


def same_model(a: str | None, b: str | None) -> bool:
    """The same reference, or two local paths to the same directory."""
    if not a or not b:
        return False
    if a == b:
        return True
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def resolve_self_distillation(cfg) -> bool:
    """Turn ``kd.self_distillation`` on when the teacher path equals the student path
    (KDFlow's switch), with one info line; returns whether self-distillation is on."""
    m, kd = cfg.model, cfg.kd
    if not kd.self_distillation and same_model(m.student_name_or_path,
                                               m.teacher_name_or_path):
        kd.self_distillation = True
        log.info("teacher_name_or_path is the student (%s): self-distillation, as in KDFlow "
                 "(the teacher starts as the student and follows it every "
                 "teacher_update_freq=%d iterations%s)", m.teacher_name_or_path,
                 kd.teacher_update_freq, ", by EMA" if kd.use_ema_teacher else "")
    return bool(kd.self_distillation)


class SelfDistillTeacher:
    """``model`` is theta_T on rank 0 (None elsewhere); ``head`` the algorithm's teacher head
    on every rank; ``engine`` the teacher engine serving theta_T (rank 0)."""

    def __init__(self, kd, env: DistEnv, ckpt_path: str, head, model=None, engine=None):
        self.kd, self.env, self.ckpt_path = kd, env, ckpt_path
        self.head, self.model, self.engine = head, model, engine

    def due(self, iterations_done: int) -> bool:
        return bool(self.kd.use_ema_teacher) or \
            iterations_done % max(1, self.kd.teacher_update_freq) == 0

    def update(self, student_state: dict[str, torch.Tensor]) -> None:
        """Apply the update rule (all ranks call; the caller checks :meth:`due`)."""
        if self.env.is_main:
            decay = self.kd.teacher_ema_decay if self.kd.use_ema_teacher else 0.0
            ema_update(self.model, student_state, decay)  # decay 0: a copy
            self.push()
        self.broadcast_head()

    def push(self) -> None:
        """An SGLang teacher engine serves its own copy: push theta_T to it, awake (the push
        comes while the teacher sleeps between iterations; pushing into released memory is
        an illegal memory access in the scheduler), back to sleep after."""
        if not isinstance(self.engine, SGLangEngine):
            return  # the hf engine serves ``self.model`` itself
        with self.engine.awake():
            state = self.model.state_dict()
            for bucket, last in with_flush_flags(buckets(state, dtype=self.engine.compute_dtype)):
                self.engine.load_weights(bucket, flush_cache=last)

    def broadcast_head(self) -> None:
        """Every rank's algorithm head <- rank 0's theta_T lm_head."""
        if self.env.is_main:
            self.head.weight.copy_(self.model.get_output_embeddings().weight.detach())
        if self.env.world_size > 1:
            dist.broadcast(self.head.weight, src=0)

    # ---- checkpoints ---------------------------------------------------------------------
    def file(self, step: int) -> str:
        return storage.join(self.ckpt_path, f"{PREFIX}{step:08d}.safetensors")

    def save(self, step: int) -> None:
        if self.env.is_main:
            from safetensors.torch import save

            state = {k: v.detach().cpu().clone()  # one name per tied tensor
                     for k, v in self.model.named_parameters()}
            storage.write_bytes_atomic(self.file(step), save(state))

    def prune(self) -> None:
        """Drop theta_T files whose step checkpoint is gone."""
        if not self.env.is_main:
            return
        fs, root = storage.filesystem(self.ckpt_path)
        for path in fs.ls(root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            step = name[len(PREFIX):-len(".safetensors")]
            if name.startswith(PREFIX) and not fs.exists(f"{root.rstrip('/')}/step_{step}"):
                fs.rm(path)

    def restore(self, step: int) -> None:
        if self.env.is_main:
            from safetensors.torch import load

            state = load(storage.read_bytes(self.file(step)))
            bad = self.model.load_state_dict(state, strict=False).unexpected_keys
            if bad:
                raise KubedistillError(f"teacher checkpoint has unknown weights {bad[:5]}")
            self.push()
        self.broadcast_head()
