"""Where and under which runs a stage logs: tracking URI, experiment, parent run, tags, params.

- Tracking URI: ``cfg.tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded
  store ``sqlite:///{work_dir}/mlflow.db`` with artifacts in ``{work_dir}/mlartifacts`` (only
  when ``work_dir`` is local; otherwise tracking is off). ``none``/``off`` turns it off.
- Parent run (one per pipeline run): ``cfg.tracking.parent_run_id`` if given; else the run
  tagged ``kubedistill.pipeline_run_id`` = ``cfg.tracking.pipeline_run_id``; else the one
  recorded in ``{work_dir}/mlflow_parent_run.json`` for the same tracking URI; else a new one
  (then recorded there). Each stage logs to a nested run under it.
- Params are the flat config minus any name that looks like a secret; env vars never.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

from kubedistill import __version__, storage
from kubedistill.config import Config
from kubedistill.kdflow_flags import parse_tags

OFF = {"none", "off", "disabled", "false", "0"}
PARENT_MARKER = "mlflow_parent_run.json"
TAG_PIPELINE = "kubedistill.pipeline_run_id"
TAG_ROLE = "kubedistill.role"
_SECRET_PARTS = {"password", "passwd", "pwd", "secret", "secrets", "credential", "credentials",
                 "apikey", "token", "key"}
# config fields whose names contain "key"/"token" but hold column names or sizes, not secrets
_NOT_SECRET = {"input_key", "output_key", "image_key", "teacher_input_key", "label_key",
               "max_token_len_per_gpu"}


def resolve_tracking_uri(cfg: Config) -> str | None:
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///"):  # a local store (e.g. KDFlow's --wandb_dir)
            os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
        return None if uri.strip().lower() in OFF else uri
    if not storage.is_local(cfg.storage.work_dir):
        return None
    root = os.path.abspath(storage.local_path(cfg.storage.work_dir))
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_location(cfg: Config, uri: str) -> str | None:
    """Artifacts of a local store go to ``{work_dir}/mlartifacts``; a server decides its own."""
    if is_remote(uri) or not storage.is_local(cfg.storage.work_dir):
        return None
    return "file://" + os.path.abspath(os.path.join(
        storage.local_path(cfg.storage.work_dir), "mlartifacts"))


@contextlib.contextmanager
def http_settings(timeout: int, retries: int) -> Iterator[None]:
    """Short MLflow REST timeouts/retries (``MLFLOW_HTTP_REQUEST_TIMEOUT`` /
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) for the block, unless the user set them."""
    wanted = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries)}
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


_UNREACHABLE_TYPES = ("ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout",
                      "MaxRetryError", "NewConnectionError", "ProtocolError", "RetryError",
                      "EndpointConnectionError", "ConnectionRefusedError", "RemoteDisconnected")
_UNREACHABLE_TEXT = ("failed with exception", "failed with timeout", "connection refused",
                     "max retries exceeded")
_UNREACHABLE_CODES = ("TEMPORARILY_UNAVAILABLE", "SERVICE_UNDER_MAINTENANCE")


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause/context) says the service could not be reached,
    as opposed to a request it answered and refused."""
    seen = 0
    while exc is not None and seen < 8:
        if type(exc).__name__ in _UNREACHABLE_TYPES or isinstance(exc, (ConnectionError,
                                                                        TimeoutError)):
            return True
        text = str(exc).lower()
        if type(exc).__name__ == "MlflowException" and (
                any(t in text for t in _UNREACHABLE_TEXT)
                or getattr(exc, "error_code", None) in _UNREACHABLE_CODES):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def is_secret_name(name: str) -> bool:
    if name in _NOT_SECRET:
        return False
    parts = re.split(r"[^a-z0-9]+", name.lower())
    return any(p in _SECRET_PARTS for p in parts) or "password" in name.lower() \
        or "secret" in name.lower()


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved flat config as MLflow params (strings), secret-looking names dropped."""
    out = {}
    for name, value in cfg.to_dict(flat=True).items():
        if is_secret_name(name):
            continue
        out[name] = str(list(value) if isinstance(value, tuple) else value)[:6000]
    return out


@functools.cache
def git_sha() -> str | None:
    """``$KUBEDISTILL_GIT_SHA`` (set in images) or the checkout's HEAD, if any."""
    if os.environ.get("KUBEDISTILL_GIT_SHA"):
        return os.environ["KUBEDISTILL_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def prepared_data_hash(cfg: Config) -> str | None:
    uri = storage.join(cfg.prepared_path, "manifest.json")
    try:
        return storage.read_json(uri).get("data_hash") if storage.exists(uri) else None
    except (OSError, ValueError):
        return None


def run_tags(cfg: Config, stage: str | None = None) -> dict[str, str]:
    """Tags for code version, teacher, data hash and pipeline run (empty values dropped)."""
    tags = {"kubedistill.version": __version__, "kubedistill.git_sha": git_sha(),
            "mlflow.source.git.commit": git_sha(), "kubedistill.recipe": cfg.name,
            "teacher": cfg.model.teacher_name_or_path,
            "student": cfg.model.student_name_or_path, "data_hash": prepared_data_hash(cfg),
            TAG_PIPELINE: cfg.tracking.pipeline_run_id, "kubedistill.stage": stage,
            **dict(parse_tags(cfg.tracking.run_tags))}
    return {k: str(v) for k, v in tags.items() if v}


def experiment_id(client: Any, cfg: Config, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.experiment_name
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(cfg, uri))
    except MlflowException:  # created concurrently by another stage
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def parent_run_id(client: Any, cfg: Config, uri: str, exp_id: str) -> str:
    """The parent run of this pipeline run (see module doc), created when missing."""
    if cfg.tracking.parent_run_id:
        return client.get_run(cfg.tracking.parent_run_id).info.run_id
    marker = storage.join(cfg.storage.work_dir, PARENT_MARKER)
    pipeline_id = cfg.tracking.pipeline_run_id
    if pipeline_id:
        found = client.search_runs(
            [exp_id], f"tags.`{TAG_PIPELINE}` = '{pipeline_id}' and tags.`{TAG_ROLE}` = 'parent'",
            max_results=1)
        if found:
            return found[0].info.run_id
    elif storage.exists(marker):
        info = storage.read_json(marker)
        if info.get("tracking_uri") == uri:
            try:
                run = client.get_run(info["run_id"])
                if run.info.lifecycle_stage == "active":
                    return run.info.run_id
            except Exception as exc:  # deleted or unknown here: make a new parent
                if is_unreachable(exc):
                    raise
    tags = {**run_tags(cfg), TAG_ROLE: "parent"}
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or pipeline_id or cfg.name,
                            tags=tags)
    storage.write_json_atomic(marker, {"run_id": run.info.run_id, "tracking_uri": uri,
                                       "experiment_id": exp_id})
    return run.info.run_id


def stage_files(cfg: Config, stage: str) -> list[tuple[str, str]]:
    """``(uri, artifact folder)`` of the small files a stage's run carries. The train run also
    carries the prepared manifest, bad-row report and teacher-cache manifest it trained from,
    so they reach MLflow even when earlier stages ran without a tracker."""
    prepared = [(storage.join(cfg.prepared_path, "manifest.json"), "prepared"),
                (storage.join(cfg.prepared_path, "bad_rows.jsonl"), "prepared")]
    cache = [(storage.join(cfg.teacher_cache_path, "manifest.json"), "teacher_cache")]
    train_log = [(storage.join(cfg.storage.work_dir, "train", "train_log.jsonl"), "train")]
    return {"prepare": prepared, "cache-teacher": cache, "merge-cache": cache,
            "train": prepared + cache + train_log}.get(stage, [])
