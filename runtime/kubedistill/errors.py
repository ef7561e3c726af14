"""Errors a user can act on. Each carries the CLI exit code that reports it.

Exit codes: 0 success, 1 unexpected failure (a bug: traceback shown), 2 configuration or usage
error, 3 bad input data, 4 a stored artifact does not match (cache key, checksum, manifest),
5 an external service or resource failed: MLflow, the object store or the KFP host stayed
unreachable after retries or refused us (credentials, access, missing bucket, throttling), or
a disk filled up (see :mod:`kubedistill.failures`), 130 interrupted (SIGINT).
Every code but 1 comes with one line on stderr and no traceback; ``kubedistill run`` exits
with the code of the stage that failed.
"""


class KubedistillError(Exception):
    exit_code = 1


class ConfigError(KubedistillError, ValueError):
    """A configuration problem; the message names the key (and the closest valid one)."""

    exit_code = 2


class DataError(KubedistillError):
    """Input data that cannot be used; the message names the file, row and field."""

    exit_code = 3


class ArtifactMismatch(KubedistillError):
    """A stored artifact does not match what this run expects (key, checksum, schema)."""

    exit_code = 4


class ServiceUnavailable(KubedistillError):
    """An external service stayed unreachable after retries."""

    exit_code = 5


class StageFailed(KubedistillError):
    """A failure reported by another process (a torchrun worker, a pipeline stage), carried
    with that process's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = int(exit_code)


def exit_code_of(exc: BaseException) -> int:
    """The documented exit code for ``exc`` (1 for a bug)."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, KubedistillError):
        return exc.exit_code
    return 1
