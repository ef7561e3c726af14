"""The tracker interface every stage logs through, and the null tracker.

Stages never branch on whether tracking is on: they always hold a ``Tracker``; the default
``NullTracker`` accepts everything and does nothing.
"""

from __future__ import annotations

from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """A tracker that records nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass
