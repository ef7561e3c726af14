"""images/pipeline-run.sh (`make pipeline-run`): the preflight fails fast, naming what is
missing, and passes when every tool answers. (The cluster part needs docker + kind and
cannot run here.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "images" / "pipeline-run.sh"


def _fake(tmp_path: Path, name: str, rc: int = 0) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nexit {rc}\n")
    path.chmod(0o755)
    return str(path)


def _run(tmp_path, *args, **tools):
    env = {**os.environ, **tools}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_missing_kind_fails_fast_with_its_name(tmp_path):
    out = _run(tmp_path, DOCKER=_fake(tmp_path, "docker"), KUBECTL=_fake(tmp_path, "kubectl"),
               HELM=_fake(tmp_path, "helm"), KIND=str(tmp_path / "no-such-kind"))
    assert out.returncode == 2
    assert "kind" in out.stderr and "missing prerequisites" in out.stderr
    assert "docker" not in out.stderr.split("missing prerequisites:")[1].split("make run")[0]


def test_docker_daemon_down_is_named(tmp_path):
    out = _run(tmp_path, DOCKER=_fake(tmp_path, "docker", rc=1), KIND=_fake(tmp_path, "kind"),
               KUBECTL=_fake(tmp_path, "kubectl"), HELM=_fake(tmp_path, "helm"))
    assert out.returncode == 2 and "docker daemon" in out.stderr


def test_everything_missing_lists_all(tmp_path):
    none = str(tmp_path / "absent")
    out = _run(tmp_path, DOCKER=none, KIND=none, KUBECTL=none, HELM=none)
    assert out.returncode == 2
    for tool in ("docker", "kind", "kubectl", "helm"):
        assert f"- {tool} " in out.stderr


def test_preflight_passes_when_all_tools_answer(tmp_path):
    out = _run(tmp_path, "--preflight", DOCKER=_fake(tmp_path, "docker"),
               KIND=_fake(tmp_path, "kind"), KUBECTL=_fake(tmp_path, "kubectl"),
               HELM=_fake(tmp_path, "helm"))
    assert out.returncode == 0, out.stderr
    assert "preflight ok" in out.stdout
