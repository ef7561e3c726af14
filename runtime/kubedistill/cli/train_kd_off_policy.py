"""``python -m kubedistill.cli.train_kd_off_policy $OPTS``: KDFlow's train_kd_off_policy with KDFlow's flags.

Runs the pipeline locally, off-policy KD: prepare -> cache-teacher -> train -> evaluate -> register -> promote
(see :mod:`kubedistill.cli.kdflow` and docs/kdflow.md).
"""

import sys

from kubedistill.cli import kdflow


def main(argv: list[str] | None = None) -> int:
    return kdflow.main("train_kd_off_policy", argv)


if __name__ == "__main__":
    sys.exit(main())
