"""The MLflow tracker: a nested run per stage under one parent run per pipeline run.

Contract (the :class:`~kubedistill.tracking.base.Tracker` protocol, plus ``log_text`` and
``log_curves``): every call queues an operation and tries to send the queue. The tracker
never raises because the server is unreachable: metrics, params, tags and artifacts wait in
memory (metrics are also appended to ``{work_dir}/mlflow_spool/<stage>-<pid>.jsonl``) and are
sent in order once the server answers again. While it is down, a send is retried at most every
``KUBEDISTILL_MLFLOW_RETRY_INTERVAL`` seconds (default 5) with a short REST timeout
(``KUBEDISTILL_MLFLOW_TIMEOUT``, default 5 s, no MLflow-level retries) so a training step is
never held up for long, and ONE warning is printed per outage. ``close`` flushes, uploads the
curves of all step metrics (``plots/metrics.png``) and the stage's manifests, and ends the run.
Requests the server answers with an error (a bad value) are dropped with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.tracking import heal, runs
from kubedistill.tracking.plots import plot_curves, read_records
from kubedistill.tracking.sysmetrics import SystemSampler

log = logging.getLogger(__name__)
BATCH = 1000  # MLflow's log_batch limit for metrics (params/tags: 100)


@dataclass
class _Op:
    kind: str  # metrics | params | tags | artifact | text | terminate
    payload: Any
    spooled: bool = False


class MlflowTracker:
    def __init__(self, cfg: Config, stage: str, tracking_uri: str):
        from mlflow import MlflowClient

        self.cfg, self.stage, self.uri = cfg, stage, tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.retry_interval = float(os.environ.get("KUBEDISTILL_MLFLOW_RETRY_INTERVAL", "5"))
        self.timeout = int(os.environ.get("KUBEDISTILL_MLFLOW_TIMEOUT", "5"))
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._lock = threading.RLock()
        self._pending: deque[_Op] = deque()
        self._history: list[dict] = []
        self._down_since: float | None = None
        self._last_try = 0.0
        self._start_ms = int(time.time() * 1000)
        self._tmp = tempfile.mkdtemp(prefix="kubedistill-track-")
        self._closed = False
        local = storage.is_local(cfg.storage.work_dir)
        spool_dir = (os.path.join(storage.local_path(cfg.storage.work_dir), "mlflow_spool")
                     if local else os.path.join(self._tmp, "spool"))
        self.spool_path = os.path.join(spool_dir, f"{stage}-{os.getpid()}-"
                                                  f"{uuid.uuid4().hex[:6]}.jsonl")
        self.journal_path = self.spool_path[:-len(".jsonl")] + heal.JOURNAL_SUFFIX
        self._journal = heal.new_journal(cfg, stage, tracking_uri, self._start_ms)
        if local:
            heal.write_journal(self.journal_path, self._journal)
        self._queue(_Op("tags", runs.run_tags(cfg, stage)))
        self._params: dict[str, str] = runs.config_params(cfg)
        self._queue(_Op("params", dict(self._params)))
        self._queue(_Op("text", (cfg.to_yaml(), "config/config.yaml")))
        if self._flush(force=True) and local:  # reachable: settle what earlier stages left
            heal.replay_quietly(storage.local_path(cfg.storage.work_dir), tracking_uri,
                                skip=(self.journal_path,), timeout=self.timeout)
        self._sampler = (SystemSampler(lambda m, s: self.log_metrics(m, s, _history=False))
                         .start() if SystemSampler.available() else None)

    # ---- Tracker protocol ---------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Params are write-once in MLflow: a key already logged with another value is skipped
        (with a warning) instead of failing the whole batch."""
        clean = {}
        for k, v in params.items():
            if runs.is_secret_name(k):
                continue
            v = str(v)[:6000]
            if self._params.get(k, v) != v:
                log.warning("param %s already logged as %r; not changing it to %r", k,
                            self._params[k], v)
                continue
            clean[k] = self._params[k] = v
        if clean:
            self._submit(_Op("params", clean))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, *,
                    _history: bool = True) -> None:
        ts = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                entries.append((key, float(value), ts, int(step or 0)))
            except (TypeError, ValueError):
                continue
        if not entries:
            return
        if _history and step is not None:
            self._history.append({"step": step, **{k: v for k, v, _, _ in entries}})
        self._submit(_Op("metrics", entries))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._submit(_Op("artifact", (local_path, artifact_path)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit(_Op("tags", {k: str(v) for k, v in tags.items() if v is not None}))

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self._closed = True
        if self._sampler is not None:
            self._sampler.stop()
        self.log_curves(self._history, "metrics")
        self._log_stage_files()
        self._queue(_Op("terminate", status))
        if self._flush_within(self.cfg.tracking.tracking_end_wait_s):
            for path in (self.spool_path, self.journal_path):
                if os.path.exists(path):
                    os.remove(path)
        else:
            n = self._pending_metrics()
            self._spool()
            if os.path.exists(self.journal_path):
                heal.write_journal(self.journal_path, {**self._journal, "status": status})
            log.warning("MLflow at %s still unreachable at the end of stage %s after waiting "
                        "%gs; %d metrics were not sent (kept in %s; `kubedistill tracking sync` "
                        "or the next stage sends them)", self.uri, self.stage,
                        self.cfg.tracking.tracking_end_wait_s, n, self.spool_path)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _flush_within(self, seconds: float) -> bool:
        """Flush, retrying every ``retry_interval`` for at most ``seconds`` (the bounded wait
        for the server at a stage's end, ``tracking_end_wait_s``)."""
        deadline = time.monotonic() + max(0.0, seconds)
        while not self._flush(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.retry_interval, left))
        return True

    # ---- extras -------------------------------------------------------------------------
    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(_Op("text", (text, artifact_file)))

    def log_curves(self, records: list[dict], name: str = "train_curves") -> None:
        """Plot ``[{step, metric...}]`` records as ``plots/<name>.png`` (if any)."""
        if len({r.get("step") for r in records}) < 2:
            return
        path = plot_curves(records, os.path.join(self._tmp, f"{name}.png"),
                           f"{self.cfg.name}: {self.stage}")
        if path:
            self.log_artifact(path, "plots")

    # ---- queue --------------------------------------------------------------------------
    def _queue(self, op: _Op) -> None:
        with self._lock:
            if op.kind == "artifact" and self._down_since is not None:
                op.payload = self._keep_copy(*op.payload)
            self._pending.append(op)

    def _submit(self, op: _Op) -> None:
        with self._lock:
            self._queue(op)
            if not self._flush():
                self._spool()

    def _keep_copy(self, path: str, artifact_path: str | None) -> tuple[str, str | None]:
        """Copy an artifact aside while it waits, so the caller may delete its file."""
        dst = os.path.join(self._tmp, "pending", uuid.uuid4().hex[:8])
        os.makedirs(dst, exist_ok=True)
        target = os.path.join(dst, os.path.basename(path.rstrip("/")))
        (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, target)
        return target, artifact_path

    def _pending_metrics(self) -> int:
        return sum(len(op.payload) for op in self._pending if op.kind == "metrics")

    def _spool(self) -> None:
        import json

        lines = []
        for op in self._pending:
            if op.kind == "artifact" and not op.spooled and not op.payload[0].startswith(
                    self._tmp):
                op.payload = self._keep_copy(*op.payload)
            if op.kind == "metrics" and not op.spooled:
                lines += [json.dumps({"run_id": self.run_id, "key": k, "value": v,
                                      "timestamp": t, "step": s}) for k, v, t, s in op.payload]
            op.spooled = True
        if lines:
            os.makedirs(os.path.dirname(self.spool_path), exist_ok=True)
            with open(self.spool_path, "a") as f:
                f.write("\n".join(lines) + "\n")

    # ---- sending ------------------------------------------------------------------------
    def _flush(self, force: bool = False) -> bool:
        """Send the queue in order; False (and nothing raised) if the server is unreachable."""
        with self._lock:
            now = time.monotonic()
            if (self._down_since is not None and not force
                    and now - self._last_try < self.retry_interval):
                return False
            self._last_try = now
            try:
                with runs.http_settings(self.timeout, 0):
                    if self.run_id is None:
                        self._create_runs()
                    while self._pending:
                        ops = self._take_batch()
                        try:
                            self._send(ops)
                        except Exception as exc:
                            if runs.is_unreachable(exc):
                                raise
                            log.warning("MLflow rejected %s for run %s: %s", ops[0].kind,
                                        self.run_id, str(exc).splitlines()[0][:300])
                        for _ in ops:
                            self._pending.popleft()
            except Exception as exc:
                if not runs.is_unreachable(exc):
                    raise
                self._went_down(exc)
                return False
            self._came_back()
            return True

    def _take_batch(self) -> list[_Op]:
        """The head op, or the run of consecutive metric ops that fits one request."""
        first = self._pending[0]
        if first.kind != "metrics":
            return [first]
        ops, n = [], 0
        for op in self._pending:
            if op.kind != "metrics" or (ops and n + len(op.payload) > BATCH):
                break
            ops.append(op)
            n += len(op.payload)
        return ops

    def _send(self, ops: list[_Op]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        op, rid, c = ops[0], self.run_id, self.client
        if op.kind == "metrics":
            metrics = [Metric(k, v if math.isfinite(v) else float("nan"), t, s)
                       for o in ops for k, v, t, s in o.payload]
            for i in range(0, len(metrics), BATCH):
                c.log_batch(rid, metrics=metrics[i:i + BATCH])
        elif op.kind in ("params", "tags"):
            items = list(op.payload.items())
            for i in range(0, len(items), 100):
                chunk = items[i:i + 100]
                if op.kind == "params":
                    c.log_batch(rid, params=[Param(k, v) for k, v in chunk])
                else:
                    c.log_batch(rid, tags=[RunTag(k, v) for k, v in chunk])
        elif op.kind == "artifact":
            path, artifact_path = op.payload
            (c.log_artifacts if os.path.isdir(path) else c.log_artifact)(
                rid, path, artifact_path)
        elif op.kind == "text":
            c.log_text(rid, *op.payload)
        elif op.kind == "terminate":
            c.set_terminated(rid, op.payload)
            c.set_terminated(self.parent_run_id, op.payload)

    def _create_runs(self) -> None:
        self.experiment_id = runs.experiment_id(self.client, self.cfg, self.uri)
        self.parent_run_id = runs.parent_run_id(self.client, self.cfg, self.uri,
                                                self.experiment_id)
        self.client.update_run(self.parent_run_id, status="RUNNING")
        run = self.client.create_run(
            self.experiment_id, start_time=self._start_ms, run_name=self.stage,
            tags={"mlflow.parentRunId": self.parent_run_id, **runs.run_tags(self.cfg,
                                                                           self.stage)})
        self.run_id = run.info.run_id
        self._journal.update(run_id=self.run_id, parent_run_id=self.parent_run_id)
        if os.path.exists(self.journal_path):
            heal.write_journal(self.journal_path, self._journal)

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("MLflow at %s unreachable; buffering %d metrics, will retry every "
                        "%gs (spool: %s). Cause: %s", self.uri, self._pending_metrics(),
                        self.retry_interval, self.spool_path, str(exc).splitlines()[0][:200])

    def _came_back(self) -> None:
        if self._down_since is None:
            return
        log.info("MLflow at %s reachable again after %.0fs; buffered metrics sent", self.uri,
                 time.monotonic() - self._down_since)
        self._down_since = None
        if os.path.exists(self.spool_path):
            os.remove(self.spool_path)

    def _log_stage_files(self) -> None:
        """The stage's manifests and reports (:func:`runs.stage_files`), plus train curves."""
        for uri, folder in runs.stage_files(self.cfg, self.stage):
            try:
                if not storage.exists(uri):
                    continue
                dst = os.path.join(self._tmp, "files", folder, uri.rsplit("/", 1)[-1])
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "wb") as f:
                    f.write(storage.read_bytes(uri))
            except OSError:
                continue
            self.log_artifact(dst, folder)
            if uri.endswith("train_log.jsonl"):
                self.log_curves(read_records(dst), "train_curves")
