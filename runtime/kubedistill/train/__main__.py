"""Worker entry point: ``torchrun ... -m kubedistill.train --config CONFIG.yaml [--key v]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kubedistill.config import load_config, parse_overrides
from kubedistill.errors import KubedistillError
from kubedistill.failures import translated
from kubedistill.procs import bind_to_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubedistill.train")
    parser.add_argument("--config", required=True, help="resolved config YAML")
    args, rest = parser.parse_known_args(argv)
    # torchrun starts workers in a session of their own: die with torchrun, however it dies
    if "TORCHELASTIC_RUN_ID" in os.environ:
        bind_to_parent(parent_runs=("torch.distributed.run", "torchrun"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, parse_overrides(rest))
    from kubedistill.train.launch import report_worker_error
    from kubedistill.train.worker import run_worker

    try:
        with translated():
            run_worker(cfg)
    except KubedistillError as exc:
        print(f"kubedistill: error: {exc}", file=sys.stderr)
        report_worker_error(cfg, int(os.environ.get("RANK", "0")), exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
