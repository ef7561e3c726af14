"""Named training runs shared by the torchrun comparison tests (each launched once)."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

from kubedistill.config import Config
from kubedistill.train.launch import train


class Runs:
    """Launches each named run once per module; ``get(name)`` -> ``outputs(cfg)`` of it.

    Run ``name`` is ``base`` + ``over`` with its own work_dir / save_path / ckpt_path under
    ``root / name``."""

    def __init__(self, base: dict, root, outputs: Callable[[Config], dict]):
        self.base, self.root, self.outputs, self.done = base, root, outputs, {}

    def config(self, name: str, **over) -> Config:
        cfg, wd = Config(), self.root / name
        values = dict(self.base, work_dir=str(wd), save_path=str(wd / "model"),
                      ckpt_path=str(wd / "ckpt"), **over)
        for k, v in values.items():
            cfg.set(k, v)
        return cfg

    def get(self, name: str, **over) -> dict:
        if name not in self.done:
            cfg = self.config(name, **over)
            assert train(cfg) == cfg.train.save_path
            self.done[name] = self.outputs(cfg)
        return self.done[name]


@contextmanager
def reproducible_cpu():
    """One thread per rank (one rank must not oversubscribe the shared cores) and MKL in its
    reproducible mode (without it, runs on this CPU differ now and then around 1e-7); the
    environment is restored afterwards."""
    env = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def losses(run: dict, key: str = "train/loss") -> np.ndarray:
    return np.array([r[key] for r in run["train"]])
