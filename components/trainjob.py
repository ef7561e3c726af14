"""Multi-node training: a Kubeflow Trainer v2 ``TrainJob`` launched from the train component.

:func:`trainjob_manifest` is pure: Config -> the ``trainer.kubeflow.org/v1alpha1`` TrainJob
dict (runtimeRef ``ClusterTrainingRuntime/torch-distributed``, ``trainer.numNodes``,
``trainer.resourcesPerNode`` (the GPUs of one train pod,
:func:`kubedistill.components.sizing.train_pod_gpus`), image, ``command: [kubedistill, train, --key, value, ...]``
carrying every field that differs from the defaults, and env). The torch-distributed
runtime sets ``PET_NNODES``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT``, which
``torchrun`` (launched by ``kubedistill train``) reads as its defaults.

:func:`run_trainjob` creates it through the ``kubernetes`` client (custom objects API),
polls ``status.conditions`` until ``Complete`` or ``Failed`` is True (or the timeout), and
deletes it on timeout. The pipeline runner's service account needs create/get/watch/delete
on ``trainjobs`` (the chart's Role).
"""

from __future__ import annotations

import re
import time
from typing import Any

from kubedistill.components.sizing import train_pod_gpus
from kubedistill.config import Config
from kubedistill.errors import KubedistillError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TrainJobFailed(KubedistillError):
    exit_code = 1


def _as_arg(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def cli_args(cfg: Config) -> list[str]:
    """``--key value`` for every config field that differs from its default (flat names).

    ``name`` is not a CLI key; the TrainJob carries it as the ``kubedistill/recipe`` label.
    """
    defaults = Config().to_dict(flat=True)
    args: list[str] = []
    for key, value in cfg.to_dict(flat=True).items():
        if key != "name" and value != defaults.get(key):
            args += [f"--{key}", _as_arg(value)]
    return args


def job_name(cfg: Config, suffix: str) -> str:
    """A DNS-1035 name: ``kd-<recipe>-<suffix>``, at most 63 characters."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"kd-{cfg.name}".lower()).strip("-")
    suffix = re.sub(r"[^a-z0-9-]+", "-", suffix.lower()).strip("-")
    return f"{base[:62 - len(suffix)]}-{suffix}".strip("-")


def trainjob_manifest(cfg: Config, *, name: str, image: str, namespace: str | None = None,
                      env: list[dict[str, Any]] | None = None,
                      accelerator: str = "nvidia.com/gpu", cpu: str | None = None,
                      memory: str | None = None, runtime: str = RUNTIME) -> dict[str, Any]:
    """The TrainJob for ``cfg`` (``cfg.train.num_nodes`` nodes); see the module docstring."""
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    pod_gpus = train_pod_gpus(cfg)
    on_gpu = pod_gpus > 0
    if on_gpu:
        limits[accelerator] = pod_gpus
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = memory
    resources = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
    trainer: dict[str, Any] = {
        "image": image,
        "command": ["kubedistill", "train", *cli_args(cfg)],
        "numNodes": cfg.train.num_nodes,
        "numProcPerNode": str(cfg.train.num_gpus_per_node) if on_gpu else "cpu",
    }
    if resources:
        trainer["resourcesPerNode"] = resources
    if env:
        trainer["env"] = env
    recipe_label = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.name)[:63].strip("-_.")
    metadata: dict[str, Any] = {"name": name, "labels": {
        "app.kubernetes.io/part-of": "kubedistill", "kubedistill/recipe": recipe_label}}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime",
                           "name": runtime},
            "trainer": trainer,
        },
    }


def terminal_state(obj: dict[str, Any]) -> str | None:
    """'Complete' or 'Failed' when that condition is True in ``status``, else None."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and str(cond.get("status")) == "True":
            return cond["type"]
    return None


def current_namespace(default: str = "kubeflow") -> str:
    try:
        with open(SA_NAMESPACE_FILE) as fh:
            return fh.read().strip() or default
    except OSError:
        return default


def run_trainjob(manifest: dict[str, Any], *, timeout_s: float = 7 * 24 * 3600,
                 poll_s: float = 15.0, api: Any = None) -> dict[str, Any]:
    """Create the TrainJob, wait for a terminal condition; return the final object.

    Raises TrainJobFailed on ``Failed`` or timeout (the job is deleted on timeout).
    ``api`` is a ``CustomObjectsApi`` (made from in-cluster or kube config when None).
    """
    if api is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    ns = manifest["metadata"].get("namespace") or current_namespace()
    name = manifest["metadata"]["name"]
    api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
    deadline = time.monotonic() + timeout_s
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        state = terminal_state(obj)
        if state == "Complete":
            return obj
        if state == "Failed":
            raise TrainJobFailed(f"TrainJob {ns}/{name} failed: {obj.get('status')}")
        if time.monotonic() > deadline:
            api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            raise TrainJobFailed(f"TrainJob {ns}/{name} did not finish in {timeout_s:.0f}s")
        time.sleep(poll_s)


def env_for_trainjob(environ: dict[str, str], secret_refs: dict[str, list[str]] | None = None,
                     ) -> list[dict[str, Any]]:
    """Env for the TrainJob pods: plain storage/tracking settings copied from ``environ``,
    credentials as ``secretKeyRef`` (``secret_refs``: env var -> [secret, key]), never
    as values."""
    plain = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
             "FSSPEC_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    out = [{"name": k, "value": environ[k]} for k in plain if environ.get(k)]
    for env_name, (secret, key) in sorted((secret_refs or {}).items()):
        out.append({"name": env_name, "valueFrom": {"secretKeyRef": {
            "name": secret, "key": key, "optional": True}}})
    return out


__all__ = [
    "trainjob_manifest", "run_trainjob", "terminal_state", "cli_args", "job_name",
    "env_for_trainjob", "TrainJobFailed"]
