"""The chart's containers, executed (``container`` marker; skipped where Docker cannot run).

``helm template`` renders the chart; each Deployment's and Job's container then runs in the
runtime image exactly as its pod spec says, translated by :func:`docker_args`:

- command -> entrypoint and args -> command, after the kubelet's ``$(VAR)`` expansion;
- env: values (expanded the same way) and ``secretKeyRef`` read from the rendered Secret;
- pod + container securityContext: ``runAsUser:runAsGroup``, ``fsGroup`` as an extra group,
  ``readOnlyRootFilesystem``, ``capabilities.drop``, ``allowPrivilegeEscalation: false`` as
  ``no-new-privileges`` (seccomp RuntimeDefault is Docker's default profile);
- ``limits.memory``; volumes: emptyDir -> tmpfs, PVC -> a fresh directory owned by fsGroup,
  configMap -> its rendered files, read-only;
- no network (``network_mode="none"``; probes run inside the container).

The MLflow server must answer ``/health`` through the chart's own command line; the
pipeline-run Job's command must compile the pipeline (then it fails to reach the KFP API,
which does not exist here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from docker_env import DockerUnavailable, docker_client, ensure_image, runtime_image  # noqa: E402
from tools import helm  # noqa: E402

pytestmark = pytest.mark.container
CHART = Path(__file__).resolve().parents[1] / "charts" / "kubedistill"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion: ``$(VAR)`` -> its value when defined, ``$$`` -> ``$``."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, str(text))


def _bytes(quantity: str) -> int:
    for unit, factor in _UNITS.items():
        if quantity.endswith(unit):
            return int(float(quantity[:-len(unit)]) * factor)
    return int(quantity)


def docker_args(pod: dict, container: dict, docs: list[dict], scratch: Path) -> dict:
    """docker-py ``containers.run`` arguments for ``container`` of ``pod`` (module doc)."""
    import docker

    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs
               if d["kind"] == "Secret"}
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs
                   if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    sc = {**psc, **csc}
    user, group = sc["runAsUser"], sc.get("runAsGroup", sc["runAsUser"])
    assert sc.get("runAsNonRoot") is not True or user != 0
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    tmpfs, mounts = {}, []
    for vm in container.get("volumeMounts", []):
        vol = volumes[vm["name"]]
        if "emptyDir" in vol:
            tmpfs[vm["mountPath"]] = "mode=0777"  # an emptyDir is world-writable
            continue
        host = scratch / vm["name"]
        host.mkdir(parents=True, exist_ok=True)
        if "configMap" in vol:
            for key, text in config_maps[vol["configMap"]["name"]].items():
                (host / key).write_text(text)
            host.chmod(0o755)
        if os.geteuid() == 0:  # a PVC is made writable for fsGroup
            os.chown(host, user, psc.get("fsGroup", group))
        mounts.append(docker.types.Mount(target=vm["mountPath"], source=str(host),
                                         type="bind", read_only=bool(vm.get("readOnly"))))
    caps = csc.get("capabilities", {})
    limits = container.get("resources", {}).get("limits", {})
    args = dict(
        entrypoint=[expand(c, env) for c in container.get("command", [])] or None,
        command=[expand(a, env) for a in container.get("args", [])],
        environment=env, user=f"{user}:{group}", read_only=bool(csc.get("readOnlyRootFilesystem")),
        cap_drop=caps.get("drop"), cap_add=caps.get("add"), tmpfs=tmpfs, mounts=mounts,
        network_mode="none", detach=True)
    if "fsGroup" in psc:
        args["group_add"] = [str(psc["fsGroup"])]
    if csc.get("allowPrivilegeEscalation") is False:
        args["security_opt"] = ["no-new-privileges"]
    if "memory" in limits:
        args["mem_limit"] = _bytes(limits["memory"])
    return args


@pytest.fixture(scope="module")
def client():
    try:
        c = docker_client()
    except DockerUnavailable as exc:
        pytest.skip(f"Docker cannot run here: {exc}")
    ensure_image(c, runtime_image())
    yield c
    c.close()


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    image = runtime_image()
    repo, tag = image.rsplit(":", 1)
    out = subprocess.run(
        [helm(), "template", "kubedistill", str(CHART), "--namespace", "kubeflow",
         "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
         "--set", "pipelineRun.enabled=true", "--set", "s3.secret.create=true",
         "--set", "s3.secret.accessKeyId=test-key", "--set", "s3.secret.secretAccessKey=x"],
        capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _workload(docs: list[dict], kind: str) -> tuple[dict, dict]:
    pod = next(d for d in docs if d["kind"] == kind)["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _start(client, docs, kind, tmp_path):
    pod, container = _workload(docs, kind)
    args = docker_args(pod, container, docs, tmp_path)
    assert args["read_only"] and args["cap_drop"] == ["ALL"] and args["user"] == "1000:1000"
    return client.containers.run(container["image"], **args), container


def test_mlflow_server_answers_health_through_the_charts_command(client, rendered, tmp_path):
    box, container = _start(client, rendered, "Deployment", tmp_path)
    port = container["ports"][0]["containerPort"]
    probe = ("import urllib.request;"
             f"print(urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=5)"
             ".read().decode())")
    try:
        answer = None
        for _ in range(90):
            box.reload()
            assert box.status in ("created", "running"), box.logs().decode()[-3000:]
            code, output = box.exec_run(["python", "-c", probe])
            if code == 0:
                answer = output.decode().strip()
                break
            time.sleep(2)
        assert answer == "OK", box.logs().decode()[-3000:]
        code, output = box.exec_run(["sh", "-c", "id -u; touch /probe 2>&1; ls /data"])
        lines = output.decode().splitlines()
        assert lines[0] == "1000"
        assert "Read-only file system" in lines[1]
        assert "mlflow.db" in lines[2:]  # the sqlite backend on the (PVC) volume
    finally:
        box.remove(force=True)


def test_pipeline_run_job_compiles_the_pipeline(client, rendered, tmp_path):
    box, container = _start(client, rendered, "Job", tmp_path)
    try:
        code = box.wait(timeout=600)["StatusCode"]
        logs = box.logs().decode()
    finally:
        box.remove(force=True)
    assert "compiled off_policy_kd for target kind" in logs, logs[-3000:]
    # No KFP API exists here (and the container has no network): submitting must fail.
    assert code != 0 and "ml-pipeline.kubeflow.svc.cluster.local" in logs, logs[-3000:]
