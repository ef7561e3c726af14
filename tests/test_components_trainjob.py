"""The multi-node TrainJob: manifest builder (pure) and the create-and-wait loop."""

from __future__ import annotations

import pytest

from kubedistill.components import trainjob
from kubedistill.components.common import build_config
from kubedistill.config import Config, load_config, parse_overrides

RECIPE = """
model: {student_name_or_path: s, teacher_name_or_path: t}
train: {num_nodes: 4, num_gpus_per_node: 8, train_batch_size: 64, bf16: true,
        adam_betas: [0.9, 0.95]}
kd: {kd_loss_fn: rkl}
"""


def _cfg() -> Config:
    return build_config(RECIPE, '{"name": "Big_Run"}', "s3://bucket/runs/big")


def test_manifest_matches_the_v1alpha1_schema():
    env = trainjob.env_for_trainjob(
        {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "shh"},
        {"AWS_SECRET_ACCESS_KEY": ["kubedistill-s3", "AWS_SECRET_ACCESS_KEY"]})
    m = trainjob.trainjob_manifest(_cfg(), name="kd-big-run-train-1", image="img:1",
                                   namespace="team", env=env, cpu="32", memory="256Gi")
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["metadata"] == {"name": "kd-big-run-train-1", "namespace": "team", "labels": {
        "app.kubernetes.io/part-of": "kubedistill", "kubedistill/recipe": "Big_Run"}}
    assert m["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                       "kind": "ClusterTrainingRuntime",
                                       "name": "torch-distributed"}
    t = m["spec"]["trainer"]
    assert set(t) == {"image", "command", "numNodes", "numProcPerNode", "resourcesPerNode",
                      "env"}
    assert (t["image"], t["numNodes"], t["numProcPerNode"]) == ("img:1", 4, "8")
    assert t["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8},
                                     "requests": {"cpu": "32", "memory": "256Gi"}}
    assert t["command"][:2] == ["kubedistill", "train"]
    # credentials travel as secret references, never as values
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in t["env"]
    assert "shh" not in str(t["env"])
    secret = next(e for e in t["env"] if e["name"] == "AWS_SECRET_ACCESS_KEY")
    assert secret["valueFrom"]["secretKeyRef"]["name"] == "kubedistill-s3"


def test_command_round_trips_to_the_same_config():
    cfg = _cfg()
    args = trainjob.trainjob_manifest(cfg, name="x", image="i")["spec"]["trainer"]["command"]
    again = load_config(None, parse_overrides(args[2:]))
    again.name = cfg.name  # not a CLI key; travels as a label
    assert again.to_dict() == cfg.to_dict()


def test_cpu_training_requests_no_accelerator():
    cfg = build_config("train: {num_nodes: 2, device: cpu}", "", "/tmp/w")
    t = trainjob.trainjob_manifest(cfg, name="x", image="i")["spec"]["trainer"]
    assert t["numProcPerNode"] == "cpu" and "resourcesPerNode" not in t


def test_job_name_is_dns_safe():
    cfg = Config(name="My_Very.Long recipe name " * 5)
    name = trainjob.job_name(cfg, "train-1700000000")
    assert len(name) <= 63 and name.endswith("-train-1700000000")
    assert all(c.isalnum() or c == "-" for c in name) and name[0].isalpha()


class FakeApi:
    """CustomObjectsApi stand-in: returns the given status sequence on successive gets."""

    def __init__(self, conditions_seq):
        self.seq = list(conditions_seq)
        self.created, self.deleted = [], []

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        self.created.append((ns, body))

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        conds = self.seq.pop(0) if len(self.seq) > 1 else self.seq[0]
        return {"metadata": {"name": name}, "status": {"conditions": conds}}

    def delete_namespaced_custom_object(self, group, version, ns, plural, name):
        self.deleted.append(name)


def _manifest():
    return trainjob.trainjob_manifest(_cfg(), name="job", image="i", namespace="ns")


def test_waits_until_complete():
    api = FakeApi([[], [{"type": "Created", "status": "True"}],
                   [{"type": "Complete", "status": "True"}]])
    obj = trainjob.run_trainjob(_manifest(), poll_s=0, api=api)
    assert trainjob.terminal_state(obj) == "Complete" and api.created[0][0] == "ns"


def test_failed_condition_raises():
    api = FakeApi([[{"type": "Failed", "status": "True", "message": "OOMKilled"}]])
    with pytest.raises(trainjob.TrainJobFailed, match="failed"):
        trainjob.run_trainjob(_manifest(), poll_s=0, api=api)


def test_timeout_deletes_the_job():
    api = FakeApi([[{"type": "Complete", "status": "False"}]])
    with pytest.raises(trainjob.TrainJobFailed, match="did not finish"):
        trainjob.run_trainjob(_manifest(), timeout_s=0, poll_s=0, api=api)
    assert api.deleted == ["job"]
