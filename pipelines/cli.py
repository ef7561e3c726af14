"""``kubedistill pipeline compile|submit``.

compile: ``--pipeline NAME`` (or ``--all``) ``--target kind|gpu`` (``--all`` without
``--target``: both) ``--out DIR`` writes ``DIR/<pipeline>-<target>.yaml`` (KFP IR YAML) and
prints each path. Options: ``--image`` (default ``$KUBEDISTILL_IMAGE`` or the release image),
``--gpus-per-node`` (GPUs of one node on ``gpu``, default 8: the most one pod may request),
``--recipe R`` and ``--set key=value`` (the run's config: it sizes the GPU stages, see
:mod:`kubedistill.components.sizing`; without a recipe the defaults do), ``--toleration
key[=value]:Effect`` and ``--node-selector key=value`` (GPU stages, repeatable), ``--env
KEY=VALUE`` (plain env on every task; how a kind dev cluster's MinIO credentials reach the
pods, since target kind uses no Secrets).

submit: ``--host URL --recipe R`` compiles (``--pipeline``, ``--target``, default
off_policy_kd / gpu) and starts a run with ``kfp.Client(host).create_run_from_pipeline_package``
with arguments recipe (file text), overrides (``{"name": <recipe stem>}`` plus ``--set
key=value``), work_dir, num_shards. ``--wait`` waits (``--timeout`` seconds) and exits 0
only when the run SUCCEEDED.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from kubedistill.config import parse_overrides


def _toleration(text: str) -> dict:
    key_value, _, effect = text.partition(":")
    key, eq, value = key_value.partition("=")
    tol = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, help="runtime image of every task")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs of one node on target gpu (default 8)")
    p.add_argument("--toleration", action="append", default=[], type=_toleration,
                   metavar="KEY[=VALUE]:EFFECT", help="toleration on GPU stages")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="node selector on GPU stages")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="plain env var on every task (dev clusters: object-store access)")


def build_parser() -> argparse.ArgumentParser:
    from kubedistill.pipelines.definitions import PIPELINES
    from kubedistill.pipelines.targets import TARGETS

    parser = argparse.ArgumentParser(prog="kubedistill pipeline",
                                     description="compile or submit a KFP pipeline")
    sub = parser.add_subparsers(dest="action", required=True)
    comp = sub.add_parser("compile", help="write KFP IR YAML")
    which = comp.add_mutually_exclusive_group(required=True)
    which.add_argument("--pipeline", choices=PIPELINES)
    which.add_argument("--all", action="store_true", help="every pipeline")
    comp.add_argument("--target", choices=list(TARGETS), default=None,
                      help="default: gpu (with --all: both)")
    comp.add_argument("--out", required=True, help="output folder")
    comp.add_argument("--recipe", default=None, help="size the GPU stages for this recipe")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable)")
    _target_args(comp)
    subm = sub.add_parser("submit", help="compile and start a run on a KFP server")
    subm.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8888")
    subm.add_argument("--recipe", required=True)
    subm.add_argument("--pipeline", choices=PIPELINES, default="off_policy_kd")
    subm.add_argument("--target", choices=list(TARGETS), default="gpu")
    subm.add_argument("--work-dir", default="", help="storage URI of the run (s3://...)")
    subm.add_argument("--num-shards", type=int, default=1)
    subm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable)")
    subm.add_argument("--experiment", default=None, help="KFP experiment name")
    subm.add_argument("--run-name", default=None)
    subm.add_argument("--wait", action="store_true", help="wait for the run to finish")
    subm.add_argument("--timeout", type=int, default=24 * 3600)
    _target_args(subm)
    return parser


def run_config(recipe: str | None, sets: list[str] | None = None):
    """The Config a run of ``recipe`` with ``--set`` overrides gets (None without a recipe)."""
    if not recipe:
        return None
    from kubedistill.components.common import build_config

    args = run_arguments(recipe, sets=sets)
    return build_config(args["recipe"], args["overrides"])


def _target(args: argparse.Namespace, name: str):
    from kubedistill.pipelines.targets import get_target

    selectors = dict(s.split("=", 1) for s in args.node_selector)
    env = dict(s.split("=", 1) for s in args.env)
    return get_target(name, image=args.image, gpus_per_node=args.gpus_per_node,
                      tolerations=args.toleration, node_selector=selectors, env=env,
                      cfg=run_config(args.recipe, args.set))


def compile_pipeline(name: str, target, out_dir: str | os.PathLike) -> Path:
    """Compile pipeline ``name`` for ``target`` (a Target or a target name) into
    ``out_dir/<name>-<target>.yaml``; return the file."""
    from kfp import compiler

    from kubedistill.pipelines.definitions import build
    from kubedistill.pipelines.targets import get_target

    if isinstance(target, str):
        target = get_target(target)
    out = Path(out_dir) / f"{name}-{target.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(name, target), str(out))
    return out


def run_arguments(recipe: str, work_dir: str = "", num_shards: int = 1,
                  sets: list[str] | None = None) -> dict:
    """The pipeline arguments for a recipe file (see the module docstring)."""
    overrides: dict = {"name": Path(recipe).stem}
    pairs = [f"--{s}" if "=" in s else s for s in (sets or [])]
    overrides.update(parse_overrides(pairs))
    return {"recipe": Path(recipe).read_text(), "overrides": json.dumps(overrides),
            "work_dir": work_dir, "num_shards": num_shards}


def _compile(args: argparse.Namespace) -> int:
    from kubedistill.pipelines.definitions import PIPELINES

    names = PIPELINES if args.all else (args.pipeline,)
    targets = [args.target] if args.target else (["kind", "gpu"] if args.all else ["gpu"])
    for target_name in targets:
        target = _target(args, target_name)
        for name in names:
            print(compile_pipeline(name, target, args.out))
    return 0


def _submit(args: argparse.Namespace, client_factory=None) -> int:
    import kfp

    arguments = run_arguments(args.recipe, args.work_dir, args.num_shards, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(args.pipeline, _target(args, args.target), tmp)
        print(f"compiled {args.pipeline} for target {args.target}: "
              f"{package.stat().st_size} bytes", flush=True)
        client = (client_factory or kfp.Client)(host=args.host)
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=args.run_name,
            experiment_name=args.experiment)
    run_id = result.run_id
    print(f"submitted run {run_id} ({args.pipeline}, target {args.target}) to {args.host}")
    if not args.wait:
        return 0
    run = client.wait_for_run_completion(run_id, timeout=args.timeout)
    state = str(getattr(run, "state", "") or "")
    print(f"run {run_id} finished: {state}")
    return 0 if state.upper() == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return _compile(args) if args.action == "compile" else _submit(args)
