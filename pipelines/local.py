"""``kubedistill run RECIPE [--pipeline NAME] [--key value ...]``: a whole pipeline, locally.

The same KFP pipeline as on a cluster, executed by ``kfp.local``: with ``--runner
subprocess`` (the default) by ``SubprocessRunner(use_venv=False)`` in this Python
environment (no cluster, no Docker); with ``--runner docker`` by ``DockerRunner``, each stage
in its own container of the runtime image (``--image``, default ``$KUBEDISTILL_IMAGE`` or the
release image; :mod:`kubedistill.pipelines.docker_runner`).
Config overrides use the stage CLI's spelling (``--max_samples 64``); ``--num_shards`` sets
the teacher fan-out. Everything lands in one run directory, the recipe's ``work_dir``:
stage outputs, ``kfp/`` (KFP's artifacts), ``pipeline.log`` (everything kfp.local and the
stages print) and the local MLflow store.

The terminal shows one line per stage start/end with timing, then a summary: metrics,
registry decision, locations, and the command that opens the MLflow UI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from kubedistill.components.common import MARKER
from kubedistill.config import load_config, parse_overrides


class ProgressFilter(io.TextIOBase):
    """A stdout stand-in: every line goes to ``log``; progress lines are echoed to ``out``."""

    def __init__(self, log, out, started: float):
        self.log, self.out, self.started = log, out, started
        self.buffer_text = ""
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            self.log.write(text)
            self.buffer_text += text
            *lines, self.buffer_text = self.buffer_text.split("\n")
            for line in lines:
                self._show(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.out.flush()

    def _show(self, line: str) -> None:
        at = line.find(MARKER)
        if at < 0:
            return
        try:
            event = json.loads(line[at + len(MARKER):])
        except json.JSONDecodeError:
            return
        self.events.append(event)
        self.out.write(format_event(event, time.monotonic() - self.started) + "\n")
        self.out.flush()


def format_event(event: dict[str, Any], elapsed: float) -> str:
    clock = time.strftime("%H:%M:%S", time.gmtime(elapsed))
    stage, kind = event.get("stage", "?"), event.get("event", "?")
    if kind == "start":
        what = "started"
    elif kind == "end":
        what = f"done in {event.get('seconds', 0):.1f}s"
    elif kind == "error":
        what = f"FAILED after {event.get('seconds', 0):.1f}s: {event.get('error', '')}"
    else:
        what = f"{kind} ({event.get('status', '')})"
    return f"  [{clock}] {stage:<22} {what}"


def last_traceback(text: str, limit: int = 12) -> list[str]:
    """The end (``limit`` lines) of the last Python traceback in ``text``, up to and
    including its ``SomeError: message`` line ([] if there is none)."""
    lines = [line.strip() for line in text.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if not starts:
        return []
    block = []
    for line in lines[starts[-1]:]:
        if line and not set(line) <= set("^~ "):
            block.append(line)
        if re.match(r"^[A-Za-z_][\w.]*: ", line) and not line.startswith("File "):
            break
    return block[-limit:]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summarize(cfg, run_dir: Path, ok: bool, seconds: float, log_path: Path) -> str:
    """The end-of-run summary text (see the module docstring)."""
    from kubedistill.components.parent_run import tracking_uri

    lines = [f"kubedistill run {cfg.name}: {'SUCCEEDED' if ok else 'FAILED'} "
             f"in {seconds:.0f}s"]
    metrics = _read_json(run_dir / "eval" / "metrics.json") or {}
    numbers = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines.append("  metrics:   " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))
    reg = _read_json(run_dir / "registry" / "registration.json")
    if reg:
        lines.append(f"  registry:  {reg.get('name', reg.get('model_name', '?'))} version "
                     f"{reg.get('version', '?')} -> alias challenger")
    promo = _read_json(run_dir / "registry" / "promotion.json")
    if promo:
        verdict = promo.get("promoted", promo.get("decision", "?"))
        verdict = {True: "champion", False: "not promoted"}.get(verdict, verdict)
        reason = promo.get("reason")
        lines.append(f"  promotion: {verdict}" + (f" ({reason})" if reason else ""))
    elif reg:
        reason = reg.get("decision_reason") or "score does not beat the champion"
        lines.append(f"  promotion: not promoted ({reason})")
    lines += [f"  run dir:   {run_dir}", f"  model:     {cfg.train.save_path}",
              f"  log:       {log_path}"]
    uri = tracking_uri(cfg)
    if uri is None:
        lines.append("  MLflow:    tracking off")
    elif uri.startswith("sqlite:"):
        lines.append(f"  MLflow UI: mlflow ui --backend-store-uri {uri}")
    else:
        lines.append(f"  MLflow:    {uri}")
    return "\n".join(lines)


@contextlib.contextmanager
def _root_logging_to(stream):
    """Send the root logger (kfp.local logs outside its own context too) to ``stream``."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [logging.StreamHandler(stream)]
    try:
        yield
    finally:
        root.handlers = saved


def build_parser() -> argparse.ArgumentParser:
    from kubedistill.pipelines.definitions import PIPELINES

    p = argparse.ArgumentParser(prog="kubedistill run",
                                description="run a whole pipeline locally (kfp.local)")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    p.add_argument("--pipeline", choices=PIPELINES, default="off_policy_kd")
    p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="docker: each stage in its own container of --image")
    p.add_argument("--image", default=None, help="runtime image (--runner docker)")
    return p


@contextlib.contextmanager
def make_runner(runner: str, run_dir: Path, pipeline_root: Path):
    """The kfp.local runner called ``runner`` for a run in ``run_dir``, for the run."""
    from kfp import local

    if runner == "docker":
        from kubedistill.pipelines.docker_runner import docker_runner

        with docker_runner(run_dir, pipeline_root) as docker:
            yield docker
    else:
        yield local.SubprocessRunner(use_venv=False)


def run(recipe: str | None, overrides: dict[str, Any] | None = None,
        pipeline: str = "off_policy_kd", out=None, runner: str = "subprocess",
        image: str | None = None) -> tuple[bool, Path]:
    """Run ``pipeline`` for ``recipe`` (None: the overrides alone, as KDFlow's entry points
    pass them) under kfp.local with ``runner`` (subprocess | docker); return (succeeded,
    run_dir)."""
    from kfp import local

    from kubedistill.components.common import build_config
    from kubedistill.pipelines.definitions import build
    from kubedistill.pipelines.targets import get_target

    out = out or sys.stdout
    overrides = {"name": Path(recipe).stem if recipe else "default", **(overrides or {})}
    cfg = load_config(recipe, overrides)  # fail fast on a bad recipe, before kfp starts
    run_dir = Path(cfg.storage.work_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_text = Path(recipe).read_text() if recipe else ""
    cfg = build_config(recipe_text, json.dumps(overrides), str(run_dir))
    log_path = run_dir / "pipeline.log"
    out.write(f"kubedistill run {cfg.name}: pipeline {pipeline}, run dir {run_dir}\n"
              f"  (kfp.local output: {log_path})\n")
    out.flush()
    started = time.monotonic()
    ok = False
    with open(log_path, "w", buffering=1) as log:
        progress = ProgressFilter(log, out, started)
        with contextlib.redirect_stdout(progress), contextlib.redirect_stderr(progress), \
                _root_logging_to(progress), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            with make_runner(runner, run_dir, run_dir / "kfp") as kfp_runner:
                local.init(runner=kfp_runner, pipeline_root=str(run_dir / "kfp"),
                           raise_on_error=True)
                job = build(pipeline, get_target("local", image=image))
                try:
                    job(recipe=recipe_text, overrides=json.dumps(overrides),
                        work_dir=str(run_dir), num_shards=cfg.cache.num_shards)
                    ok = True
                except RuntimeError as exc:
                    log.write(f"\n{exc}\n")
                    ok = False
    failure = failed_stage(progress.events) if not ok else None
    if failure is not None and failure.get("exit_code", 1) != 1:
        out.write(f"  error: {failure.get('error', '')}\n")  # documented: one line
    elif not ok:
        trace = last_traceback(log_path.read_text())
        if trace:
            out.write("  the failing stage's traceback (end):\n"
                      + "\n".join("    " + t for t in trace) + "\n")
    out.write(summarize(cfg, run_dir, ok, time.monotonic() - started, log_path) + "\n")
    out.flush()
    return ok, run_dir


def failed_stage(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first ``error`` progress event of a run (the stage that failed), or None."""
    return next((e for e in events if e.get("event") == "error"), None)


def exit_code(run_dir: str | Path) -> int:
    """The exit code of a failed run: the documented code of the stage that failed, read
    from its ``error`` progress line in ``pipeline.log`` (1 when none says)."""
    events = []
    for line in (Path(run_dir) / "pipeline.log").read_text(errors="replace").splitlines():
        at = line.find(MARKER)
        if at >= 0:
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line[at + len(MARKER):]))
    failure = failed_stage(events)
    return int(failure.get("exit_code", 1)) if failure else 1


def main(argv: list[str] | None = None) -> int:
    """``kubedistill run``: exits 0, or with the failing stage's exit code (3 data, 4
    artifact mismatch, 5 service, 130 interrupted; see kubedistill.errors)."""
    args, rest = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.runner == "docker":
        from kubedistill.components.stages import IMAGE
        from kubedistill.pipelines.docker_runner import docker_status

        args.image = args.image or IMAGE
        problem = docker_status(args.image)
        if problem:
            sys.stderr.write(f"kubedistill run --runner docker: {problem}\n")
            return 2
    ok, run_dir = run(args.recipe, parse_overrides(rest), args.pipeline, runner=args.runner,
                      image=args.image)
    return 0 if ok else exit_code(run_dir)
