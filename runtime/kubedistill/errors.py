"""Errors a user can act on. Each carries the CLI exit code that reports it.

Exit codes: 0 success, 1 unexpected failure (a bug: traceback shown), 2 configuration or usage
error, 3 bad input data, 4 a stored artifact does not match (cache key, checksum, manifest),
5 an external service (MLflow, object store, KFP) stayed unreachable after retries.
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
