"""External failures as documented errors: one line, the URI, what to do, an exit code.

:func:`explain` looks through an exception and its causes for a failure of a service we
talk to and returns the :class:`~kubedistill.errors.KubedistillError` that reports it, or
None (a bug: let the traceback show). :func:`translated` is the context manager form that
storage calls and stage entry points use. Classified (exit code 5 unless said otherwise):

=====================  ===================================================================
object store           endpoint down or timing out; no credentials; access denied (bad key,
                       missing permission); bucket missing; throttled after retries
MLflow                 the tracking server unreachable after retries
KFP                    the Kubeflow Pipelines API host unreachable (see pipelines/cli.py)
disk                   no space left / file too large while writing (exit 5: the stage can
                       rerun once there is room; partial outputs are never visible)
=====================  ===================================================================

Classes are matched by name and module, so nothing here imports botocore, aiohttp,
requests or mlflow.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from kubedistill.errors import KubedistillError, ServiceUnavailable

_S3_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                   "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
                   "ProxyConnectionError"}
_S3_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError",
                      "CredentialRetrievalError"}
_S3_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
              "Forbidden", "AllAccessDisabled", "ExpiredToken", "InvalidToken"}
_S3_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                 "TooManyRequests", "TooManyRequestsException", "503", "ServiceUnavailable",
                 "RequestThrottled"}
_S3_MODULES = ("botocore", "aiobotocore", "s3fs", "aiohttp")


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and len(out) < 12 and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def s3_endpoint() -> str:
    """The S3 endpoint in use (the environment's, else AWS's default)."""
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or "the AWS S3 default endpoint")


def _s3_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        return str(error.get("Code") or response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode") or "") or None
    return None


def _is_s3(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _S3_MODULES


def _where(uri: str | None) -> str:
    return f" ({uri})" if uri else ""


def _explain_s3(chain: list[BaseException], uri: str | None) -> ServiceUnavailable | None:
    endpoint = s3_endpoint()
    for exc in chain:
        name = type(exc).__name__
        if not _is_s3(exc):
            continue
        if name in _S3_UNREACHABLE:
            return ServiceUnavailable(
                f"object store at {endpoint} is unreachable{_where(uri)}: {name}. Check that "
                "it is up and that AWS_ENDPOINT_URL names it, then rerun the stage.")
        if name in _S3_NO_CREDENTIALS:
            return ServiceUnavailable(
                f"no credentials for the object store at {endpoint}{_where(uri)}: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a cluster: the object-store "
                "Secret), then rerun the stage.")
        code = _s3_code(exc)
        if code in _S3_DENIED:
            return ServiceUnavailable(
                f"the object store at {endpoint} denied access{_where(uri)} ({code}): check "
                "that the credentials are valid and may read/write this bucket.")
        if code == "NoSuchBucket":
            return ServiceUnavailable(
                f"bucket does not exist on the object store at {endpoint}{_where(uri)}: "
                "create it or fix the URI.")
        if code in _S3_THROTTLED:
            return ServiceUnavailable(
                f"the object store at {endpoint} kept throttling requests{_where(uri)} "
                f"({code}) after retries: lower the request rate (fewer parallel shards) "
                "or rerun later.")
    return None


def _explain_mlflow(chain: list[BaseException], tracking_uri: str | None
                    ) -> ServiceUnavailable | None:
    from kubedistill.tracking.runs import is_unreachable

    mlflowish = any(type(e).__module__.split(".")[0] in ("mlflow", "requests", "urllib3")
                    for e in chain)
    if mlflowish and is_unreachable(chain[0]):
        where = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "the tracking server"
        return ServiceUnavailable(
            f"MLflow at {where} is unreachable ({type(chain[0]).__name__}): check that the "
            "tracking server is up and MLFLOW_TRACKING_URI names it, then rerun the stage.")
    return None


def _explain_disk(chain: list[BaseException], uri: str | None) -> ServiceUnavailable | None:
    for exc in chain:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            target = uri or getattr(exc, "filename", None) or "a local file"
            return ServiceUnavailable(
                f"no room to write {target}: {os.strerror(exc.errno)}. Free space (or raise "
                "the volume's size) and rerun the stage; nothing partial was published.")
    return None


def explain(exc: BaseException, uri: str | None = None,
            tracking_uri: str | None = None) -> KubedistillError | None:
    """The documented error for an external failure in ``exc``'s chain, else None."""
    if isinstance(exc, KubedistillError):
        return exc
    chain = _chain(exc)
    return (_explain_s3(chain, uri) or _explain_disk(chain, uri)
            or _explain_mlflow(chain, tracking_uri))


@contextlib.contextmanager
def translated(uri: str | None = None, tracking_uri: str | None = None) -> Iterator[None]:
    """Re-raise an external failure inside the block as its documented error."""
    try:
        yield
    except KubedistillError:
        raise
    except Exception as exc:
        err = explain(exc, uri, tracking_uri)
        if err is None:
            raise
        raise err from exc
