"""KDFlow's entry points: ``python -m kubedistill.cli.train_kd_off_policy $OPTS``.

``train_kd_off_policy``, ``train_kd_on_policy`` and ``train_sft`` take KDFlow's flags (every
one, with KDFlow's meaning and default: docs/kdflow.md) and run the matching pipeline
locally with :func:`kubedistill.pipelines.local.run` -- off-policy: prepare -> cache-teacher
-> train -> evaluate -> register -> promote; on-policy and SFT without the teacher cache.

Beyond KDFlow's flags they take ``-c/--recipe`` (a YAML recipe the flags override),
``--print_config`` (print the resolved configuration, run nothing) and any kubedistill key
(``--work_dir``, ``--max_steps``, ...). Where KDFlow and the pipeline differ on paths:

- ``save_path`` and ``ckpt_path`` keep KDFlow's meaning, relative to the current directory
  (the final model lands in ``save_path``), so they are made absolute before the pipeline
  runs; ``wandb_dir`` likewise.
- ``work_dir`` (prepared data, teacher cache, logs, the local MLflow store) defaults to
  ``./runs/<name>``; ``name`` (the registered model's name unless
  ``registered_model_name`` is set) defaults to the recipe's stem, else the last part of
  ``save_path`` (KDFlow scripts name each experiment there), else the pipeline.
- Hugging Face Hub ids (``Qwen/Qwen3-4B``, hub datasets) are fetched before any stage runs
  (:func:`fetch_hub_refs`); offline they fail in one line naming the id.
- The train stage launches torchrun itself (``num_nodes`` x ``num_gpus_per_node``), so an
  entry point started under torchrun refuses to run (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from kubedistill.config import Config, StorageConfig, TrainConfig, load_config, parse_overrides
from kubedistill.errors import ConfigError

ENTRY_POINTS = {"train_kd_off_policy": "off_policy_kd", "train_kd_on_policy": "on_policy_kd",
                "train_sft": "sft"}
_PATH_KEYS = ("save_path", "ckpt_path", "wandb_dir", "work_dir")


def build_parser(prog: str) -> argparse.ArgumentParser:
    pipeline = ENTRY_POINTS[prog]
    p = argparse.ArgumentParser(
        prog=f"python -m kubedistill.cli.{prog}", allow_abbrev=False,
        description=f"KDFlow's {prog}: run the {pipeline} pipeline locally with KDFlow's "
                    "flags (see docs/kdflow.md); every config key is a --flag.")
    p.add_argument("-c", "--recipe", default=None, help="YAML recipe the flags override")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved configuration and exit")
    return p


def _flat_key(key: str) -> str:
    return key.replace("-", "_").rsplit(".", 1)[-1]


def kdflow_overrides(argv: list[str], recipe: str | None, *, localize: bool,
                     pipeline: str) -> dict[str, Any]:
    """Config overrides from KDFlow-style ``argv`` (see the module docstring); with
    ``localize`` (local runs) ``work_dir`` gets its default and relative paths become
    absolute; without (a pod has no such cwd) both are left to the pipeline."""
    from kubedistill.pipelines.definitions import PINNED

    raw = parse_overrides(argv)
    flat = {_flat_key(k): v for k, v in raw.items()}
    base = Config()  # the recipe's values count too (validated later, by load_config)
    if recipe is not None:
        base.name = Path(recipe).stem
        base.update(yaml.safe_load(Path(recipe).read_text()) or {})
    base.update(raw)
    overrides: dict[str, Any] = dict(raw)
    if "name" not in flat and recipe is None:
        stem = os.path.basename(str(flat.get("save_path", "")).rstrip("/"))
        overrides["name"] = stem or pipeline
    name = overrides.get("name", base.name if recipe else pipeline)
    if localize:
        if "work_dir" not in flat and base.storage.work_dir == StorageConfig().work_dir:
            overrides["work_dir"] = f"./runs/{name}"
        defaults = TrainConfig()
        values = {"save_path": base.train.save_path or defaults.save_path,
                  "ckpt_path": base.train.ckpt_path or defaults.ckpt_path,
                  "wandb_dir": base.logging.wandb_dir,
                  "work_dir": overrides.get("work_dir", base.storage.work_dir)}
        for key in _PATH_KEYS:
            value = values[key]
            if value and "://" not in str(value) and not os.path.isabs(str(value)):
                overrides[key] = os.path.abspath(os.path.expanduser(str(value)))
        for key in list(overrides):  # grouped spellings were replaced by the flat ones
            if "." in key and _flat_key(key) in _PATH_KEYS:
                del overrides[key]
    overrides.update(PINNED[pipeline])
    return overrides


def resolve(prog: str, argv: list[str]) -> tuple[str | None, dict[str, Any], Config]:
    """(recipe, overrides, resolved Config) for entry point ``prog`` and its ``argv``."""
    args, rest = build_parser(prog).parse_known_args(argv)
    overrides = kdflow_overrides(rest, args.recipe, localize=True,
                                 pipeline=ENTRY_POINTS[prog])
    return args.recipe, overrides, load_config(args.recipe, overrides)


def fetch_hub_refs(cfg: Config) -> None:
    """Make the Hugging Face Hub ids among the models and datasets local before any stage
    runs (cached for the stages), so that offline they fail here, in one line naming the
    id (exit 5; 2 for an id the hub does not have)."""
    from kubedistill.config_values import split_list
    from kubedistill.models import hub

    for ref in (cfg.model.student_name_or_path, cfg.model.teacher_name_or_path):
        if hub.is_hub_id(ref):
            hub.snapshot(ref)
    for ref in split_list(cfg.data.train_dataset_path) + split_list(cfg.data.eval_dataset_path):
        if hub.is_hub_id(ref):
            hub.snapshot(ref, "dataset")


def main(prog: str, argv: list[str] | None = None) -> int:
    from kubedistill.cli import _run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, _ = build_parser(prog).parse_known_args(argv)

    def run() -> int:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"kubedistill.cli.{prog} runs the whole pipeline and launches "
                              "torchrun for the train stage itself (num_nodes x "
                              "num_gpus_per_node processes); start it with python -m, not "
                              "under torchrun")
        recipe, overrides, cfg = resolve(prog, argv)
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        from kubedistill.pipelines.local import run as run_pipeline

        fetch_hub_refs(cfg)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ok, _ = run_pipeline(recipe, overrides, ENTRY_POINTS[prog])
        return 0 if ok else 1

    return _run_guarded(run)

