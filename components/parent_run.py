"""The MLflow parent run of one pipeline run: opened first, closed by the exit handler.

The tracking package owns the rules (:mod:`kubedistill.tracking.runs`): tracking URI
(``tracking_uri`` <- ``$MLFLOW_TRACKING_URI`` <- ``sqlite:///{work_dir}/mlflow.db``; None
means tracking is off), experiment, and the parent run tagged
``kubedistill.pipeline_run_id`` = the KFP run id with role ``parent``. Stage runs nest
under it (components pass ``parent_run_id``).

The exit task may depend on no other task, so it finds the parent by that tag
(:func:`find_run`) and marks it terminated: KFP state SUCCEEDED -> FINISHED,
CANCELED/CANCELLED -> KILLED, anything else -> FAILED. Before that it syncs the stages'
spooled metrics and ends the runs dead stages left RUNNING (:func:`sync_spooled`). Closing
never raises: an exit task that fails would hide the real outcome of the pipeline.
"""

from __future__ import annotations

import logging

from kubedistill.config import Config

log = logging.getLogger(__name__)


def tracking_uri(cfg: Config) -> str | None:
    from kubedistill.tracking.runs import resolve_tracking_uri

    return resolve_tracking_uri(cfg)


def mlflow_status(kfp_state: str) -> str:
    state = (kfp_state or "").upper()
    if state == "SUCCEEDED":
        return "FINISHED"
    if state in ("CANCELED", "CANCELLED"):
        return "KILLED"
    return "FAILED"


def open_run(cfg: Config, pipeline_run: str) -> str:
    """Create (or find) the parent run of ``pipeline_run``; its id, '' when tracking is off."""
    from mlflow import MlflowClient

    from kubedistill.tracking import runs

    uri = tracking_uri(cfg)
    if uri is None:
        return ""
    from kubedistill.tracking.registry import with_retries

    cfg.tracking.pipeline_run_id = pipeline_run or cfg.tracking.pipeline_run_id
    client = MlflowClient(tracking_uri=uri)
    return with_retries(
        lambda: runs.parent_run_id(client, cfg, uri, runs.experiment_id(client, cfg, uri)),
        "opening the pipeline's parent run", uri)


def find_run(cfg: Config, pipeline_run: str) -> str | None:
    """The parent run that :func:`open_run` made for ``pipeline_run`` (None if none)."""
    from mlflow import MlflowClient

    from kubedistill.tracking.runs import TAG_PIPELINE, TAG_ROLE

    uri = tracking_uri(cfg)
    if uri is None or not pipeline_run:
        return None
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    if exp is None:
        return None
    found = client.search_runs(
        [exp.experiment_id], max_results=1,
        filter_string=f"tags.`{TAG_PIPELINE}` = '{pipeline_run}' and "
                      f"tags.`{TAG_ROLE}` = 'parent'")
    return found[0].info.run_id if found else None


def sync_spooled(cfg: Config) -> dict:
    """Send what the stages of this work dir spooled while MLflow was down and end the runs
    that dead stages left RUNNING (:mod:`kubedistill.tracking.heal`); never raises."""
    from kubedistill import storage
    from kubedistill.tracking.heal import replay_quietly

    uri = tracking_uri(cfg)
    if uri is None or not storage.is_local(cfg.storage.work_dir):
        return {"runs": [], "metrics": 0}
    return replay_quietly(storage.local_path(cfg.storage.work_dir), uri)


def close_run(cfg: Config, run_id: str, kfp_state: str) -> str:
    """Mark the parent run terminated; return the MLflow status written ('' if none)."""
    if not run_id:
        return ""
    status = mlflow_status(kfp_state)
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=tracking_uri(cfg)).set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        log.warning("could not close MLflow parent run %s: %s", run_id, exc)
        return ""
    return status
