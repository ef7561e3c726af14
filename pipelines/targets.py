"""Where a compiled pipeline runs: per-stage Kubernetes settings, applied by one function.

A :class:`Target` holds everything platform-specific; pipelines call :func:`apply` on each
task with the stage's role and never touch kfp-kubernetes themselves.

- ``kind``: CPU only. Small requests, plain env (in-cluster MLflow and the KFP object
  store's dev endpoint), no accelerators, no ``/dev/shm``, no secrets.
- ``gpu``: ``nvidia.com/gpu`` on cache-teacher/train/evaluate (``set_accelerator_type`` +
  ``set_accelerator_limit``), as many as the recipe needs (:func:`sized`, from
  :func:`kubedistill.components.sizing.gpu_plan` on nodes of ``node_gpus`` GPUs: teacher
  ``tp x pp x dp`` on cache-teacher and evaluate, ``num_gpus_per_node`` on train, none on a
  train task that launches a multi-node TrainJob, the colocated engines on on-policy train),
  ``/dev/shm`` as a memory emptyDir on GPU stages (NCCL and
  torch dataloaders need more than the 64 MiB default), S3 and MLflow credentials from
  Secrets as env vars, optional tolerations and node selectors on GPU stages.

Retries (``set_retry``) only where re-running is safe:
- prepare: deterministic, rewrites the same files, and each file is written atomically;
- cache-teacher: a shard becomes visible only when complete, so a retry recomputes a
  half-written shard; GPU pods are the ones preemption and Xid errors hit;
- evaluate: reads the model, rewrites metrics.json; nothing else changes;
- register: the failures seen are MLflow calls (server restarts); a retry after a version
  was already created adds at most a second version with the same tags, and the alias
  'challenger' points at the newest.
Not retried: train (hours of GPU time; a failure is usually deterministic, e.g. OOM;
resume is an explicit decision, ``--resume``), merge-cache (cheap, fails only on a real
mismatch), promote (moves 'champion'; a human should look at a failure).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kfp import dsl, kubernetes

from kubedistill.components.sizing import gpu_plan
from kubedistill.config import Config

GPU_STAGES = ("cache-teacher", "train", "evaluate")
RETRY = {"prepare": 2, "cache-teacher": 3, "evaluate": 2, "register": 3}

S3_SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_SECRET_ENV = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                     "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str
    gpus: int = 0


@dataclass(frozen=True)
class Target:
    """Kubernetes settings of one deployment target (see the module docstring)."""

    name: str
    image: str
    resources: dict[str, Resources]
    accelerator_type: str | None = None
    shm_size: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # secret name -> {secret key: env var}; `optional` secrets may be absent
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    optional_secrets: tuple[str, ...] = ()
    tolerations: tuple[dict, ...] = ()
    node_selector: dict[str, str] = field(default_factory=dict)
    retries: bool = True
    image_pull_policy: str | None = None
    node_gpus: int = 0  # GPUs of one node: the most one pod may request

    def replace(self, **changes) -> Target:
        return dataclasses.replace(self, **changes)


_SMALL = Resources("500m", "1Gi")
LAUNCHER = Resources("500m", "2Gi")
KIND = Target(
    name="kind",
    image="",
    resources={"prepare": Resources("1", "3Gi"), "cache-teacher": Resources("1", "4Gi"),
               "merge-cache": _SMALL, "train": Resources("2", "6Gi"),
               "evaluate": Resources("1", "4Gi"), "register": Resources("500m", "2Gi"),
               "promote": _SMALL, "open-run": _SMALL, "close-run": _SMALL},
    env={"MLFLOW_TRACKING_URI": "http://kubedistill-mlflow.kubeflow.svc.cluster.local:5000",
         "AWS_ENDPOINT_URL": "http://minio-service.kubeflow.svc.cluster.local:9000"},
    image_pull_policy="IfNotPresent",  # images are `kind load`ed, not pulled
)
GPU = Target(
    name="gpu",
    image="",
    resources={"prepare": Resources("8", "32Gi"), "cache-teacher": Resources("8", "64Gi", 1),
               "merge-cache": Resources("1", "2Gi"), "train": Resources("16", "128Gi", 8),
               "evaluate": Resources("8", "64Gi", 1), "register": Resources("2", "8Gi"),
               "promote": _SMALL, "open-run": _SMALL, "close-run": _SMALL},
    accelerator_type="nvidia.com/gpu",
    node_gpus=8,
    shm_size="16Gi",
    env={"MLFLOW_TRACKING_URI": "http://kubedistill-mlflow.kubeflow.svc.cluster.local:5000"},
    secrets={"kubedistill-s3": S3_SECRET_ENV, "kubedistill-mlflow": MLFLOW_SECRET_ENV},
    optional_secrets=("kubedistill-mlflow",),
)
# kfp.local (``kubedistill run``): no Kubernetes settings, no retries, the caller's env.
LOCAL = Target(name="local", image="", resources={}, retries=False)
TARGETS = {"kind": KIND, "gpu": GPU}


def sized(target: Target, cfg: Config) -> Target:
    """``target`` with the GPU counts of ``cfg``'s plan on its GPU stages (a target without
    accelerators is returned as it is). Raises ConfigError when the recipe cannot fit."""
    if not target.accelerator_type:
        return target
    plan = gpu_plan(cfg, target.node_gpus)
    gpus = {"cache-teacher": plan.teacher, "evaluate": plan.teacher, "train": plan.train}
    res = dict(target.resources)
    for stage, count in gpus.items():
        res[stage] = dataclasses.replace(res[stage], gpus=count)
    if plan.uses_trainjob:  # the train task only creates the TrainJob and waits
        res["train"] = LAUNCHER
    return target.replace(resources=res)


def get_target(name: str, image: str | None = None, gpus_per_node: int | None = None,
               tolerations: list[dict] | None = None,
               node_selector: dict[str, str] | None = None,
               env: dict[str, str] | None = None, cfg: Config | None = None) -> Target:
    """A named target with the compile-time options applied: ``gpus_per_node`` is the GPUs
    of one node, ``cfg`` the run's config that sizes the GPU stages (default: the defaults'
    config), ``env`` plain env vars (e.g. a dev object store's credentials on ``kind``,
    which has no Secrets)."""
    from kubedistill.components.stages import IMAGE

    if name not in TARGETS and name != "local":
        raise ValueError(f"unknown target '{name}'; choose one of {', '.join(TARGETS)}")
    target = (LOCAL if name == "local" else TARGETS[name]).replace(image=image or IMAGE)
    if gpus_per_node is not None and target.accelerator_type:
        target = target.replace(node_gpus=gpus_per_node)
    target = sized(target, cfg if cfg is not None else Config())
    if tolerations:
        target = target.replace(tolerations=tuple(tolerations))
    if node_selector:
        target = target.replace(node_selector=dict(node_selector))
    if env:
        target = target.replace(env={**target.env, **env})
    return target


def secret_env_refs(target: Target) -> dict[str, list[str]]:
    """env var -> [secret, key]: what a TrainJob launched from train must reference."""
    return {env: [secret, key] for secret, keys in target.secrets.items()
            for key, env in keys.items()}


def apply(task: dsl.PipelineTask, stage: str, target: Target) -> dsl.PipelineTask:
    """Apply ``target``'s settings for ``stage`` (a component name) to ``task``."""
    import json

    task.set_display_name(stage)
    task.set_container_image(target.image)
    if target.name == "local":
        return task
    res = target.resources.get(stage, _SMALL)
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    task.set_memory_limit(res.memory)
    task.set_env_variable("KUBEDISTILL_IMAGE", target.image)
    if target.image_pull_policy:
        kubernetes.set_image_pull_policy(task, target.image_pull_policy)
    for key, value in target.env.items():
        task.set_env_variable(key, value)
    gpu_stage = bool(target.accelerator_type and res.gpus)
    if gpu_stage:
        task.set_accelerator_type(target.accelerator_type)
        task.set_accelerator_limit(res.gpus)
        if target.shm_size:
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                       medium="Memory", size_limit=target.shm_size)
        for tol in target.tolerations:
            kubernetes.add_toleration(task, **tol)
        for key, value in target.node_selector.items():
            kubernetes.add_node_selector(task, key, value)
    for secret, keys in target.secrets.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys,
                                     optional=secret in target.optional_secrets)
    if stage == "train" and target.secrets:
        task.set_env_variable("KUBEDISTILL_SECRET_ENV", json.dumps(secret_env_refs(target)))
    if target.retries and stage in RETRY:
        task.set_retry(num_retries=RETRY[stage], backoff_duration="30s", backoff_factor=2.0)
    return task
