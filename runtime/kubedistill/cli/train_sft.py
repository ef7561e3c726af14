"""``python -m kubedistill.cli.train_sft $OPTS``: KDFlow's train_sft with KDFlow's flags.

Runs the pipeline locally, SFT: prepare -> train on the reference answers -> evaluate -> register -> promote
(see :mod:`kubedistill.cli.kdflow` and docs/kdflow.md).
"""

import sys

from kubedistill.cli import kdflow


def main(argv: list[str] | None = None) -> int:
    return kdflow.main("train_sft", argv)


if __name__ == "__main__":
    sys.exit(main())
