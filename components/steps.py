"""The body of each KFP component, as plain functions (testable without KFP).

Every step takes the component's string parameters (recipe YAML text, overrides JSON,
work_dir, parent_run_id, pinned JSON) and its input artifacts (``upstream``), builds the
Config with :func:`kubedistill.components.common.build_config` (an input artifact's
``metadata['uri']`` sets the path the stage reads: prepared data, teacher cache, model),
calls the runtime stage, and writes small JSON artifacts that point at storage URIs.
Artifact arguments are duck-typed: an object with ``.path`` and ``.metadata`` (and
``.log_metric`` for metrics), which is what KFP passes in.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubedistill.components import common
from kubedistill.components.common import build_config, read_json_uri, run_stage, write_artifact
from kubedistill.config_values import join_uri
from kubedistill.errors import exit_code_of
from kubedistill.failures import translated

# upstream artifact name -> the Config field its metadata["uri"] sets
UPSTREAM_PATHS = {"prepared": ("storage", "prepared_path"),
                  "teacher_cache": ("storage", "teacher_cache_path"),
                  "model": ("train", "save_path")}


def _settings(args: dict[str, Any]):
    """The Config of this component; upstream artifacts (``args['upstream']``: name ->
    artifact or None) point the stage at the storage URIs their producers recorded."""
    try:
        cfg = build_config(args["recipe"], args.get("overrides", ""), args.get("work_dir", ""),
                           args.get("pinned", ""), args.get("parent_run_id", ""))
    except Exception as exc:
        common.emit("config", "error", seconds=0, error=f"{type(exc).__name__}: {exc}",
                    exit_code=exit_code_of(exc))
        raise
    for name, artifact in (args.get("upstream") or {}).items():
        uri = (getattr(artifact, "metadata", None) or {}).get("uri") if artifact else None
        if uri:
            group, field = UPSTREAM_PATHS[name]
            setattr(getattr(cfg, group), field, uri)
    return cfg


def prepare(prepared, num_shards: int = 1, **args) -> list[int]:
    """prepare stage; returns the shard indexes ``[0, num_shards)`` for the fan-out."""
    cfg = _settings(args)
    result = run_stage("prepare", cfg)
    manifest = read_json_uri(join_uri(cfg.prepared_path, "manifest.json"))
    write_artifact(prepared, manifest or result, cfg.prepared_path)
    return list(range(max(1, int(num_shards))))


def cache_teacher(shard, shard_index: int, num_shards: int, **args) -> None:
    """cache-teacher for one shard of the prepared data."""
    cfg = _settings(args)
    cfg.cache.num_shards, cfg.cache.shard_index = int(num_shards), int(shard_index)
    cfg.validate()
    result = run_stage("cache-teacher", cfg,
                       label=f"cache-teacher[{int(shard_index) + 1}/{int(num_shards)}]")
    write_artifact(shard, {"shard_index": int(shard_index), "num_shards": int(num_shards),
                           "result": result}, cfg.teacher_cache_path)


def merge_cache(teacher_cache, num_shards: int, **args) -> None:
    """merge-cache: one manifest over the shards the fan-out wrote."""
    cfg = _settings(args)
    cfg.cache.num_shards = int(num_shards)
    result = run_stage("merge-cache", cfg)
    manifest = read_json_uri(join_uri(cfg.teacher_cache_path, "manifest.json"))
    write_artifact(teacher_cache, manifest or result, cfg.teacher_cache_path)


def train(model, **args) -> str:
    """train; with ``num_nodes > 1`` a Kubeflow Trainer TrainJob runs it (see trainjob)."""
    cfg = _settings(args)
    if cfg.train.num_nodes > 1:
        path = _train_multi_node(cfg)
    else:
        path = run_stage("train", cfg)
    path = str(path or cfg.train.save_path)
    write_artifact(model, {"model_uri": path, "recipe": cfg.name,
                           "kd_algorithm": cfg.kd.kd_algorithm,
                           "student": cfg.model.student_name_or_path or ""}, path)
    return path


def _train_multi_node(cfg) -> str:
    import time

    from kubedistill.components import trainjob

    image = os.environ.get("KUBEDISTILL_IMAGE", "")
    secret_refs = json.loads(os.environ.get("KUBEDISTILL_SECRET_ENV", "{}"))
    manifest = trainjob.trainjob_manifest(
        cfg, name=trainjob.job_name(cfg, f"train-{int(time.time())}"), image=image,
        namespace=trainjob.current_namespace(),
        env=trainjob.env_for_trainjob(dict(os.environ), secret_refs))
    common.emit("train", "start", trainjob=manifest["metadata"]["name"])
    started = time.monotonic()
    trainjob.run_trainjob(manifest)
    common.emit("train", "end", seconds=round(time.monotonic() - started, 2))
    return cfg.train.save_path


def _numbers(data: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate(metrics, report, **args) -> float:
    """evaluate; logs every numeric metric and returns ``score``."""
    cfg = _settings(args)
    result = run_stage("evaluate", cfg) or {}
    uri = join_uri(cfg.storage.work_dir, "eval", "metrics.json")
    stored = read_json_uri(uri) or {}
    merged = {**stored, **(result if isinstance(result, dict) else {})}
    for key, value in _numbers(merged).items():
        metrics.log_metric(key, value)
    write_artifact(report, merged, uri)
    score = merged.get("score")
    return float(score) if isinstance(score, (int, float)) else float("nan")


def register(registration, **args) -> tuple[str, str]:
    """register; returns (decision, version): decision is 'promote' when the challenger
    should become champion (see :func:`promotion_decision`), else 'keep'."""
    cfg = _settings(args)
    result = run_stage("register", cfg) or {}
    uri = join_uri(cfg.storage.work_dir, "registry", "registration.json")
    merged = {**(read_json_uri(uri) or {}), **(result if isinstance(result, dict) else {})}
    verdict = registry_verdict(cfg, merged)
    if verdict is not None:
        merged["beats_champion"], merged["decision_reason"] = verdict
    decision = promotion_decision(merged)
    write_artifact(registration, {**merged, "decision": decision}, uri)
    return decision, str(merged.get("version", ""))


def registry_verdict(cfg, reg: dict[str, Any]) -> tuple[bool, str] | None:
    """The registry's own promotion rule (``kubedistill.tracking.registry.decide``) applied
    to the new version and the current champion; None when it cannot be asked."""
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from kubedistill.tracking.registry import decide

        client = MlflowClient(tracking_uri=reg["tracking_uri"])
        chal = client.get_model_version(reg["name"], reg["version"])
        try:
            champ = client.get_model_version_by_alias(reg["name"], "champion")
        except MlflowException:
            champ = None
        champ_tags = None if champ is None else {**champ.tags, "version": str(champ.version)}
        return decide({**chal.tags, "version": str(chal.version)}, champ_tags,
                      cfg.eval.min_improvement)
    except Exception:  # noqa: BLE001 - promote decides on its own then
        return None


def promotion_decision(reg: dict[str, Any]) -> str:
    """'promote' or 'keep' from a registration record.

    Uses, in order: ``decision``; a boolean ``beats_champion``/``should_promote``/``better``
    (register sets ``beats_champion`` from the registry's own rule); ``score`` vs
    ``champion_score`` with ``higher_is_better``; else 'promote' (nothing known: the promote
    stage itself re-checks before moving the alias).
    """
    if reg.get("decision") in ("promote", "keep"):
        return reg["decision"]
    for key in ("beats_champion", "should_promote", "better"):
        if isinstance(reg.get(key), bool):
            return "promote" if reg[key] else "keep"
    score, best = reg.get("score"), reg.get("champion_score")
    if isinstance(score, (int, float)) and isinstance(best, (int, float)):
        margin = float(reg.get("min_improvement", 0.0) or 0.0)
        higher = bool(reg.get("higher_is_better", False))
        better = score > best + margin if higher else score < best - margin
        return "promote" if better else "keep"
    return "promote"


def promote(promotion, **args) -> None:
    """promote: alias 'champion' to the challenger when its score is better."""
    cfg = _settings(args)
    result = run_stage("promote", cfg) or {}
    uri = join_uri(cfg.storage.work_dir, "registry", "promotion.json")
    write_artifact(promotion, {**(read_json_uri(uri) or {}),
                               **(result if isinstance(result, dict) else {})}, uri)


def open_run(pipeline_run: str = "", **args) -> str:
    import time

    from kubedistill.components import parent_run

    cfg = _settings(args)
    common.emit("mlflow-run", "start")
    started = time.monotonic()
    try:
        with translated(tracking_uri=parent_run.tracking_uri(cfg)):
            run_id = parent_run.open_run(cfg, pipeline_run)
    except BaseException as exc:
        common.emit("mlflow-run", "error", seconds=round(time.monotonic() - started, 2),
                    error=f"{type(exc).__name__}: {exc}", exit_code=exit_code_of(exc))
        raise
    common.emit("mlflow-run", "end", seconds=round(time.monotonic() - started, 2),
                run_id=run_id)
    return run_id


def close_run(pipeline_run: str, state: str, **args) -> str:
    """Exit step: close the parent run tagged with ``pipeline_run``; never raises."""
    from kubedistill.components import parent_run

    try:
        cfg = _settings(args)
        run_id = parent_run.find_run(cfg, pipeline_run)
    except Exception as exc:  # noqa: BLE001 - an exit task must not hide the outcome
        common.emit("mlflow-run", "closed", status="not closed", error=str(exc))
        return ""
    parent_run.sync_spooled(cfg)  # what stages could not send, and runs dead stages left
    status = parent_run.close_run(cfg, run_id or "", state)
    common.emit("mlflow-run", "closed", status=status or "not closed", state=state,
                run_id=run_id)
    return status
