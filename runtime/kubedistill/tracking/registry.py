"""Register the trained student in the MLflow Model Registry and gate the ``champion`` alias.

``register(cfg)``: logs ``cfg.train.save_path`` (LoRA adapters merged into their base first)
as an MLflow ``transformers`` model (task ``text-generation``, explicit pip pins of torch,
transformers, accelerate, safetensors), registers it as ``cfg.tracking.registered_model_name``
(default ``cfg.name``), tags the version (teacher, data_hash, pipeline_run_id, score,
score_metric, higher_is_better, eval_data_hash), points alias ``challenger`` at it and writes
``{work_dir}/registry/registration.json``. It is idempotent: a registration key (model files,
metrics, pipeline run) tags the ``register`` run, and a retry reuses that run's version, or its
already logged model, instead of creating a second version.

``promote(cfg)``: moves ``champion`` to the challenger only if it beats the champion's score by
at least ``cfg.eval.min_improvement`` (strictly better when 0) on the same metric and the same
``eval_data_hash``; the first version becomes champion. The decision and both scores are tagged
on the challenger (``promotion_decision``, ``promotion_reason``, ``champion_score``,
``challenger_score``, ``promotion_previous_champion``) BEFORE the alias moves, so a rerun after
a kill reports the same decision; versions are never deleted and stages are not used. Writes
``{work_dir}/registry/promotion.json``.

Unreachable server: each call is retried ``KUBEDISTILL_MLFLOW_RETRIES`` times (default 5) with
exponential backoff from ``KUBEDISTILL_MLFLOW_BACKOFF_S`` (default 2 s, capped at 30 s), then
:class:`~kubedistill.errors.ServiceUnavailable` is raised.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.errors import ConfigError, DataError, ServiceUnavailable
from kubedistill.tracking import runs

log = logging.getLogger(__name__)
T = TypeVar("T")
TAG_KEY = "kubedistill.registration_key"
PINNED = ("torch", "transformers", "accelerate", "safetensors")
REQUEST_TIMEOUT = 120  # seconds per REST call while registering (uploads included)


def with_retries(fn: Callable[[], T], what: str, uri: str) -> T:
    """``fn()`` retried with bounded exponential backoff while MLflow is unreachable."""
    attempts = max(1, int(os.environ.get("KUBEDISTILL_MLFLOW_RETRIES", "5")))
    delay = float(os.environ.get("KUBEDISTILL_MLFLOW_BACKOFF_S", "2"))
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            with runs.http_settings(REQUEST_TIMEOUT, 0):
                return fn()
        except Exception as exc:
            if not runs.is_unreachable(exc):
                raise
            cause = str(exc).splitlines()[0][:200]
            if attempt == attempts:
                raise ServiceUnavailable(
                    f"MLflow at {uri} unreachable while {what}: gave up after {attempts} "
                    f"attempts in {time.monotonic() - start:.0f}s ({cause}). Check that the "
                    "tracking server is up and reachable, then rerun this stage.") from exc
            log.warning("MLflow at %s unreachable while %s (attempt %d/%d); retrying in %.1fs",
                        uri, what, attempt, attempts, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def _client_for(cfg: Config):
    from mlflow import MlflowClient

    uri = runs.resolve_tracking_uri(cfg)
    if uri is None:
        raise ConfigError("the registry needs MLflow: set tracking_uri (or MLFLOW_TRACKING_URI)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def model_name(cfg: Config) -> str:
    return cfg.tracking.registered_model_name or cfg.name


def pip_requirements() -> list[str]:
    """Exact pins of the installed versions (local tags such as ``+cpu`` dropped)."""
    return [f"{p}=={md.version(p).split('+')[0]}" for p in PINNED]


def _registration_key(cfg: Config, local: str, metrics: dict) -> str:
    files = []
    for root, _, names in os.walk(local):
        for n in sorted(names):
            st = os.stat(os.path.join(root, n))
            files.append((os.path.relpath(os.path.join(root, n), local), st.st_size,
                          st.st_mtime_ns))
    blob = json.dumps({"name": model_name(cfg), "model": cfg.train.save_path,
                       "files": sorted(files), "metrics": metrics,
                       "pipeline": cfg.tracking.pipeline_run_id}, sort_keys=True, default=str)
    return storage.sha256_bytes(blob.encode())[:24]


def _version_tags(cfg: Config, metrics: dict, run_id: str) -> dict[str, str]:
    tags = {"teacher": cfg.model.teacher_name_or_path, "data_hash": runs.prepared_data_hash(cfg)
            or metrics.get("data_hash"), "pipeline_run_id": cfg.tracking.pipeline_run_id,
            "score": metrics.get("score"), "score_metric": metrics.get("score_metric"),
            "higher_is_better": metrics.get("higher_is_better"),
            "eval_data_hash": metrics.get("eval_data_hash"), "registration_run_id": run_id,
            "kubedistill.git_sha": runs.git_sha()}
    return {k: str(v) for k, v in tags.items() if v is not None}


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore it."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def _register_once(cfg: Config, client, uri: str, local: str, key: str, metrics: dict
                   ) -> dict[str, Any]:
    name = model_name(cfg)
    exp = runs.experiment_id(client, cfg, uri)
    parent = runs.parent_run_id(client, cfg, uri, exp)
    found = client.search_runs([exp], f"tags.`{TAG_KEY}` = '{key}'", max_results=1)
    if found:
        run_id, logged = found[0].info.run_id, set(found[0].data.metrics)
    else:
        run_id, logged = client.create_run(exp, run_name="register", tags={
            "mlflow.parentRunId": parent, TAG_KEY: key,
            **runs.run_tags(cfg, "register")}).info.run_id, set()
    numeric = {k: v for k, v in metrics.items() if k not in logged
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:  # the first attempt, or a retry of one killed before its metrics
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in numeric.items()])
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if versions:
        version = versions[0].version
    else:
        version = _version_from_logged_model(client, exp, run_id, name)
        if version is None:
            version = _log_model(cfg, uri, run_id, name, local)
    for k, v in _version_tags(cfg, metrics, run_id).items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, "challenger", version)
    client.set_terminated(run_id, "FINISHED")
    return {"name": name, "version": str(version), "run_id": run_id, "parent_run_id": parent,
            "tracking_uri": uri, "model_uri": f"models:/{name}/{version}", "alias": "challenger",
            "score": metrics.get("score"), "score_metric": metrics.get("score_metric"),
            "higher_is_better": metrics.get("higher_is_better"),
            "eval_data_hash": metrics.get("eval_data_hash"), "registration_key": key}


def _version_from_logged_model(client, exp: str, run_id: str, name: str) -> str | None:
    """Register a model the run already logged (an earlier attempt stopped after logging)."""
    from mlflow.exceptions import MlflowException

    models = [m for m in client.search_logged_models([exp], f"source_run_id = '{run_id}'")
              if str(getattr(m.status, "value", m.status)) == "READY"]
    if not models:
        return None
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(name, source=models[0].model_uri, run_id=run_id,
                                     model_id=models[0].model_id)
    return mv.version


def _log_model(cfg: Config, uri: str, run_id: str, name: str, local: str) -> str:
    import mlflow

    from kubedistill.evaluate.model_dir import is_adapter_dir, load_model

    model, tokenizer, _ = load_model(local, base_ref=cfg.model.student_name_or_path,
                                     cache_dir=cfg.storage.model_cache_dir)
    with _fluent_uri(uri), mlflow.start_run(run_id=run_id):
        if is_adapter_dir(local) and cfg.model.lora_save_adapters:
            mlflow.log_artifacts(local, "adapter")
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
            task="text-generation", registered_model_name=name,
            pip_requirements=pip_requirements())
    if info.registered_model_version is None:
        raise RuntimeError(f"log_model did not register a version of {name}")
    return str(info.registered_model_version)


def register(cfg: Config) -> dict[str, Any]:
    """Register the student (see module doc); returns registration.json's content."""
    from kubedistill.models import resolve_model_path

    client, uri = _client_for(cfg)
    metrics_uri = storage.join(cfg.storage.work_dir, "eval", "metrics.json")
    metrics = storage.read_json(metrics_uri) if storage.exists(metrics_uri) else {}
    if not metrics:
        log.warning("no %s: registering without a score (run evaluate first)", metrics_uri)
    local = resolve_model_path(cfg.train.save_path, cfg.storage.model_cache_dir)
    key = _registration_key(cfg, local, metrics)
    result = with_retries(lambda: _register_once(cfg, client, uri, local, key, metrics),
                          f"registering {model_name(cfg)}", uri)
    storage.write_json_atomic(storage.join(cfg.storage.work_dir, "registry",
                                           "registration.json"), result)
    log.info("registered %s version %s (alias challenger)", result["name"], result["version"])
    return result


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def decide(challenger: dict[str, str], champion: dict[str, str] | None,
           min_improvement: float) -> tuple[bool, str]:
    """Whether the challenger (version tags + ``version``) takes ``champion``, and why."""
    if champion is None:
        return True, "first version: no champion yet"
    if champion.get("version") == challenger.get("version"):
        return True, "already champion"
    c, ch = _float(challenger.get("score")), _float(champion.get("score"))
    if c is None or ch is None:
        return False, "score missing on the " + ("challenger" if c is None else "champion")
    metric, champ_metric = challenger.get("score_metric"), champion.get("score_metric")
    if metric != champ_metric:
        return False, f"score metrics differ (challenger {metric}, champion {champ_metric})"
    if challenger.get("eval_data_hash") != champion.get("eval_data_hash"):
        return False, (f"evaluated on different data (eval_data_hash {challenger.get('eval_data_hash')}"
                       f" vs champion's {champion.get('eval_data_hash')})")
    higher = str(challenger.get("higher_is_better")).lower() == "true"
    gain = c - ch if higher else ch - c
    if gain > 0 and gain >= min_improvement:
        return True, f"{metric} {c:.6g} beats champion {ch:.6g} by {gain:.4g}"
    return False, (f"{metric} {c:.6g} does not beat champion {ch:.6g} by at least "
                   f"min_improvement={min_improvement:g} ({'higher' if higher else 'lower'} is "
                   "better)")


def _promote_once(cfg: Config, client, name: str, version: str) -> dict[str, Any]:
    """Decide, tag the decision on the challenger, THEN move ``champion``. A rerun after a
    kill between the two finds the alias on the challenger and its recorded decision, and
    reports that decision (not "already champion" against itself)."""
    from mlflow.exceptions import MlflowException

    chal = client.get_model_version(name, version)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if runs.is_unreachable(exc):
            raise
        champ = None
    chal_tags = {**chal.tags, "version": str(chal.version)}
    champ_tags = None if champ is None else {**champ.tags, "version": str(champ.version)}
    recorded = _recorded_promotion(chal.tags)
    if champ_tags is not None and champ_tags["version"] == str(version) and recorded:
        promoted, reason, previous, champ_score = True, *recorded
    else:
        promoted, reason = decide(chal_tags, champ_tags, cfg.eval.min_improvement)
        previous = None if champ is None else str(champ.version)
        champ_score = (champ_tags or {}).get("score", "")
        tags = {"promotion_decision": "promoted" if promoted else "rejected",
                "promotion_reason": reason, "challenger_score": chal_tags.get("score", ""),
                "champion_score": champ_score, "promotion_previous_champion": previous or ""}
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        if promoted:
            client.set_registered_model_alias(name, "champion", version)
    return {"promoted": promoted, "reason": reason, "name": name, "version": str(version),
            "previous_champion": previous,
            "champion": str(version) if promoted else str(champ.version),
            "challenger_score": _float(chal_tags.get("score")),
            "champion_score": _float(champ_score), "score_metric": chal_tags.get("score_metric")}


def _recorded_promotion(tags: dict[str, str]) -> tuple[str, str | None, str] | None:
    """(reason, previous champion, champion score) of a promotion already tagged on a version."""
    if tags.get("promotion_decision") != "promoted" or "promotion_previous_champion" not in tags:
        return None
    return (tags["promotion_reason"], tags["promotion_previous_champion"] or None,
            tags.get("champion_score", ""))


def promote(cfg: Config) -> dict[str, Any]:
    """Gate the ``champion`` alias (see module doc); returns promotion.json's content."""
    reg_uri = storage.join(cfg.storage.work_dir, "registry", "registration.json")
    if not storage.exists(reg_uri):
        raise DataError(f"{reg_uri} does not exist; run the register stage first")
    reg = storage.read_json(reg_uri)
    client, uri = _client_for(cfg)
    result = with_retries(lambda: _promote_once(cfg, client, reg["name"], reg["version"]),
                          f"promoting {reg['name']} version {reg['version']}", uri)
    storage.write_json_atomic(storage.join(cfg.storage.work_dir, "registry", "promotion.json"),
                              result)
    log.info("promote %s v%s: %s (%s)", result["name"], result["version"],
             "promoted" if result["promoted"] else "kept champion", result["reason"])
    return result
