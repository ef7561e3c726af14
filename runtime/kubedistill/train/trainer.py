"""The training loop. Read :meth:`Trainer.fit` first: it is the table of contents.

One optimizer step = one :class:`~kubedistill.train.data.StepPlan`: every rank builds its
micro-batches, the step's loss tokens are summed over ranks (the normaliser), each
micro-batch runs forward + backward (losses are sums / normaliser; the backward is scaled by
the world size because FSDP averages gradients over ranks, so the result is the global sum),
then the gradients are clipped and AdamW and the schedule step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kubedistill import storage
from kubedistill.algorithms import ALGORITHMS, build_algorithm
from kubedistill.config import Config
from kubedistill.errors import DataError
from kubedistill.models.loading import resolve_model_path
from kubedistill.tracking.base import NullTracker, Tracker
from kubedistill.train import data
from kubedistill.train.checkpoint import Checkpointer
from kubedistill.train.export import export_hf, write_summary
from kubedistill.train.fsdp import DistEnv, all_reduce_sum, build_mesh, mixed_precision, shard
from kubedistill.train.lora import base_causal_lm
from kubedistill.train.optim import build_optimizer, build_scheduler
from kubedistill.train.student import (
    DistillModule,
    broadcast_state,
    load_student,
    materialize,
    resolve_student,
)
from kubedistill.train.vision import image_batcher

log = logging.getLogger(__name__)


@dataclass
class Cursor:
    """Where training stands; saved in checkpoints (``step_in_epoch`` is the NEXT step)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    elapsed_s: float = 0.0


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, tracker: Tracker | None = None):
        cfg.validate(env.world_size)
        self.cfg, self.env, t = cfg, env, cfg.train
        self.tracker = tracker or NullTracker()
        _seed_everything(t.seed, t.full_determinism)
        self.local_dir = storage.local_dir_for(cfg.storage.work_dir)
        self.student_ref = resolve_student(cfg, env, self.local_dir)
        self.train_split = data.load_prepared(cfg.prepared_path, cfg.data.train_split)
        if self.train_split is None:
            raise DataError(f"no '{cfg.data.train_split}' split in {cfg.prepared_path}")
        self.eval_split = data.load_prepared(cfg.prepared_path, cfg.data.eval_split)
        teacher, head = _open_teacher(cfg)
        self.build_student(head)
        self.build_schedule(data.steps_per_epoch(len(self.train_split), t.train_batch_size))
        self.train_batches = data.BatchBuilder(self.train_split, pad_id=self.pad_id,
                                               packing=cfg.data.packing_samples, teacher=teacher,
                                               images=self.images)
        self.eval_batches = None if self.eval_split is None else data.BatchBuilder(
            self.eval_split, pad_id=self.pad_id, packing=cfg.data.packing_samples,
            teacher=teacher, images=self.images)
        self.cursor = Cursor()
        self.log_path = os.path.join(self.local_dir, "train", "train_log.jsonl")
        self.last: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.started = time.perf_counter()

    def build_student(self, head, wrap=lambda algorithm: algorithm):
        """Load the student, build the algorithm (``wrap`` may decorate it), shard both as
        one FSDP2 root, and build the optimizer; returns the algorithm."""
        cfg, env, t = self.cfg, self.env, self.cfg.train
        student, full_state = load_student(self.student_ref, cfg, env)
        algorithm = build_algorithm(cfg, head, student.config.get_text_config().hidden_size)
        head_weight = base_causal_lm(student).get_output_embeddings().weight
        algorithm.init_from_student(None if head_weight.is_meta else head_weight.detach())
        broadcast_state(algorithm, env)
        self.images = image_batcher(  # image-text students: pixels and their own positions
            base_causal_lm(student), resolve_model_path(self.student_ref,
                                                        cfg.storage.model_cache_dir),
            trust_remote_code=cfg.model.trust_remote_code)
        self.module = DistillModule(student, wrap(algorithm), idle_pixels=None if
                                    self.images is None else self.images.idle_pixels())
        shard(self.module, self.module.decoder_layers(), build_mesh(env, cfg.fsdp.fsdp_size),
              mixed_precision(env, t.bf16), cpu_offload=cfg.fsdp.cpu_offload)
        materialize(student, full_state, env)
        self.optimizer = build_optimizer(self.module, algorithm.param_groups(),
                                         lr=t.learning_rate, weight_decay=t.weight_decay,
                                         betas=t.adam_betas)
        self.pad_id = student.config.get_text_config().pad_token_id or 0
        return algorithm

    def build_schedule(self, steps_per_epoch: int) -> None:
        """Total steps (epochs, ``max_steps``), the lr schedule and the checkpointer."""
        t = self.cfg.train
        self.steps_per_epoch = steps_per_epoch
        total = steps_per_epoch * t.num_epochs
        self.total_steps = min(total, t.max_steps) if t.max_steps > 0 else total
        self.scheduler = build_scheduler(self.optimizer, kind=t.lr_scheduler,
                                         total_steps=self.total_steps,
                                         warmup_ratio=t.lr_warmup_ratio, lr=t.learning_rate,
                                         min_lr=t.min_lr)
        self.checkpointer = Checkpointer(t.ckpt_path, self.env)

    # ---- the table of contents -----------------------------------------------------------
    def fit(self) -> str:
        self.started = time.perf_counter()
        self.resume()
        self.tracker.log_params(self.run_params())
        progress = _progress(self.total_steps, self.cursor.global_step, self.env.is_main)
        while self.cursor.global_step < self.total_steps:
            plan = self.next_plan()
            metrics = self.train_step(plan)
            self.advance(plan, metrics)
            self.log(metrics, progress)
            if self.due(self.cfg.train.eval_steps):
                self.log(self.evaluate())
            if self.due(self.cfg.train.save_steps):
                self.save()
        progress.close()
        if self.cfg.train.eval_steps > 0 and not self.due(self.cfg.train.eval_steps):
            self.log(self.evaluate())
        export_hf(self.module.student, self.student_ref, self.cfg, self.env)
        self.finish()
        return self.cfg.train.save_path

    # ---- steps ---------------------------------------------------------------------------
    def next_plan(self) -> data.StepPlan:
        t, c = self.cfg.train, self.cursor
        order = data.epoch_order(len(self.train_split), t.seed, c.epoch)
        return data.plan_step(order, c.epoch, c.step_in_epoch, self.train_split.lengths,
                              self.env.world_size, batch_size=t.train_batch_size,
                              micro_bsz=t.micro_train_batch_size,
                              max_tokens=t.max_token_len_per_gpu if t.use_dynamic_bsz else 0,
                              packing=self.cfg.data.packing_samples)

    def train_step(self, plan: data.StepPlan) -> dict[str, float]:
        start = time.perf_counter()
        sums, counts = self.run_micro_batches(plan.micro[self.env.rank], backward=True)
        params = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = self.cfg.train.max_norm if self.cfg.train.max_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                          else grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if math.isfinite(grad_norm):  # the same on every rank: the norm is global
            self.optimizer.step()
        else:
            log.warning("step %d: gradient norm is %s; update skipped",
                        self.cursor.global_step + 1, grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        return {**{f"train/{k}": v for k, v in sums.items()}, **counts, "train/lr": lr,
                "train/grad_norm": grad_norm, "train/step_time_s": elapsed,
                "train/tokens_per_s": counts["train/tokens"] / max(elapsed, 1e-9)}

    def run_micro_batches(self, micro: list[tuple[list[int], float]], *, backward: bool,
                          builder: data.BatchBuilder | None = None, prefix: str = "train",
                          ) -> tuple[dict[str, float], dict[str, float]]:
        """Forward (+ backward) this rank's micro-batches; returns the loss parts summed
        over micro-batches and ranks, and the global sample / token / loss-token counts."""
        builder = builder or self.train_batches
        real = [i for idx, w in micro if w for i in idx]
        samples, tokens, loss_tokens = all_reduce_sum(  # the normaliser, before any forward
            [len(real), int(builder.split.lengths[real].sum()),
             int(builder.loss_tokens[real].sum())], self.env)
        sums: dict[str, torch.Tensor] = {}
        for idx, weight in micro:  # built one at a time: teacher states can be large
            batch = builder.build(idx).to(self.env.device)
            parts = self.module(batch, max(loss_tokens, 1.0), weight)
            if backward:
                (parts["loss"] * self.env.world_size).backward()
            for k, v in parts.items():
                v = v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
        keys = sorted(sums)
        totals = all_reduce_sum([float(sums[k]) for k in keys], self.env)
        return dict(zip(keys, totals, strict=True)), {
            f"{prefix}/samples": samples, f"{prefix}/tokens": tokens,
            f"{prefix}/loss_tokens": loss_tokens}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss parts on the whole eval split, normalised by its loss tokens."""
        if self.eval_split is None:
            return {}
        t = self.cfg.train
        micro = data.split_over_ranks(
            list(range(len(self.eval_split))), self.eval_split.lengths, self.env.world_size,
            micro_bsz=t.micro_train_batch_size,
            max_tokens=t.max_token_len_per_gpu if t.use_dynamic_bsz else 0,
            packing=self.cfg.data.packing_samples)
        self.module.eval()
        try:
            sums, counts = self.run_micro_batches(micro[self.env.rank], backward=False,
                                                  builder=self.eval_batches, prefix="eval")
        finally:
            self.module.reshard()  # the root keeps its parameters gathered after forward
            self.module.train()
        self.last_eval = {**{f"eval/{k}": v for k, v in sums.items()}, **counts}
        return self.last_eval

    def advance(self, plan: data.StepPlan, metrics: dict[str, float]) -> None:
        self.count_step(metrics)
        c = self.cursor
        c.step_in_epoch = plan.step_in_epoch + 1
        if c.step_in_epoch >= self.steps_per_epoch:
            c.epoch, c.step_in_epoch = plan.epoch + 1, 0

    def count_step(self, metrics: dict[str, float]) -> None:
        """Add one finished optimizer step's counts to the cursor."""
        c = self.cursor
        c.global_step += 1
        c.samples += int(metrics["train/samples"])
        c.tokens += int(metrics["train/tokens"])
        c.loss_tokens += int(metrics["train/loss_tokens"])
        c.elapsed_s += metrics["train/step_time_s"]
        self.last = metrics

    def due(self, every: int) -> bool:
        return every > 0 and self.cursor.global_step % every == 0

    # ---- state ---------------------------------------------------------------------------
    def resume(self) -> None:
        if not self.cfg.train.resume:
            return
        cursor = self.checkpointer.load(self.module, self.optimizer, self.scheduler,
                                        keep_key=self.module.checkpoint_filter)
        if cursor is None:
            log.info("resume: no checkpoint under %s; starting from the beginning",
                     self.cfg.train.ckpt_path)
        else:
            self.restore(cursor)

    def restore(self, cursor: dict) -> None:
        """Adopt the cursor of a loaded checkpoint (subclasses restore their own state)."""
        self.cursor = Cursor(**cursor)

    def save(self) -> None:
        self.checkpointer.save(self.cursor.global_step, self.module, self.optimizer,
                               self.scheduler, asdict(self.cursor),
                               keep_key=self.module.checkpoint_filter)

    # ---- reporting -----------------------------------------------------------------------
    def run_params(self) -> dict[str, float]:
        t = self.cfg.train
        return {"world_size": self.env.world_size, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "train_samples": len(self.train_split),
                "grad_accum": max(1, t.train_batch_size
                                  // (t.micro_train_batch_size * self.env.world_size))}

    def log(self, metrics: dict[str, float], progress=None) -> None:
        step = self.cursor.global_step
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}")
        every = self.cfg.logging.logging_steps
        is_eval = not any(k.startswith("train/") for k in metrics)
        due = is_eval or every <= 0 or step % every == 0 or step == self.total_steps
        if not (metrics and self.env.is_main and due):
            return
        self.tracker.log_metrics(metrics, step=step)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def finish(self) -> None:
        c = self.cursor
        summary = {"steps": c.global_step, "epochs": c.epoch, "samples": c.samples,
                   "tokens": c.tokens, "loss_tokens": c.loss_tokens,
                   "train_time_s": round(c.elapsed_s, 3),  # optimizer steps, all attempts
                   "wall_time_s": round(time.perf_counter() - self.started, 3),  # this attempt
                   "world_size": self.env.world_size,
                   "final_train": self.last, "final_eval": self.last_eval,
                   "save_path": self.cfg.train.save_path}
        if not self.env.is_main:
            return
        if os.path.exists(self.log_path):
            self.tracker.log_artifact(self.log_path, "train")
            if not storage.is_local(self.cfg.storage.work_dir):
                storage.write_bytes_atomic(
                    storage.join(self.cfg.storage.work_dir, "train", "train_log.jsonl"),
                    Path(self.log_path).read_bytes())
        write_summary(self.cfg.train.save_path, summary)


def _seed_everything(seed: int, full_determinism: bool = False) -> None:
    """Seed python, numpy and torch; ``full_determinism`` (KDFlow's flag) also makes torch
    use deterministic kernels only (``transformers.enable_full_determinism``: cuDNN
    deterministic, no benchmark, ``CUBLAS_WORKSPACE_CONFIG``), as KDFlow does."""
    if full_determinism:
        from transformers import enable_full_determinism

        enable_full_determinism(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _open_teacher(cfg: Config):
    """(TeacherCache, TeacherHead) for algorithms that use the teacher, else (None, None)."""
    if not ALGORITHMS.lookup(cfg.kd.kd_algorithm).needs_teacher or cfg.kd.kd_ratio <= 0:
        return None, None
    from kubedistill.teacher.key import expected_cache_key
    from kubedistill.teacher.reader import TeacherCache

    cache = TeacherCache(cfg.teacher_cache_path, verify=cfg.cache.cache_verify)
    cache.check_key(expected_cache_key(cfg))
    return cache, cache.head()  # head None for a top-k cache


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train",
                dynamic_ncols=True)
