"""``train(cfg) -> save_path``: the train stage's entry point.

Outside ``torchrun`` it writes the resolved config to ``{work_dir}/train/config.yaml`` and
starts ``torchrun`` with ``num_gpus_per_node`` processes per node (on CPU: the number of
processes), ``num_nodes`` nodes (then ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` or
torchrun's ``PET_*`` variables name the rendezvous, as Kubeflow Trainer sets them), and
waits. Under ``torchrun`` it runs the worker (:func:`kubedistill.train.worker.run_worker`)
in this process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from kubedistill import storage
from kubedistill.config import Config
from kubedistill.errors import KubedistillError, StageFailed
from kubedistill.procs import die_with_parent

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def local_work_dir(cfg: Config) -> str:
    """A local directory for this run's local files (``work_dir`` itself when local)."""
    return storage.local_dir_for(cfg.storage.work_dir)


def torchrun_command(cfg: Config, config_file: str) -> list[str]:
    t = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc_per_node={t.num_gpus_per_node}"]
    if t.num_nodes > 1:
        cmd += [f"--nnodes={t.num_nodes}"]
        for flag, var in (("node_rank", "NODE_RANK"), ("master_addr", "MASTER_ADDR"),
                          ("master_port", "MASTER_PORT")):
            if var in os.environ:
                cmd.append(f"--{flag}={os.environ[var]}")
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "kubedistill.train", "--config", config_file]


def train(cfg: Config, tracker_factory: Callable | None = None) -> str:
    """Train the student; returns ``cfg.train.save_path`` (the final HF directory).

    ``tracker_factory(cfg, stage) -> Tracker`` is used on rank 0 when running in this
    process (under torchrun); spawned workers find ``kubedistill.tracking.make_tracker``.
    """
    if under_torchrun():
        from kubedistill.train.worker import run_worker

        return run_worker(cfg, tracker_factory)
    cfg.validate(cfg.train.num_nodes * cfg.train.num_gpus_per_node)
    config_file = os.path.join(local_work_dir(cfg), "train", "config.yaml")
    os.makedirs(os.path.dirname(config_file), exist_ok=True)
    with open(config_file, "w") as f:
        f.write(cfg.to_yaml())
    errors_dir = worker_errors_dir(cfg)
    shutil.rmtree(errors_dir, ignore_errors=True)
    cmd = torchrun_command(cfg, config_file)
    log.info("launching: %s", " ".join(cmd))
    rc = subprocess.call(cmd, preexec_fn=die_with_parent)
    if rc != 0:
        reported = _first_worker_error(errors_dir)
        if reported is not None:
            raise StageFailed(reported["message"], reported["exit_code"])
        raise KubedistillError(f"training failed: torchrun exited with code {rc} "
                               "(the worker's error is printed above)")
    return cfg.train.save_path


def worker_errors_dir(cfg: Config) -> str:
    """Where a torchrun worker leaves its documented error (``rank-<r>.json``: message and
    exit code) for the launcher, since torchrun itself exits 1 for any worker failure."""
    return os.path.join(local_work_dir(cfg), "train", "worker_errors")


def report_worker_error(cfg: Config, rank: int, exc: KubedistillError) -> None:
    path = os.path.join(worker_errors_dir(cfg), f"rank-{rank}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"message": str(exc), "exit_code": exc.exit_code}, f)


def _first_worker_error(errors_dir: str) -> dict | None:
    if not os.path.isdir(errors_dir):
        return None
    names = sorted(os.listdir(errors_dir), key=lambda n: int(n.split("-")[1].split(".")[0]))
    for name in names:
        try:
            with open(os.path.join(errors_dir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None
