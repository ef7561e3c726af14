"""The teacher: engines that return final hidden states, the cache stage and its reader.

- :mod:`kubedistill.teacher.engine`: ``TeacherEngine`` protocol, backend choice;
- :mod:`kubedistill.teacher.hf` / :mod:`kubedistill.teacher.sglang`: the backends;
- :mod:`kubedistill.teacher.cache`: ``cache_teacher(cfg)``, ``merge_cache(cfg)``;
- :mod:`kubedistill.teacher.reader`: ``TeacherCache``, ``TeacherStates``;
- :mod:`kubedistill.teacher.key`: ``expected_cache_key(cfg)``;
- :mod:`kubedistill.teacher.head`: ``TeacherHead`` (logits from hidden states).

Imports are lazy (attribute access) so that ``import kubedistill.teacher`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TeacherEngine": "engine", "make_engine": "engine", "resolve_backend": "engine",
    "HFTeacherEngine": "hf", "cache_teacher": "cache", "merge_cache": "cache",
    "TeacherCache": "reader", "TeacherStates": "reader", "expected_cache_key": "key",
    "TeacherHead": "head",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kubedistill.teacher.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kubedistill.teacher' has no attribute {name!r}")
