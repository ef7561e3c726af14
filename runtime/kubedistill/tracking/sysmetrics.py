"""System metrics (CPU, memory, disk, GPU memory) sampled in a background thread.

Samples go through the tracker's own ``log_metrics`` (so they are buffered like any other
metric while the server is down) under MLflow's names (``system/cpu_utilization_percentage``
...). Needs ``psutil``; without it nothing is sampled. The interval is
``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10);
``KUBEDISTILL_SYSTEM_METRICS=0`` turns sampling off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def sample() -> dict[str, float]:
    import psutil

    mem = psutil.virtual_memory()
    out = {"system/cpu_utilization_percentage": psutil.cpu_percent(),
           "system/system_memory_usage_megabytes": (mem.total - mem.available) / 2**20,
           "system/system_memory_usage_percentage": mem.percent}
    try:
        disk = psutil.disk_usage(os.getcwd())
        out["system/disk_usage_percentage"] = disk.percent
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                out[f"system/gpu_{i}_memory_usage_megabytes"] = \
                    torch.cuda.memory_allocated(i) / 2**20
    except Exception:  # GPU stats are best effort
        pass
    return out


class SystemSampler:
    """Calls ``log(metrics, step)`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, log: Callable[[dict[str, float], int], None],
                 interval: float | None = None):
        self.log = log
        self.interval = interval or float(
            os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        if os.environ.get("KUBEDISTILL_SYSTEM_METRICS", "1").lower() in ("0", "false", "off"):
            return False
        try:
            import psutil  # noqa: F401
        except ImportError:
            return False
        return True

    def start(self) -> SystemSampler:
        self._thread = threading.Thread(target=self._run, name="kubedistill-sysmetrics",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        step = 0
        while not self._stop.wait(self.interval):
            try:
                self.log(sample(), step)
            except Exception:  # sampling must never break the run
                pass
            step += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
