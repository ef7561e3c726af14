"""``kubedistill run --runner docker``: every stage in its own container of the runtime image.

:func:`docker_runner` makes the ``kfp.local.DockerRunner`` that runs each task's container
the way the chart runs pods:

- the run directory is bind-mounted at its own absolute path, so the recipe's ``work_dir``,
  the stage outputs, KFP's pipeline root (inside it) and the local MLflow store (sqlite in
  it) are the same paths inside and outside;
- no network (``network_mode="none"``; hostname ``localhost``, so that torchrun's
  rendezvous resolves its own host name without DNS and stays on loopback), so inputs
  come from the image (packaged models and data) or the run directory;
- read-only root filesystem, a tmpfs ``/tmp`` that is also ``HOME``, every capability
  dropped, ``no-new-privileges``, a 1 GiB ``/dev/shm``;
- non-root: the caller's uid:gid, or uid 1000 (the image's user) when the caller is root;
  then the run directory is handed to uid 1000, and for the run the caller's umask is 0 so
  that the folders kfp.local makes there (one per run and task) are writable for it.

:func:`docker_status` says whether a Docker daemon answers and the image is present
(``None`` when it is, else the reason), so callers can fail early with a clear message.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

IMAGE_UID = 1000


def docker_status(image: str) -> str | None:
    """None when the daemon answers and ``image`` exists locally, else why not."""
    try:
        import docker
    except ImportError:
        return "the 'docker' Python package is not installed (pip install docker)"
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable daemon
        return f"no Docker daemon answers ({type(exc).__name__}: {exc})"
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return f"image {image} is not present locally (build it: make images)"
    finally:
        client.close()
    return None


def _hand_over(run_dir: Path, uid: int) -> None:
    for root, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, uid)
    os.chown(run_dir, uid, uid)


@contextlib.contextmanager
def docker_runner(run_dir: Path, pipeline_root: Path):
    """The DockerRunner for a run in ``run_dir`` whose KFP pipeline root ``pipeline_root``
    lies inside it, for the run (see the module docstring)."""
    import docker
    from kfp import local

    run_dir = Path(run_dir).resolve()
    # Docker would make a missing bind-mount source itself, as root.
    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    as_root = os.getuid() == 0
    if as_root:
        user = f"{IMAGE_UID}:{IMAGE_UID}"
        _hand_over(run_dir, IMAGE_UID)
    else:
        user = f"{os.getuid()}:{os.getgid()}"
    mount = docker.types.Mount(target=str(run_dir), source=str(run_dir), type="bind")
    runner = local.DockerRunner(
        mounts=[mount], network_mode="none", hostname="localhost", read_only=True,
        tmpfs={"/tmp": "rw,exec,size=4g"}, environment={"HOME": "/tmp"}, user=user,
        cap_drop=["ALL"], security_opt=["no-new-privileges"], shm_size="1g")
    saved = os.umask(0) if as_root else None
    try:
        yield runner
    finally:
        if saved is not None:
            os.umask(saved)
