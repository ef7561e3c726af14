"""What every KFP component runs inside its container: config, progress lines, artifacts.

Component functions are serialised by source, so they cannot share code with each other;
they import this module instead (it is installed in the runtime image as
``kubedistill.components.common``). Nothing here imports KFP.

Contracts:
- :func:`build_config` makes the same ``Config`` in every component of a pipeline run:
  defaults <- recipe YAML text <- overrides JSON <- ``work_dir`` <- ``pinned`` JSON (values a
  pipeline fixes, e.g. ``kd_algorithm: sft``), KDFlow's alias flags mapped
  (:mod:`kubedistill.kdflow_flags`), then ``validate()``. Relative
  ``save_path``/``ckpt_path`` mean nothing in a pod, so they become ``{work_dir}/model`` and
  ``{work_dir}/checkpoints`` (absolute paths and URIs are kept).
- :func:`run_stage` prints one progress line before and one after the stage, each
  ``@@kubedistill {json}`` with ``stage``, ``event`` (start|end|error) and ``seconds``;
  ``kubedistill run`` shows only these lines on the terminal. An ``error`` line also carries
  ``exit_code``, the stage's documented exit code (:mod:`kubedistill.errors`), which
  ``kubedistill run`` exits with; external failures are translated first
  (:mod:`kubedistill.failures`).
- :func:`write_artifact` writes a small JSON document to a KFP artifact's local path and
  puts the storage URI it points at into ``metadata["uri"]``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import time
from typing import Any

from kubedistill import kdflow_flags
from kubedistill.config import Config
from kubedistill.config_values import parse_yaml
from kubedistill.errors import ConfigError, exit_code_of
from kubedistill.failures import translated
from kubedistill.procs import bind_to_parent

MARKER = "@@kubedistill "

STAGE_FUNCTIONS = {
    "prepare": "kubedistill.data.prepare:prepare",
    "cache-teacher": "kubedistill.teacher.cache:cache_teacher",
    "merge-cache": "kubedistill.teacher.cache:merge_cache",
    "train": "kubedistill.train.launch:train",
    "evaluate": "kubedistill.evaluate.stage:evaluate",
    "register": "kubedistill.tracking.registry:register",
    "promote": "kubedistill.tracking.registry:promote",
}


def _is_relative_path(path: str | None) -> bool:
    return bool(path) and "://" not in path and not os.path.isabs(path)


def _loads(text: str | None, what: str) -> dict[str, Any]:
    if not text or not text.strip():
        return {}
    if what.endswith("JSON"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{what}:{exc.lineno}:{exc.colno}: {exc.msg}") from None
    else:
        data = parse_yaml(text, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    return data


def build_config(recipe: str, overrides: str = "", work_dir: str = "",
                 pinned: str = "", parent_run_id: str = "") -> Config:
    """The run's Config from recipe YAML text, overrides JSON, work_dir and pinned JSON."""
    cfg = Config()
    cfg.update(_loads(recipe, "recipe YAML"))
    cfg.update(_loads(overrides, "overrides JSON"))
    if work_dir:
        cfg.storage.work_dir = work_dir
    base = cfg.storage.work_dir.rstrip("/")
    if _is_relative_path(cfg.train.save_path):
        cfg.train.save_path = f"{base}/model"
    if _is_relative_path(cfg.train.ckpt_path):
        cfg.train.ckpt_path = f"{base}/checkpoints"
    cfg.update(_loads(pinned, "pinned JSON"))
    if parent_run_id:
        cfg.tracking.parent_run_id = parent_run_id
    return kdflow_flags.apply(cfg).validate()


def emit(stage: str, event: str, **fields: Any) -> None:
    """Print one machine-readable progress line (see the module docstring)."""
    print(MARKER + json.dumps({"stage": stage, "event": event, **fields}, default=str),
          flush=True)


def stage_function(stage: str):
    """The runtime function of ``stage``."""
    return resolve(STAGE_FUNCTIONS[stage])


def resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _tracking_uri(cfg: Config) -> str | None:
    try:
        from kubedistill.tracking.runs import resolve_tracking_uri

        return resolve_tracking_uri(cfg)
    except Exception:  # noqa: BLE001 - only used to name the server in a message
        return None


def run_stage(stage: str, cfg: Config, label: str | None = None) -> Any:
    """Call the runtime function of ``stage`` on ``cfg``, with progress lines and timing."""
    label = label or stage
    bind_to_parent(signal.SIGTERM)  # a killed `kubedistill run` / launcher takes us along
    emit(label, "start")
    started = time.monotonic()
    try:
        with translated(tracking_uri=_tracking_uri(cfg)):
            result = stage_function(stage)(cfg)
    except BaseException as exc:
        emit(label, "error", seconds=round(time.monotonic() - started, 2),
             error=f"{type(exc).__name__}: {exc}", exit_code=exit_code_of(exc))
        raise
    emit(label, "end", seconds=round(time.monotonic() - started, 2))
    return result


def _scalar_items(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool))}


def write_artifact(artifact: Any, payload: Any, uri: str | None = None) -> None:
    """Write ``payload`` as JSON to ``artifact.path``; record ``uri`` and scalar fields."""
    os.makedirs(os.path.dirname(artifact.path) or ".", exist_ok=True)
    with open(artifact.path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True, default=str)
    if uri:
        artifact.metadata["uri"] = uri
    if isinstance(payload, dict):
        for key, value in _scalar_items(payload).items():
            artifact.metadata.setdefault(key, value)


def read_artifact(artifact: Any) -> dict[str, Any]:
    """The JSON document an upstream component wrote with :func:`write_artifact`."""
    with open(artifact.path) as fh:
        return json.load(fh)


def read_json_uri(uri: str) -> dict[str, Any] | None:
    """A JSON file at a storage URI, or None when it does not exist."""
    from kubedistill import storage

    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)
