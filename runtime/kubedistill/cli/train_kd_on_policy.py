"""``python -m kubedistill.cli.train_kd_on_policy $OPTS``: KDFlow's train_kd_on_policy with KDFlow's flags.

Runs the pipeline locally, on-policy KD: prepare -> train (rollouts scored by a live teacher) -> evaluate -> register -> promote
(see :mod:`kubedistill.cli.kdflow` and docs/kdflow.md).
"""

import sys

from kubedistill.cli import kdflow


def main(argv: list[str] | None = None) -> int:
    return kdflow.main("train_kd_on_policy", argv)


if __name__ == "__main__":
    sys.exit(main())
