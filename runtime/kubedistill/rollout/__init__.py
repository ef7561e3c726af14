"""On-policy rollouts: the student generating from prompts.

- :mod:`kubedistill.rollout.engine`: ``RolloutEngine`` protocol, ``Sample`` (no backend import);
- :mod:`kubedistill.rollout.factory`: backend choice, ``make_rollout_engine``;
- :mod:`kubedistill.rollout.hf` / :mod:`kubedistill.rollout.sglang`: the backends;
- :mod:`kubedistill.rollout.pool`: several engines behind one (``rollout_num_engines > 1``);
- :mod:`kubedistill.rollout.sync`: FSDP2 student -> engine weight sync (buckets), EMA.

The loop that uses them is :mod:`kubedistill.train.on_policy`. Imports are lazy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"RolloutEngine": "engine", "Sample": "engine", "make_rollout_engine": "factory",
            "RolloutPool": "pool",
            "HFRolloutEngine": "hf", "SGLangRolloutEngine": "sglang"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kubedistill.rollout.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kubedistill.rollout' has no attribute {name!r}")
