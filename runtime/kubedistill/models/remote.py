"""A local copy of a model directory that lives at a remote storage URI (``s3://...``).

Contract of :func:`local_model_copy`:

- The copy is keyed by the remote directory's CONTENT, not by its URI: the key is
  ``sha256`` over the sorted listing ``(relative name, size, ETag or checksum)`` of every
  file under the URI (the modification time stands in only where the store gives no content
  tag). A model retrained to the same URI lists differently, so it gets a fresh copy; an
  unchanged one is reused without downloading.
- Every call revalidates: it lists the remote directory (one request) and checks that the
  local copy holds each listed file at its listed size. A copy that lost a file, or one whose
  download died part-way, is not served: it is fetched again.
- Downloads are atomic: files land in ``{copy}.partial-*`` and the folder is renamed into
  place only when complete, so ``{copy}`` never exists half-written. Older copies of the same
  URI are removed once a new one is in place (downloads still under way are left alone).

Layout: ``{tempdir}/kubedistill-models/{sha256(uri)[:16]}/{content key[:16]}/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid

from kubedistill import storage
from kubedistill.errors import ConfigError

log = logging.getLogger(__name__)

#: Listing fields that identify a file's content, first match wins (S3 / GCS / Azure / other).
CONTENT_TAGS = ("ETag", "etag", "md5Hash", "content_md5", "checksum", "sha256")
#: Fallbacks when a store tags no content: a rewrite changes the modification time.
TIME_TAGS = ("LastModified", "last_modified", "mtime", "updated", "created")


def remote_listing(uri: str) -> dict[str, tuple[int, str]]:
    """``{relative name: (size, content tag)}`` for every file under the directory ``uri``."""
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    listing = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        name = path[len(root):].lstrip("/")
        tag = next((str(info[k]) for k in CONTENT_TAGS if info.get(k)), None) or \
            next((str(info[k]) for k in TIME_TAGS if info.get(k)), "")
        listing[name] = (int(info.get("size") or 0), tag)
    return listing


def content_key(listing: dict[str, tuple[int, str]]) -> str:
    text = "\n".join(f"{name}\0{size}\0{tag}" for name, (size, tag) in sorted(listing.items()))
    return storage.sha256_bytes(text.encode())


def _is_complete(local: str, listing: dict[str, tuple[int, str]]) -> bool:
    for name, (size, _) in listing.items():
        path = os.path.join(local, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def cache_root() -> str:
    return os.path.join(tempfile.gettempdir(), "kubedistill-models")


def local_model_copy(uri: str) -> str:
    """A complete local copy of the model directory at ``uri`` (see the module contract)."""
    listing = remote_listing(uri)
    if "config.json" not in listing:
        raise ConfigError(f"model path {uri} holds no config.json (is it an HF directory?)")
    uri_dir = os.path.join(cache_root(), storage.sha256_bytes(uri.encode())[:16])
    local = os.path.join(uri_dir, content_key(listing)[:16])
    if _is_complete(local, listing):
        return local
    shutil.rmtree(local, ignore_errors=True)  # a damaged copy of this content
    partial = f"{local}.partial-{uuid.uuid4().hex[:8]}"
    try:
        storage.download_dir(uri, partial)
        if not _is_complete(partial, listing):
            raise ConfigError(f"model at {uri} changed while it was being downloaded; retry")
        try:
            os.replace(partial, local)
        except OSError:  # another process put the same content in place first
            if not _is_complete(local, listing):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for other in os.listdir(uri_dir):  # older contents of this URI (not others' downloads)
        if other != os.path.basename(local) and ".partial-" not in other:
            shutil.rmtree(os.path.join(uri_dir, other), ignore_errors=True)
    log.info("model %s copied to %s", uri, local)
    return local
