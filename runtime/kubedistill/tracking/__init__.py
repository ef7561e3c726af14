"""Tracking: the Tracker interface (null by default) and, in submodules, MLflow logging,
registration and promotion."""

from kubedistill.tracking.base import NullTracker, Tracker

__all__ = ["NullTracker", "Tracker"]
