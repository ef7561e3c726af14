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

submit: ``--host URL [--recipe R] [KDFlow flags...]`` compiles (``--pipeline``,
``--target``, default off_policy_kd / gpu) and starts a run with
``kfp.Client(host).create_run_from_pipeline_package`` with arguments recipe (file text, or
'' without one), overrides (``{"name": ...}`` plus every config flag in KDFlow's spelling,
``--kd_ratio 0.3 --use_wandb True ...`` as :mod:`kubedistill.cli.kdflow` reads them, plus
``--set key=value``), work_dir, num_shards; the flags are validated before anything is
compiled. Relative paths stay relative: in a pod they mean ``{work_dir}/...``. ``--wait`` waits (``--timeout`` seconds) and exits 0
only when the run SUCCEEDED.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


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
    subm = sub.add_parser("submit", help="compile and start a run on a KFP server; any "
                          "other --flag is a config key (KDFlow's flags included)",
                          allow_abbrev=False)
    subm.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8888")
    subm.add_argument("--recipe", default=None)
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


def run_config(arguments: dict | None):
    """The Config a run with these pipeline ``arguments`` (:func:`run_arguments`) gets."""
    if arguments is None:
        return None
    from kubedistill.components.common import build_config

    return build_config(arguments["recipe"], arguments["overrides"])


def _target(args: argparse.Namespace, name: str, arguments: dict | None = None):
    """Target ``name`` with the CLI's placement options, its GPU stages sized for the run
    that ``arguments`` describe (unsized without them)."""
    from kubedistill.pipelines.targets import get_target

    selectors = dict(s.split("=", 1) for s in args.node_selector)
    env = dict(s.split("=", 1) for s in args.env)
    return get_target(name, image=args.image, gpus_per_node=args.gpus_per_node,
                      tolerations=args.toleration, node_selector=selectors, env=env,
                      cfg=run_config(arguments))


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


def run_arguments(recipe: str | None, work_dir: str = "", num_shards: int = 1,
                  sets: list[str] | None = None, flags: list[str] | None = None,
                  pipeline: str = "off_policy_kd") -> dict:
    """The pipeline arguments for a recipe file and/or KDFlow-style ``flags`` (see the
    module docstring); raises ConfigError on a bad flag."""
    from kubedistill.cli.kdflow import kdflow_overrides
    from kubedistill.config import load_config

    pairs = list(flags or []) + [f"--{s}" if "=" in s else s for s in (sets or [])]
    overrides: dict = {"name": Path(recipe).stem} if recipe else {}
    overrides.update(kdflow_overrides(pairs, recipe, localize=False, pipeline=pipeline))
    load_config(recipe, overrides)  # the whole recipe, checked before anything is sent
    return {"recipe": Path(recipe).read_text() if recipe else "",
            "overrides": json.dumps(overrides), "work_dir": work_dir,
            "num_shards": num_shards}


def _compile(args: argparse.Namespace) -> int:
    from kubedistill.pipelines.definitions import PIPELINES

    names = PIPELINES if args.all else (args.pipeline,)
    targets = [args.target] if args.target else (["kind", "gpu"] if args.all else ["gpu"])
    arguments = run_arguments(args.recipe, sets=args.set) if args.recipe else None
    for target_name in targets:
        target = _target(args, target_name, arguments)
        for name in names:
            print(compile_pipeline(name, target, args.out))
    return 0


def _submit(args: argparse.Namespace, client_factory=None, flags: list[str] | None = None,
            ) -> int:
    """Submit (see the module docstring); the recipe is validated first, and a KFP host that
    cannot be reached is ServiceUnavailable (exit 5) naming it."""
    arguments = run_arguments(args.recipe, args.work_dir, args.num_shards, args.set, flags,
                              args.pipeline)
    try:
        return _submit_to(args, arguments, client_factory)
    except Exception as exc:
        from kubedistill.errors import KubedistillError, ServiceUnavailable
        from kubedistill.tracking.runs import is_unreachable

        if isinstance(exc, KubedistillError) or not is_unreachable(exc):
            raise
        raise ServiceUnavailable(
            f"KFP API at {args.host} is unreachable ({type(exc).__name__}): check --host "
            "(e.g. a running `kubectl port-forward` to ml-pipeline-ui) and retry") from exc


def _submit_to(args: argparse.Namespace, arguments: dict, client_factory=None) -> int:
    import kfp

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(args.pipeline, _target(args, args.target, arguments), tmp)
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
    parser = build_parser()
    args, flags = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.action == "compile":
        if flags:
            parser.error(f"unrecognized arguments: {' '.join(flags)}")
        return _compile(args)
    return _submit(args, flags=flags)
