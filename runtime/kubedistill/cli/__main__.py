"""``python -m kubedistill.cli``: the ``kubedistill`` command."""

import sys

from kubedistill.cli import main

sys.exit(main())
