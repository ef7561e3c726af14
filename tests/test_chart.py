"""The Helm chart: `helm lint --strict`, rendered manifests valid for Kubernetes (strict),
security settings, RBAC for TrainJobs, and the values schema rejecting wrong types."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tools import helm  # noqa: E402

CHART = Path(__file__).resolve().parents[1] / "charts" / "kubedistill"
VARIANTS = {
    "default": [],
    "everything": ["--set", "pipelineRun.enabled=true", "--set", "s3.secret.create=true",
                   "--set", "s3.secret.accessKeyId=a", "--set", "s3.secret.secretAccessKey=b"],
    "postgres": ["--set", "mlflow.backend.type=postgres", "--set",
                 "mlflow.backend.postgres.host=pg.db", "--set",
                 "mlflow.backend.postgres.passwordSecret=pg-pass"],
}


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return helm()


def _template(helm_bin: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([helm_bin, "template", "kubedistill", str(CHART), "--namespace",
                           "kubeflow", *args], capture_output=True, text=True, check=check)


def test_lint_strict(helm_bin):
    for args in VARIANTS.values():
        out = subprocess.run([helm_bin, "lint", "--strict", str(CHART), *args],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_template_passes_kubernetes_validate_strict(helm_bin, tmp_path, variant):
    rendered = tmp_path / f"{variant}.yaml"
    rendered.write_text(_template(helm_bin, *VARIANTS[variant]).stdout)
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                          str(rendered)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _docs(helm_bin, *args) -> list[dict]:
    return [d for d in yaml.safe_load_all(_template(helm_bin, *args).stdout) if d]


def test_workloads_are_locked_down(helm_bin):
    docs = _docs(helm_bin, *VARIANTS["everything"])
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 2
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["allowPrivilegeEscalation"] is False
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_mlflow_server_flags_and_credentials(helm_bin):
    docs = _docs(helm_bin)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    cmd = c["command"]
    assert cmd[:2] == ["mlflow", "server"] and "--workers=1" in cmd
    assert "--artifacts-destination=s3://mlflow/artifacts" in cmd
    hosts = next(a for a in cmd if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "kubedistill-mlflow.kubeflow.svc.cluster.local:5000" in hosts
    assert "kubedistill-mlflow:5000" in hosts
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kubedistill-s3"
    assert env["BACKEND_STORE_URI"]["value"] == "sqlite:////data/mlflow.db"
    assert any(d["kind"] == "PersistentVolumeClaim" for d in docs)
    pg = _docs(helm_bin, *VARIANTS["postgres"])
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in pg)
    pg_env = {e["name"]: e for e in next(d for d in pg if d["kind"] == "Deployment")
              ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["BACKEND_STORE_URI"]["value"].startswith("postgresql://mlflow:$(PGPASSWORD)@")


def test_rbac_lets_the_pipeline_runner_manage_trainjobs(helm_bin):
    docs = _docs(helm_bin)
    role = next(d for d in docs if d["kind"] == "Role")
    rule = role["rules"][0]
    assert rule["apiGroups"] == ["trainer.kubeflow.org"] and rule["resources"] == ["trainjobs"]
    assert {"create", "get", "watch", "delete"} <= set(rule["verbs"])
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"][0]["name"] == "pipeline-runner"


def test_pipeline_run_job_submits_the_recipe(helm_bin):
    docs = _docs(helm_bin, *VARIANTS["everything"])
    job = next(d for d in docs if d["kind"] == "Job")
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["kubedistill", "pipeline", "submit"] and "--wait" in cmd
    assert cmd[cmd.index("--recipe") + 1] == "/recipes/quickstart.yaml"
    assert cmd[cmd.index("--gpus-per-node") + 1] == "8"  # sizes the GPU stages' requests
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert "quickstart.yaml" in cm["data"]


@pytest.mark.parametrize("bad", ["mlflow.port=abc", "pipelineRun.numShards=two",
                                 "pipelineRun.gpusPerNode=0",
                                 "mlflow.backend.type=mysql", "rbac.create=maybe"])
def test_schema_rejects_wrong_types(helm_bin, bad):
    out = _template(helm_bin, "--set-string" if "create" in bad else "--set", bad,
                    check=False)
    assert out.returncode != 0
    assert "schema" in out.stderr


def test_schema_rejects_a_values_file_with_a_wrong_type(helm_bin, tmp_path):
    values = tmp_path / "bad.yaml"
    values.write_text("pipelineRun:\n  wait: \"yes\"\n")
    out = _template(helm_bin, "-f", str(values), check=False)
    assert out.returncode != 0 and "pipelineRun.wait" in out.stderr
