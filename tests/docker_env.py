"""Docker for the ``container`` tests: a daemon that answers, and the CPU runtime image.

:func:`docker_client` returns a docker-py client. When no daemon answers and this process
may start one (root, ``dockerd`` on PATH), it starts ``dockerd --bridge=none
--iptables=false`` (no docker bridge network is ever created; containers run with
``network_mode="none"``) on ``$KUBEDISTILL_DOCKER_DATA_ROOT`` (default ``/var/lib/docker``,
so built layers stay cached between runs) and stops it again at exit. Otherwise it raises
``DockerUnavailable`` with the reason, which the tests turn into a skip.

:func:`ensure_image` builds the runtime image with ``make images`` when it is missing (the
layer cache makes a rebuild of an unchanged tree take seconds).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_started: list[subprocess.Popen] = []


class DockerUnavailable(RuntimeError):
    pass


def _client():
    import docker

    client = docker.from_env(timeout=600)
    client.ping()
    return client


def _stop_started() -> None:
    for proc in _started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start_dockerd() -> None:
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise DockerUnavailable("no Docker daemon answers and dockerd is not installed "
                                "(apt-get install docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker daemon answers and only root may start dockerd")
    data_root = os.environ.get("KUBEDISTILL_DOCKER_DATA_ROOT", "/var/lib/docker")
    log = tempfile.NamedTemporaryFile(prefix="kubedistill-dockerd-", suffix=".log",
                                      delete=False)
    proc = subprocess.Popen([dockerd, "--bridge=none", "--iptables=false",
                             "--data-root", data_root], stdout=log, stderr=log)
    _started.append(proc)
    atexit.register(_stop_started)
    for _ in range(60):
        if proc.poll() is not None:
            raise DockerUnavailable(f"dockerd exited with {proc.returncode}; see {log.name}")
        try:
            _client().close()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise DockerUnavailable(f"dockerd did not answer within 60 s; see {log.name}")


def docker_client():
    """A client of a daemon that answers (started here if need be; see the docstring)."""
    try:
        import docker  # noqa: F401
    except ImportError as exc:
        raise DockerUnavailable("the docker Python package is not installed") from exc
    try:
        return _client()
    except Exception as first:  # noqa: BLE001 - no daemon: try to start one
        try:
            _start_dockerd()
        except DockerUnavailable as exc:
            raise DockerUnavailable(f"{exc} (first attempt: {first})") from None
        return _client()


def runtime_image() -> str:
    out = subprocess.run(["make", "-s", "-C", str(ROOT / "images"), "print-cpu-image"],
                         capture_output=True, text=True, check=True)
    return os.environ.get("KUBEDISTILL_IMAGE") or out.stdout.strip()


def ensure_image(client, image: str) -> str:
    """``image``, built with ``make images`` first when it is not present."""
    import docker

    try:
        client.images.get(image)
        return image
    except docker.errors.ImageNotFound:
        pass
    subprocess.run(["make", "-C", str(ROOT), "images", f"CPU_IMAGE={image}"], check=True,
                   timeout=3600)
    client.images.get(image)
    return image
