"""Named training runs shared by the torchrun comparison tests (each launched once)."""

from __future__ import annotations

from collections.abc import Callable

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
