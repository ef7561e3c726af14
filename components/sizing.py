"""GPUs each stage's pod needs, from the recipe: one plan for compile, submit and TrainJobs.

Nothing here imports KFP. :func:`gpu_plan` turns a validated ``Config`` and the GPUs of one
node into a :class:`GpuPlan`, or raises ``ConfigError`` naming the keys that cannot fit:

- teacher (cache-teacher, evaluate): an SGLang teacher (``teacher_backend`` ``sglang`` or
  ``auto``) runs ``teacher_tp_size x teacher_pp_size x teacher_dp_size`` GPUs in one pod;
  an ``hf`` teacher uses one. One pod lives on one node, so the product must be at most the
  node's GPUs.
- train, off-policy and SFT: ``num_gpus_per_node`` student ranks per node (torchrun). With
  ``num_nodes > 1`` the train task is a launcher without GPUs and a TrainJob runs
  ``num_nodes`` pods of ``train_gpus_per_node`` GPUs each.
- train, on-policy (``rollout_num_engines > 0``): the live teacher and the rollout engines run
  in rank 0's process on the train pod's GPUs, from GPU 0, beside the student (colocated;
  ``enable_sleep`` lets them hand memory back while the student trains). That pod needs
  ``max(num_gpus_per_node, teacher GPUs, rollout_tp_size x rollout_num_engines)`` GPUs, at
  most a node's worth.
- on CPU (``device: cpu``) nothing needs a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubedistill.config import Config
from kubedistill.errors import ConfigError


@dataclass(frozen=True)
class GpuPlan:
    """GPUs per pod: ``teacher`` (cache-teacher and evaluate), ``train`` (the train task's
    own pod), ``train_gpus_per_node`` (each TrainJob pod when ``train_nodes > 1``)."""

    teacher: int
    train: int
    train_gpus_per_node: int
    train_nodes: int

    @property
    def uses_trainjob(self) -> bool:
        return self.train_nodes > 1


def teacher_gpus(cfg: Config) -> int:
    """GPUs of the teacher engine: ``tp x pp x dp`` for SGLang, one for transformers."""
    if cfg.cache.teacher_backend == "hf":
        return 1
    kd = cfg.kd
    return kd.teacher_tp_size * kd.teacher_pp_size * kd.teacher_dp_size


def rollout_gpus(cfg: Config) -> int:
    """GPUs of the rollout engines: ``rollout_tp_size x rollout_num_engines`` (SGLang)."""
    r = cfg.rollout
    if r.rollout_num_engines <= 0:
        return 0
    return 1 if r.rollout_backend == "hf" else r.rollout_tp_size * r.rollout_num_engines


def train_pod_gpus(cfg: Config) -> int:
    """GPUs of one train pod (per node): the student's ranks, and on-policy also the
    colocated teacher and rollout engines (module docstring). No capacity check."""
    if cfg.train.device == "cpu":
        return 0
    if cfg.rollout.rollout_num_engines <= 0:
        return cfg.train.num_gpus_per_node
    return max(cfg.train.num_gpus_per_node, teacher_gpus(cfg), rollout_gpus(cfg))


def _check_positive(cfg: Config) -> None:
    for key, value in (("num_nodes", cfg.train.num_nodes),
                       ("num_gpus_per_node", cfg.train.num_gpus_per_node),
                       ("teacher_tp_size", cfg.kd.teacher_tp_size),
                       ("teacher_pp_size", cfg.kd.teacher_pp_size),
                       ("teacher_dp_size", cfg.kd.teacher_dp_size),
                       ("rollout_tp_size", cfg.rollout.rollout_tp_size)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")


def gpu_plan(cfg: Config, node_gpus: int) -> GpuPlan:
    """The GPUs per pod for ``cfg`` on nodes of ``node_gpus`` GPUs (module docstring)."""
    if cfg.train.device == "cpu":
        return GpuPlan(teacher=0, train=0, train_gpus_per_node=0,
                       train_nodes=cfg.train.num_nodes)
    _check_positive(cfg)
    kd, t, r = cfg.kd, cfg.train, cfg.rollout
    teacher = teacher_gpus(cfg)
    if teacher > node_gpus:
        raise ConfigError(
            f"the teacher needs teacher_tp_size x teacher_pp_size x teacher_dp_size = "
            f"{kd.teacher_tp_size} x {kd.teacher_pp_size} x {kd.teacher_dp_size} = {teacher} "
            f"GPUs in one pod, but a node has {node_gpus} (--gpus-per-node); lower "
            f"teacher_tp_size / teacher_dp_size")
    if t.num_gpus_per_node > node_gpus:
        raise ConfigError(f"num_gpus_per_node = {t.num_gpus_per_node} is more than the "
                          f"{node_gpus} GPUs of a node (--gpus-per-node)")
    if rollout_gpus(cfg) > node_gpus:
        raise ConfigError(
            f"the rollout engines need rollout_tp_size x rollout_num_engines = "
            f"{r.rollout_tp_size} x {r.rollout_num_engines} = {rollout_gpus(cfg)} GPUs on "
            f"the train pod, but a pod has at most {node_gpus} (--gpus-per-node)")
    per_node = train_pod_gpus(cfg)
    if t.num_nodes > 1:
        return GpuPlan(teacher=teacher, train=0, train_gpus_per_node=per_node,
                       train_nodes=t.num_nodes)
    return GpuPlan(teacher=teacher, train=per_node, train_gpus_per_node=per_node,
                   train_nodes=1)
