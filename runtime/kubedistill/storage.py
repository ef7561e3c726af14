"""Storage URIs through fsspec: local paths, ``file://``, ``s3://``, ``memory://``.

Large artifacts (prepared data, teacher shards, checkpoints, models) live at storage URIs.
S3 settings come only from the environment (never from a recipe): ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and an optional endpoint in ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL`` or ``FSSPEC_S3_ENDPOINT_URL`` (for MinIO, KFP's object store, moto).

Contract of :func:`write_bytes_atomic`: a reader never sees a partly written file. Locally it
writes a temporary sibling and renames it; on object stores a single PUT is already atomic.
Object stores have no folders: :func:`makedirs` is a no-op there and nothing here creates a
bucket, so a mistyped bucket is an error, not a new bucket. Failures of the store (endpoint
down, no credentials, access denied, no bucket, throttling) and a full disk leave these
functions as the one-line errors of :mod:`kubedistill.failures`, naming the URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kubedistill.failures import translated


def _s3_options() -> dict[str, Any]:
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or os.environ.get("FSSPEC_S3_ENDPOINT_URL"))
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds ``uri`` and the path inside it."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options = _s3_options() if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def local_path(uri: str) -> str:
    """The OS path of a local URI (``file:///x`` -> ``/x``); raises for remote URIs."""
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"{uri} is not on the local filesystem")
    return path



def local_dir_for(uri: str) -> str:
    """A local directory standing for ``uri``: the directory itself when local, else a
    stable temporary directory named after the URI."""
    if is_local(uri):
        return local_path(uri)
    import tempfile

    tag = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "kubedistill-work", tag)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])


def exists(uri: str) -> bool:
    with translated(uri):
        fs, path = filesystem(uri)
        return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with translated(uri):
            fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    with translated(uri):
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that ``uri`` is either absent, old, or complete (see module doc)."""
    with translated(uri):
        fs, path = filesystem(uri)
        if not isinstance(fs, LocalFileSystem):
            with fs.open(path, "wb") as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # a full disk must not keep the partial temp file
            raise


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory to ``uri`` (no-op when ``uri`` is that same directory)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem) and os.path.abspath(path) == os.path.abspath(local_dir):
        return
    with translated(uri):
        fs.put(local_dir.rstrip("/") + "/", path, recursive=True)


def download_dir(uri: str, local_dir: str) -> str:
    """Make the directory at ``uri`` available locally; returns the local path."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    os.makedirs(local_dir, exist_ok=True)
    with translated(uri):
        fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, chunk: int = 1 << 22) -> str:
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    with translated(uri), fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
