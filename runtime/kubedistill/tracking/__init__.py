"""Tracking: the Tracker interface (null by default), MLflow logging (:mod:`.mlflow_tracker`),
registration and promotion (:mod:`.registry`).

``make_tracker(cfg, stage)`` is what every stage calls: an :class:`MlflowTracker` logging to a
nested run of the pipeline's parent run, or a :class:`NullTracker` when tracking is off
(``tracking_uri: none``, a remote ``work_dir`` without a tracking URI) or on a rank other than 0.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from kubedistill.tracking.base import NullTracker, Tracker

if TYPE_CHECKING:
    from kubedistill.config import Config

__all__ = ["NullTracker", "Tracker", "make_tracker"]
log = logging.getLogger(__name__)


def make_tracker(cfg: Config, stage: str) -> Tracker:
    """The tracker for ``stage`` of the run described by ``cfg`` (see module doc)."""
    if os.environ.get("RANK", "0") != "0":
        return NullTracker()
    from kubedistill.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    if uri is None:
        log.info("MLflow tracking is off for stage %s (tracking_uri %s, work_dir %s)", stage,
                 cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                 cfg.storage.work_dir)
        return NullTracker()
    from kubedistill.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(cfg, stage, uri)
