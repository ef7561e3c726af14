"""Shared by the benchmark scripts: run one kubedistill stage as a subprocess, timed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")


def run_stage(name: str, overrides: dict[str, object], recipe: str = QUICKSTART) -> float:
    """``kubedistill <name> -c <recipe> --key value ...``; returns its wall seconds."""
    argv = [sys.executable, "-m", "kubedistill.cli", name, "-c", recipe]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    started = time.monotonic()
    subprocess.run(argv, check=True)
    return time.monotonic() - started
