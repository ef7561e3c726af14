"""Tracking heals: what a stage could not send to MLflow is sent later, and a run that a
dead stage left RUNNING is ended.

Every :class:`~kubedistill.tracking.mlflow_tracker.MlflowTracker` with a local ``work_dir``
keeps a journal ``{work_dir}/mlflow_spool/<stage>-<pid>-<id>.run.json`` (stage, pid, host,
tracking URI, start time, config, and once known the MLflow run ids) beside its spool of
unsent metrics ``<same>.jsonl``. A stage that closes with everything sent deletes both; one
that ends while the server is down writes its final status into the journal; one that dies
leaves the journal without a status.

:func:`replay` settles every journal of a work dir (except those of stages still alive on
this host): it creates the stage run if the server never saw it (with its params and tags),
sends the spooled metrics the run does not hold yet (by key, step and value, so a replay is
idempotent and the run's metrics equal what the stage logged: its ``train_log.jsonl`` for
train), ends the run with the journal's status, or FAILED for a stage that died, and deletes
the journal. It is run by

- the next stage of the same pipeline run (the tracker, once it reaches the server),
- the exit handler (the close-run component),
- ``kubedistill tracking sync WORK_DIR [--tracking_uri URI]`` (exit 5 if the server is down).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import socket
import sys
from typing import Any

from kubedistill.errors import ServiceUnavailable

log = logging.getLogger(__name__)
SPOOL_DIR = "mlflow_spool"
JOURNAL_SUFFIX = ".run.json"
DEAD_STATUS = "FAILED"  # a stage that died without closing its run


def spool_dir(work_dir: str) -> str:
    return os.path.join(work_dir, SPOOL_DIR)


def write_journal(path: str, journal: dict[str, Any]) -> None:
    """Atomically (re)write a journal file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(journal, f, default=str)
    os.replace(tmp, path)


def new_journal(cfg, stage: str, tracking_uri: str, start_ms: int) -> dict[str, Any]:
    return {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
            "tracking_uri": tracking_uri, "start_ms": start_ms, "config": cfg.to_dict(),
            "run_id": None, "parent_run_id": None, "status": None}


def _alive(journal: dict[str, Any]) -> bool:
    """True for a stage still running on this host (its journal must be left alone)."""
    if journal.get("status") or journal.get("host") != socket.gethostname():
        return False
    pid = int(journal.get("pid") or 0)
    if pid <= 0 or pid == os.getpid():
        return pid == os.getpid()
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        return True


def _spooled(spool_path: str) -> list[dict[str, Any]]:
    out = []
    if os.path.exists(spool_path):
        with open(spool_path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
    return out


def _config(journal: dict[str, Any]):
    from kubedistill.config import Config

    cfg = Config()
    data = dict(journal.get("config") or {})
    cfg.name = str(data.pop("name", "default"))
    cfg.update(data)
    return cfg


def _ensure_run(client, journal: dict[str, Any], uri: str) -> str:
    """The stage run of ``journal``, created (under its parent run) if never created."""
    from kubedistill.tracking import runs

    if journal.get("run_id"):
        return journal["run_id"]
    cfg = _config(journal)
    exp_id = runs.experiment_id(client, cfg, uri)
    parent = runs.parent_run_id(client, cfg, uri, exp_id)
    stage = journal["stage"]
    run = client.create_run(exp_id, start_time=journal.get("start_ms"), run_name=stage,
                            tags={"mlflow.parentRunId": parent, **runs.run_tags(cfg, stage)})
    from mlflow.entities import Param

    params = list(runs.config_params(cfg).items())
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params[i:i + 100]])
    journal.update(run_id=run.info.run_id, parent_run_id=parent)
    return run.info.run_id


def _send_missing(client, run_id: str, entries: list[dict[str, Any]]) -> int:
    """Log the entries the run does not hold yet; returns how many were sent."""
    import math

    from mlflow.entities import Metric

    have: dict[str, set] = {}
    todo = []
    for e in entries:
        key = e["key"]
        if key not in have:
            have[key] = {(m.step, m.value) for m in client.get_metric_history(run_id, key)}
        value = float(e["value"]) if math.isfinite(float(e["value"])) else float("nan")
        if (int(e["step"]), value) in have[key]:
            continue
        have[key].add((int(e["step"]), value))
        todo.append(Metric(key, value, int(e["timestamp"]), int(e["step"])))
    for i in range(0, len(todo), 1000):
        client.log_batch(run_id, metrics=todo[i:i + 1000])
    return len(todo)


def replay(work_dir: str, tracking_uri: str | None = None, *, skip: tuple[str, ...] = (),
           timeout: int = 5) -> dict[str, Any]:
    """Settle every journal under ``work_dir`` (see the module docstring). Returns
    ``{"runs": [run ids settled], "metrics": n sent}``; ServiceUnavailable when the server
    cannot be reached (the journals are kept for the next try)."""
    from mlflow import MlflowClient

    from kubedistill.tracking import runs

    settled: list[str] = []
    sent = 0
    for path in sorted(glob.glob(os.path.join(spool_dir(work_dir), "*" + JOURNAL_SUFFIX))):
        if path in skip:
            continue
        try:
            with open(path) as f:
                journal = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if _alive(journal):
            continue
        uri = tracking_uri or journal["tracking_uri"]
        spool_path = path[:-len(JOURNAL_SUFFIX)] + ".jsonl"
        client = MlflowClient(tracking_uri=uri)
        try:
            with runs.http_settings(timeout, 0):
                run_id = _ensure_run(client, journal, uri)
                write_journal(path, journal)  # a second replay must not create another run
                entries = [e for e in _spooled(spool_path) if e.get("run_id") in (None, run_id)]
                sent += _send_missing(client, run_id, entries)
                status = journal.get("status") or DEAD_STATUS
                for rid in (run_id, journal.get("parent_run_id")):  # as the stage's close does
                    if rid and client.get_run(rid).info.status in ("RUNNING", "SCHEDULED"):
                        client.set_terminated(rid, status)
        except Exception as exc:
            if runs.is_unreachable(exc):
                raise ServiceUnavailable(
                    f"MLflow at {uri} is unreachable: {len(settled)} stage run(s) synced, "
                    f"the rest is kept in {spool_dir(work_dir)}; rerun `kubedistill tracking "
                    f"sync {work_dir}` once the server is up") from exc
            raise
        for p in (spool_path, path):
            if os.path.exists(p):
                os.remove(p)
        settled.append(run_id)
        log.info("tracking: synced stage run %s (%s) from %s", run_id, journal["stage"], path)
    return {"runs": settled, "metrics": sent}


def replay_quietly(work_dir: str, tracking_uri: str | None = None, **kw) -> dict[str, Any]:
    """:func:`replay` that logs instead of raising (for stages and the exit handler)."""
    try:
        return replay(work_dir, tracking_uri, **kw)
    except Exception as exc:  # noqa: BLE001 - healing must never fail a stage
        log.warning("tracking: could not sync the spooled runs of %s: %s", work_dir,
                    str(exc).splitlines()[0][:300])
        return {"runs": [], "metrics": 0}


def main(argv: list[str] | None = None) -> int:
    """``kubedistill tracking sync WORK_DIR [--tracking_uri URI]``."""
    parser = argparse.ArgumentParser(prog="kubedistill tracking")
    sub = parser.add_subparsers(dest="action", required=True)
    sync = sub.add_parser("sync", help="send what stages spooled while MLflow was down, and "
                                       "end runs that dead stages left RUNNING")
    sync.add_argument("work_dir")
    sync.add_argument("--tracking_uri", "--tracking-uri", default=None,
                      help="default: the URI each stage used")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from kubedistill import storage

    result = replay(storage.local_path(args.work_dir), args.tracking_uri)
    print(f"synced {len(result['runs'])} stage run(s), {result['metrics']} metric value(s)")
    return 0
