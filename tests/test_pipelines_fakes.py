"""Stand-in stages for tests of the pipeline plumbing (no tests here).

Selected through ``$KUBEDISTILL_STAGE_IMPL`` in the environment of kfp.local's subprocesses
(with this folder on ``PYTHONPATH``). Each writes what docs/contracts.md says its stage
writes, at the same locations, with tiny contents. ``FAKE_FAIL_STAGE`` names a stage that
raises instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STAGES = ("prepare", "cache-teacher", "merge-cache", "train", "evaluate", "register",
          "promote")


def impl_env() -> dict[str, str]:
    here = str(Path(__file__).parent)
    mapping = {s: f"test_pipelines_fakes:{s.replace('-', '_')}" for s in STAGES}
    return {"KUBEDISTILL_STAGE_IMPL": json.dumps(mapping),
            "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}


def _maybe_fail(stage: str) -> None:
    if os.environ.get("FAKE_FAIL_STAGE") == stage:
        raise RuntimeError(f"fake failure in {stage}")


def _write(path: str, data: dict) -> dict:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data))
    return data


def prepare(cfg):
    _maybe_fail("prepare")
    return _write(f"{cfg.prepared_path}/manifest.json",
                  {"schema_version": 1, "data_hash": "abc", "train": {"rows": 4}})


def cache_teacher(cfg):
    _maybe_fail("cache-teacher")
    i = cfg.cache.shard_index
    return _write(f"{cfg.teacher_cache_path}/shard-{i:05d}.manifest.json",
                  {"shard_index": i, "num_shards": cfg.cache.num_shards})


def merge_cache(cfg):
    _maybe_fail("merge-cache")
    shards = sorted(p.name for p in Path(cfg.teacher_cache_path).glob("shard-*.manifest.json"))
    return _write(f"{cfg.teacher_cache_path}/manifest.json", {"shards": shards})


def train(cfg):
    _maybe_fail("train")
    _write(f"{cfg.train.save_path}/config.json", {"algorithm": cfg.kd.kd_algorithm})
    return cfg.train.save_path


def evaluate(cfg):
    _maybe_fail("evaluate")
    return _write(f"{cfg.storage.work_dir}/eval/metrics.json", {"eval_ce": 2.5, "score": 2.5})


def register(cfg):
    _maybe_fail("register")
    return _write(f"{cfg.storage.work_dir}/registry/registration.json",
                  {"name": cfg.tracking.registered_model_name or cfg.name, "version": "1",
                   "score": 2.5, "parent_run_id": cfg.tracking.parent_run_id})


def promote(cfg):
    _maybe_fail("promote")
    return _write(f"{cfg.storage.work_dir}/registry/promotion.json",
                  {"promoted": True, "reason": "no champion yet"})
