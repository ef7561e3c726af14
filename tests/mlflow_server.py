"""A real ``mlflow server`` on loopback for integration tests (not a pytest plugin).

``MlflowServer(db_path, port=..., artifacts_destination=...)`` runs
``python -m mlflow server --backend-store-uri sqlite:///DB --workers 1`` with
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (answers /health in seconds). Artifacts are proxied
(``--serve-artifacts``) to ``artifacts_destination``: a local folder by default, or an
``s3://bucket/prefix`` on the moto server whose endpoint is passed as ``s3_endpoint``.

``stop(kill=True)`` SIGKILLs the server's process group (a crash); ``start()`` brings it back on
the SAME port and the SAME sqlite file, so clients that cached the URL reconnect.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, db_path: str, *, port: int | None = None,
                 artifacts_destination: str | None = None, s3_endpoint: str | None = None,
                 log_path: str | None = None):
        self.db_path = str(db_path)
        self.port = port or free_port()
        self.artifacts_destination = artifacts_destination or os.path.join(
            os.path.dirname(self.db_path), "mlartifacts")
        self.s3_endpoint = s3_endpoint
        self.log_path = log_path or self.db_path + ".server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
            env.setdefault("AWS_ACCESS_KEY_ID", "testing")
            env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
            env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        return env

    def start(self, timeout: float = 90.0) -> MlflowServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.db_path}",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--serve-artifacts", "--artifacts-destination", self.artifacts_destination]
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(cmd, env=self._env(), stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see "
                                   f"{self.log_path}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True``) and its workers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            sig = signal.SIGKILL if kill else signal.SIGTERM
            try:
                os.killpg(self.proc.pid, sig)  # our own child's session only
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        self._wait_port_free()

    def _wait_port_free(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
