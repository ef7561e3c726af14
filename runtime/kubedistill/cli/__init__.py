"""The ``kubedistill`` command: one subcommand per stage, plus run / pipeline / models.

Every stage takes an optional recipe (``-c recipes/quickstart.yaml``) and config overrides in
KDFlow's spelling (``--kd_ratio 0.3``) or grouped (``--kd.kd_ratio 0.3``). Stage code is
imported lazily so that ``--help`` is instant and no stage pays for another's imports.

KDFlow's own entry points live beside it: ``python -m kubedistill.cli.train_kd_off_policy``,
``train_kd_on_policy`` and ``train_sft`` (see :mod:`kubedistill.cli.kdflow`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from kubedistill.config import FIELD_GROUP, GROUPS, Config, load_config, parse_overrides

# name -> (module:function taking a Config, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("kubedistill.data.prepare:prepare",
                "normalise, template and tokenize raw data into a prepared dataset"),
    "cache-teacher": ("kubedistill.teacher.cache:cache_teacher",
                      "run the teacher over prepared data and cache its hidden states"),
    "import-logprobs": ("kubedistill.teacher.import_logprobs:import_logprobs",
                        "turn top-k logprobs from vLLM/SGLang/OpenAI into a top-k teacher cache"),
    "merge-cache": ("kubedistill.teacher.cache:merge_cache",
                    "merge the manifests of a fanned-out teacher cache"),
    "train": ("kubedistill.train.launch:train",
              "train the student (off-policy, on-policy or SFT); launches torchrun"),
    "evaluate": ("kubedistill.evaluate.stage:evaluate",
                 "score the student (and the teacher baseline) on the held-out split"),
    "register": ("kubedistill.tracking.registry:register",
                 "register the trained student in MLflow with alias 'challenger'"),
    "promote": ("kubedistill.tracking.registry:promote",
                "move alias 'champion' to the challenger if its score is better"),
}

# name -> (module:function taking argv, one-line help); these parse their own arguments
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kubedistill.pipelines.local:main",
            "run a whole pipeline locally (kfp.local) from a recipe"),
    "pipeline": ("kubedistill.pipelines.cli:main", "compile or submit a KFP pipeline"),
    "tracking": ("kubedistill.tracking.heal:main",
                 "tracking sync WORK_DIR: send spooled metrics, end runs dead stages left"),
    "models": ("kubedistill.models.cli:main",
               "import packaged real models, derive students, list the model cache"),
}


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _config_help() -> str:
    lines = ["configuration keys (recipe YAML or --key value):"]
    for group, cls in GROUPS.items():
        names = [n for n, g in FIELD_GROUP.items() if g == group]
        defaults = cls()
        lines.append(f"  [{group}]")
        lines.extend(f"    --{n} (default: {getattr(defaults, n)!r})" for n in names)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubedistill",
        description="Distill a large teacher LLM/VLM into a small student, reproducibly.",
        epilog="Run 'kubedistill STAGE --help' for the configuration keys of a stage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=_config_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-c", "--recipe", help="YAML recipe (see recipes/)")
        p.add_argument("--print_config", action="store_true",
                       help="print the resolved configuration and exit")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return _run_guarded(lambda: _resolve(COMMANDS[argv[0]][0])(argv[1:]))
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2

    def stage() -> int:
        cfg: Config = load_config(args.recipe, parse_overrides(rest))
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        _resolve(STAGES[args.command][0])(cfg)
        return 0

    return _run_guarded(stage)


def _run_guarded(fn: Callable[[], int | None]) -> int:
    """Run a command; a documented failure (see :mod:`kubedistill.errors`) is one line on
    stderr and its exit code; anything else is a bug and keeps its traceback."""
    from kubedistill.failures import explain

    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print("kubedistill: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        err = explain(exc)
        if err is None:
            raise
        print(f"kubedistill: error: {err}", file=sys.stderr)
        return err.exit_code


