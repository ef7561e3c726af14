"""On-policy distillation: the student samples, a live teacher scores, the student learns.

Selected by ``rollout_num_engines > 0`` (KDFlow's switch; the on-policy recipe sets 1); with
more than one engine the prompts are split across them (:mod:`kubedistill.rollout.pool`).
Read :meth:`OnPolicyTrainer.fit`: it is the table of contents. One ITERATION:

1. rollout (rank 0): ``rollout_batch_size`` prompts of a seeded per-epoch shuffle of the
   prepared train split x ``n_samples_per_prompt`` samples from the rollout engine
   (``hf`` / ``sglang``, :mod:`kubedistill.rollout`), seeded by (seed, iteration);
2. teacher (rank 0): the live ``TeacherEngine`` on ``teacher prompt + response`` -> final
   hidden states at the positions predicting the response tokens, one forward call per
   ``teacher_forward_n_batches`` global batches of samples (KDFlow's grouping); everything
   is broadcast.
   A teacher with another tokenizer (the prepared data has a vocabulary map; ``simple_ctkd``
   or ``dskd``) gets the response re-tokenized, and the samples carry the alignment of the
   two tokenizations (:class:`~kubedistill.crosstok.bridge.TokenizerBridge`);
3. train: the iteration's samples, ``train_batch_size`` at a time, are optimizer steps of the
   off-policy trainer (:class:`~kubedistill.train.trainer.Trainer.train_step`: the same FSDP2
   module, algorithm, global loss-token normalisation, clipping, AdamW, schedule);
4. sync: the full student state is gathered from FSDP2 and pushed to the rollout engine in
   buckets (:mod:`kubedistill.rollout.sync`); with self-distillation the teacher is updated.

Images (image-text prompts, the prepared ``images`` column): the rollout samples with the
prompt's pixels, each sample keeps the prompt's stored images, the live teacher scores with
them, and the training split carries them (``PreparedSplit.images``), so the student trains
with the same pixels; a self-distillation teacher (a copy of the student) sees them too.
What is refused (cross-tokenizer pairs, a text model on image prompts) is in
:mod:`kubedistill.train.on_policy_config`.

Self-distillation (``kd.self_distillation: true``, or as in KDFlow a ``teacher_name_or_path``
equal to ``student_name_or_path``): the teacher is a copy
of the student's own weights (rank 0) that sees the TEACHER prompt (prepared
``teacher_input_ids[:teacher_prompt_len]``, e.g. from ``teacher_input_key``) + the same
response. It is replaced by the student every ``teacher_update_freq`` iterations, or with
``use_ema_teacher`` updated every iteration as ``theta_T <- a theta_T + (1 - a) theta_S``
(``a = teacher_ema_decay``). Its lm_head, which the algorithm uses, follows on every rank.

Colocation (``enable_sleep`` on CUDA): the student's optimizer state moves to CPU while the
engines run; SGLang engines release their memory while the student trains. Engines follow
the state machine of :mod:`kubedistill.lifecycle` (wake only when asleep, sleep only when
awake), and are closed together with SIGQUIT ignored (``close_all``).

Counting: ``save_steps`` and ``logging_steps`` count optimizer steps, as off-policy; a
checkpoint is written at the end of the iteration in which a multiple of ``save_steps`` was
reached (a checkpoint is always between iterations). ``max_steps`` caps optimizer steps.
Teacher updates count iterations. In-loop evaluation (``eval_steps``) is not run: the
per-iteration diagnostics are its on-policy counterpart, and the evaluate stage follows.

Per iteration the tracker gets ``time/{rollout,teacher,train,sync}_s``,
``rollout/{response_len,truncation_rate,samples,prompts}``, ``onpolicy/kl`` (mean per-token
KL(teacher || student) on the fresh samples, before the update; cross-tokenizer: on the
aligned tokens over the shared sub-vocabulary) and ``onpolicy/top1_agree``;
with ``print_rollout_sample`` the first sample of each rollout goes to ``{work_dir}/train/rollout_samples.jsonl``
(a table artifact).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.errors import ConfigError
from kubedistill.lifecycle import close_all
from kubedistill.rollout.engine import Sample
from kubedistill.rollout.factory import check_colocated_settings, make_rollout_engine
from kubedistill.rollout.sync import gather_student, push
from kubedistill.teacher.head import TeacherHead
from kubedistill.tracking.base import NullTracker, Tracker
from kubedistill.train import data
from kubedistill.train.colocate import Colocation
from kubedistill.train.diagnostics import WithDiagnostics
from kubedistill.train.export import export_hf
from kubedistill.train.fsdp import DistEnv
from kubedistill.train.on_policy_config import (  # noqa: F401 (is_on_policy: re-exported)
    check_config,
    check_images,
    cross_tokenizer_map,
    is_on_policy,
)
from kubedistill.train.on_policy_data import (
    load_prompts,
    rollout_split,
    rollout_teacher,
    teacher_requests,
)
from kubedistill.train.self_distill import SelfDistillTeacher, resolve_self_distillation
from kubedistill.train.student import resolve_student
from kubedistill.train.trainer import Trainer, _progress, _seed_everything

log = logging.getLogger(__name__)


@dataclass
class OnPolicyCursor:
    """Where on-policy training stands (saved in checkpoints); ``step_in_epoch`` is the
    NEXT iteration of the epoch, ``iteration`` the number of iterations done."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    iteration: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    elapsed_s: float = 0.0
    teacher_updates: int = 0


class OnPolicyTrainer(Trainer):
    """Reuses :class:`Trainer`'s step, logging, checkpoint and export machinery."""

    def __init__(self, cfg: Config, env: DistEnv, tracker: Tracker | None = None):
        cfg.validate(env.world_size)
        self.cfg, self.env, t, r = cfg, env, cfg.train, cfg.rollout
        if cfg.model.lora_rank > 0:
            raise ConfigError("on-policy training with LoRA is not supported yet (the rollout "
                              "engine needs merged weights); set lora_rank 0")
        check_config(cfg)
        self.self_distill = resolve_self_distillation(cfg)
        self.tracker = tracker or NullTracker()
        _seed_everything(t.seed, t.full_determinism)
        self.local_dir = storage.local_dir_for(cfg.storage.work_dir)
        self.student_ref = resolve_student(cfg, env, self.local_dir)
        self.vocab_map = cross_tokenizer_map(cfg)
        self.prompts = load_prompts(cfg.prepared_path, cfg.data.train_split,
                                    cfg.data.prompt_max_len, self.vocab_map is not None)
        self.train_split = self.eval_split = self.eval_batches = None
        self.train_batches: data.BatchBuilder | None = None
        if not self.self_distill and not cfg.model.teacher_name_or_path:
            raise ConfigError("on-policy KD needs teacher_name_or_path (or "
                              "kd.self_distillation: true)")
        self.teacher_ref = self.student_ref if self.self_distill else \
            cfg.model.teacher_name_or_path
        from kubedistill.models.loading import resolve_model_path

        self.teacher_path = resolve_model_path(self.teacher_ref, cfg.storage.model_cache_dir)
        check_images(self.prompts.images is not None, self.vocab_map is not None,
                     self._path(self.student_ref), self.teacher_path)
        self.bridge = None  # rank 0, with the engines
        head = TeacherHead.from_pretrained(self.teacher_path, cfg.model.trust_remote_code)
        self.build_student(head, lambda inner: WithDiagnostics(inner, t.chunked_loss_size,
                                                               self.vocab_map))
        self.self_teacher = SelfDistillTeacher(cfg.kd, env, t.ckpt_path,
                                               self.module.algorithm.inner.teacher_head) \
            if self.self_distill else None
        self.iters_per_epoch = data.steps_per_epoch(len(self.prompts), r.rollout_batch_size)
        self.build_schedule(sum(self.steps_in_iteration(k)
                                for k in range(self.iters_per_epoch)))
        self.cursor = OnPolicyCursor()
        self.log_path = os.path.join(self.local_dir, "train", "train_log.jsonl")
        self.samples_path = os.path.join(self.local_dir, "train", "rollout_samples.jsonl")
        self.last: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.started = time.perf_counter()
        self.colocation = Colocation(t.enable_sleep, env.device)
        self.rollout_engine = self.teacher_engine = None
        if env.is_main:
            self._open_engines()

    # ---- engines (rank 0) --------------------------------------------------------------------
    def _open_engines(self) -> None:
        from kubedistill.teacher.engine import make_engine, resolve_device

        cfg, device = self.cfg, resolve_device(self.cfg)
        student_path = self._path(self.student_ref)
        check_colocated_settings(cfg, student_path, self.teacher_path)
        self.rollout_engine = make_rollout_engine(cfg, student_path, device)
        if self.self_distill:  # theta_T lives in an HF module; the engine serves it
            from kubedistill.models import load_causal_lm

            model = load_causal_lm(student_path, dtype=torch.float32, device=device,
                                   attn_implementation=cfg.model.attn_implementation,
                                   trust_remote_code=cfg.model.trust_remote_code)
            self.teacher_engine = make_engine(cfg, student_path, model=model)
            self.self_teacher.model, self.self_teacher.engine = model, self.teacher_engine
        else:
            self.teacher_engine = make_engine(cfg, self.teacher_path)
        if self.vocab_map is not None:
            from kubedistill.crosstok.bridge import TokenizerBridge
            from kubedistill.models.loading import load_tokenizer

            trust = cfg.model.trust_remote_code
            self.bridge = TokenizerBridge(
                load_tokenizer(student_path, trust_remote_code=trust),
                load_tokenizer(self.teacher_path, trust_remote_code=trust), self.vocab_map)

    def _path(self, ref: str) -> str:
        from kubedistill.models.loading import resolve_model_path

        return resolve_model_path(ref, self.cfg.storage.model_cache_dir)

    def steps_in_iteration(self, k: int) -> int:
        r, n = self.cfg.rollout, len(self.prompts)
        prompts = min(r.rollout_batch_size, n - k * r.rollout_batch_size)
        return data.steps_per_epoch(prompts * r.n_samples_per_prompt,
                                    self.cfg.train.train_batch_size)

    # ---- the table of contents ---------------------------------------------------------------
    def fit(self) -> str:
        self.started = time.perf_counter()
        self.resume()
        self.tracker.log_params(self.run_params())
        progress = _progress(self.total_steps, self.cursor.global_step, self.env.is_main)
        try:
            self.sync()  # the engine starts from the (resumed) student
            while self.cursor.global_step < self.total_steps:
                before = self.cursor.global_step
                times: dict[str, float] = {}
                split, teacher, stats = self.rollout(times)
                self.train_iteration(split, teacher, stats, progress, times)
                self.sync(times)
                self.end_iteration(stats, times)
                every = self.cfg.train.save_steps
                if every > 0 and self.cursor.global_step // every > before // every:
                    self.save()
        finally:
            progress.close()
            self.close_engines()  # SGLang engines hold GPU memory and subprocesses
        export_hf(self.module.student, self.student_ref, self.cfg, self.env)
        if self.env.is_main and os.path.exists(self.samples_path):
            self.tracker.log_artifact(self.samples_path, "train")
        self.finish()
        return self.cfg.train.save_path

    # ---- phases ------------------------------------------------------------------------------
    def iteration_prompts(self) -> list[int]:
        t, r, c = self.cfg.train, self.cfg.rollout, self.cursor
        order = data.epoch_order(len(self.prompts), t.seed, c.epoch)
        k = c.step_in_epoch
        return [int(i) for i in order[k * r.rollout_batch_size:(k + 1) * r.rollout_batch_size]]

    def rollout(self, times: dict[str, float]):
        """Rank 0 samples and scores; every rank gets the split, teacher states, stats."""
        r, c = self.cfg.rollout, self.cursor
        chosen = self.iteration_prompts()
        payload = None
        if self.env.is_main:
            start = time.perf_counter()
            samples = self.rollout_engine.generate(
                [self.prompts.prompts[i] for i in chosen],
                n_samples_per_prompt=r.n_samples_per_prompt, max_new_tokens=r.generate_max_len,
                temperature=r.temperature, top_p=r.top_p,
                seed=self.cfg.train.seed * 1_000_003 + c.iteration,
                images=self.prompts.images_of(chosen))
            times["rollout"] = time.perf_counter() - start
            start = time.perf_counter()
            self.colocation.sleep(self.rollout_engine)
            self.colocation.wake(self.teacher_engine)
            requests = teacher_requests(
                samples, [self.prompts.teacher_prompts[chosen[s.prompt_index]] for s in samples],
                self.bridge)
            hidden = self.teacher_states(requests)
            self.colocation.sleep(self.teacher_engine)
            times["teacher"] = time.perf_counter() - start
            ids = [f"it{c.iteration}:{self.prompts.ids[chosen[s.prompt_index]]}:"
                   f"{j % r.n_samples_per_prompt}" for j, s in enumerate(samples)]
            self.record_samples(ids, samples)
            payload = (ids, samples, requests, hidden, dict(times))
        payload = self._broadcast(payload)
        ids, samples, requests, hidden, rank0_times = payload
        times.update(rank0_times)
        lengths = [len(s.response_ids) for s in samples]
        stats = {"rollout/prompts": len(chosen), "rollout/samples": len(samples),
                 "rollout/response_len": sum(lengths) / max(1, len(lengths)),
                 "rollout/response_len_max": max(lengths, default=0),
                 "rollout/truncation_rate": sum(s.truncated for s in samples)
                 / max(1, len(samples)),
                 "rollout/prompts_over_max_len": len(self.prompts.skipped)}
        return (rollout_split(ids, samples, requests), rollout_teacher(ids, requests, hidden),
                stats)

    def teacher_states(self, requests) -> list[torch.Tensor]:
        """The live teacher on ``requests`` (with their images), ``teacher_forward_n_batches``
        global batches (``train_batch_size`` samples each) per forward call, as KDFlow
        groups them."""
        per_call = self.cfg.kd.teacher_forward_n_batches * self.cfg.train.train_batch_size
        hidden: list[torch.Tensor] = []
        for lo in range(0, len(requests), per_call):
            group = requests[lo:lo + per_call]
            hidden += self.teacher_engine.final_states([q.tokens for q in group],
                                                       [q.positions for q in group],
                                                       [q.images for q in group])
        return hidden

    def train_iteration(self, split, teacher, stats, progress, times) -> None:
        self.colocation.reload(self.optimizer)
        start = time.perf_counter()
        t = self.cfg.train
        self.train_batches = data.BatchBuilder(split, pad_id=self.pad_id,
                                               packing=self.cfg.data.packing_samples,
                                               teacher=teacher, images=self.images)
        kl = top1 = rows = 0.0
        samples = list(range(len(split)))
        for lo in range(0, len(samples), t.train_batch_size):
            if self.cursor.global_step >= self.total_steps:
                break
            chunk = samples[lo:lo + t.train_batch_size]
            plan = data.StepPlan(self.cursor.epoch, self.cursor.step_in_epoch, chunk,
                                 data.split_over_ranks(
                                     chunk, split.lengths, self.env.world_size,
                                     micro_bsz=t.micro_train_batch_size,
                                     max_tokens=t.max_token_len_per_gpu if t.use_dynamic_bsz
                                     else 0, packing=self.cfg.data.packing_samples))
            metrics = self.train_step(plan)
            n = metrics["train/loss_tokens"]
            kl += metrics.pop("train/kl_ts", 0.0) * n
            top1 += metrics.pop("train/top1", 0.0) * n
            rows += metrics.pop("train/rows", 0.0) * n
            self.count_step(metrics)
            self.log(metrics, progress)
        stats["onpolicy/kl"] = kl / max(rows, 1.0)
        stats["onpolicy/top1_agree"] = top1 / max(rows, 1.0)
        times["train"] = time.perf_counter() - start

    def sync(self, times: dict[str, float] | None = None) -> None:
        """Student -> rollout engine (and the self-distillation teacher); all ranks call."""
        start = time.perf_counter()
        state = gather_student(self.module.student)
        self.colocation.offload(self.optimizer)
        if self.env.is_main:
            self.colocation.wake(self.rollout_engine)
            push(state, self.rollout_engine, self.env, dtype=self._engine_dtype())
        if self.self_teacher is not None and times is not None \
                and self.self_teacher.due(self.cursor.iteration + 1):  # not at start
            self.self_teacher.update(state)
            self.cursor.teacher_updates += 1
        state.clear()
        if times is not None:
            times["sync"] = time.perf_counter() - start

    def end_iteration(self, stats: dict[str, float], times: dict[str, float]) -> None:
        c = self.cursor
        c.iteration += 1
        c.step_in_epoch += 1
        if c.step_in_epoch >= self.iters_per_epoch:
            c.epoch, c.step_in_epoch = c.epoch + 1, 0
        metrics = {**stats, **{f"time/{k}_s": v for k, v in times.items()},
                   "rollout/iteration": c.iteration,
                   "rollout/teacher_updates": c.teacher_updates}
        if self.env.is_main:
            self.tracker.log_metrics(metrics, step=c.global_step)
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": c.global_step, "iteration": c.iteration,
                                    **metrics}) + "\n")

    def _engine_dtype(self) -> torch.dtype | None:
        engine = self.rollout_engine
        engine = engine.engines[0] if hasattr(engine, "engines") else engine
        model = getattr(engine, "model", None)
        if model is not None:
            return next(model.parameters()).dtype
        return getattr(engine, "compute_dtype", torch.bfloat16)

    # ---- state ---------------------------------------------------------------------------
    def save(self) -> None:
        step = self.cursor.global_step
        if self.self_teacher is not None:  # theta_T first: latest.json comes last
            self.self_teacher.save(step)
        self.checkpointer.save(step, self.module, self.optimizer, self.scheduler,
                               asdict(self.cursor), keep_key=self.module.checkpoint_filter)
        if self.self_teacher is not None:
            self.self_teacher.prune()

    def restore(self, cursor: dict) -> None:
        self.cursor = OnPolicyCursor(**cursor)
        if self.self_teacher is not None:
            self.self_teacher.restore(self.cursor.global_step)

    def record_samples(self, ids: list[str], samples: list[Sample]) -> None:
        k = self.cfg.rollout.print_rollout_sample
        if k <= 0:
            return
        from kubedistill.models.loading import load_tokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = load_tokenizer(self._path(self.student_ref))
        tok = self._tokenizer
        os.makedirs(os.path.dirname(self.samples_path), exist_ok=True)
        with open(self.samples_path, "a") as f:
            for sid, s in list(zip(ids, samples, strict=True))[:k]:
                f.write(json.dumps({
                    "iteration": self.cursor.iteration, "id": sid,
                    "prompt": tok.decode(s.prompt_ids), "response": tok.decode(s.response_ids),
                    "finish_reason": s.finish_reason, "response_len": len(s.response_ids),
                    "mean_logprob": (sum(s.logprobs) / len(s.logprobs)
                                     if s.logprobs and not any(map(math.isnan, s.logprobs))
                                     else None)}) + "\n")

    def run_params(self) -> dict[str, float]:
        r = self.cfg.rollout
        return {"world_size": self.env.world_size, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "iterations_per_epoch": self.iters_per_epoch, "prompts": len(self.prompts),
                "prompts_over_max_len": len(self.prompts.skipped),
                "rollout_batch_size": r.rollout_batch_size,
                "n_samples_per_prompt": r.n_samples_per_prompt,
                "self_distillation": int(self.self_distill)}

    def _broadcast(self, payload):
        if self.env.world_size == 1:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def close_engines(self) -> None:
        """Close both engines together: closing one SGLang engine kills the other's
        scheduler, whose watchdog SIGQUITs us (kubedistill.lifecycle.close_all)."""
        engines, self.rollout_engine, self.teacher_engine = \
            (self.rollout_engine, self.teacher_engine), None, None
        close_all(engines)
