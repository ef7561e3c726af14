"""Fault suite, external services: each failure is its documented exit code and ONE line on
stderr naming the URI and what to do, never a traceback. Real servers throughout: moto's S3
server (also a second one with authentication on), a port where nothing listens, the real
``mlflow server``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import free_port

from kubedistill import storage
from kubedistill.errors import ServiceUnavailable
from kubedistill.failures import explain

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _cli(args: list[str], env: dict[str, str], timeout: int = 180):
    out = subprocess.run([sys.executable, "-m", "kubedistill.cli", *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stderr


def _env(**over: str | None) -> dict[str, str]:
    env = {**os.environ, "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard",
           "KUBEDISTILL_SYSTEM_METRICS": "0"}
    for k, v in over.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _prepare(dataset: str, tmp_path, model: str) -> list[str]:
    return ["prepare", "--train_dataset_path", dataset, "--teacher_name_or_path", model,
            "--kd_algorithm", "sft", "--work_dir", str(tmp_path / "w"),
            "--tracking_uri", "off"]


def _one_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("kubedistill: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_object_store_endpoint_down(tmp_path, tiny_model_dir):
    """Before: a botocore traceback and exit 1."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    code, err = _cli(_prepare("s3://data/train.jsonl", tmp_path, tiny_model_dir),
                     _env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="k",
                          AWS_SECRET_ACCESS_KEY="s"))
    line = _one_line(err)
    assert code == 5, err[-2000:]
    assert f"object store at {endpoint} is unreachable (s3://data/train.jsonl)" in line


def test_object_store_without_credentials(tmp_path, tiny_model_dir, s3_server, s3_bucket):
    code, err = _cli(_prepare(f"{s3_bucket}/train.jsonl", tmp_path, tiny_model_dir),
                     _env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                          AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                          AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_PROFILE=None))
    line = _one_line(err)
    assert code == 5 and "no credentials for the object store" in line
    assert "AWS_ACCESS_KEY_ID" in line and f"{s3_bucket}/train.jsonl" in line


def test_object_store_missing_bucket_on_read_and_write(tmp_path, tiny_model_dir, s3_server):
    code, err = _cli(_prepare("s3://no-such-bucket-h15/train.jsonl", tmp_path,
                              tiny_model_dir), _env())
    line = _one_line(err)
    assert code == 5 and "bucket 'no-such-bucket-h15' does not exist" in line
    # a write never creates a mistyped bucket (before: s3fs made it silently)
    with pytest.raises(ServiceUnavailable, match="bucket does not exist.*s3://typo-h15/x"):
        storage.write_bytes_atomic("s3://typo-h15/x/manifest.json", b"{}")
    assert not storage.filesystem("s3://typo-h15")[0].exists("typo-h15")


@pytest.fixture
def auth_s3(tmp_path):
    """A second moto server that checks credentials (moto's IAM auth switched on)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)
    yield url
    proc.kill()
    proc.wait()


def test_object_store_access_denied(tmp_path, tiny_model_dir, auth_s3):
    code, err = _cli(_prepare("s3://data/train.jsonl", tmp_path, tiny_model_dir),
                     _env(AWS_ENDPOINT_URL=auth_s3, AWS_ACCESS_KEY_ID="unknown-key",
                          AWS_SECRET_ACCESS_KEY="s"))
    line = _one_line(err)
    assert code == 5 and f"object store at {auth_s3} denied access" in line, line


def test_object_store_throttling_after_retries():
    """botocore's own ClientError for SlowDown, as s3fs re-raises it once retries ran out."""
    from botocore.exceptions import ClientError

    exc = ClientError({"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
                       "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    try:
        try:
            raise exc
        except ClientError as inner:
            raise OSError("write failed") from inner
    except OSError as outer:
        err = explain(outer, "s3://b/shard-0.arrow")
    assert isinstance(err, ServiceUnavailable) and err.exit_code == 5
    assert "kept throttling requests (s3://b/shard-0.arrow) (SlowDown) after retries" in str(err)


def test_mlflow_unreachable_at_register(tmp_path, tiny_model_dir):
    url = f"http://127.0.0.1:{free_port()}"
    model = tmp_path / "w" / "model"
    os.makedirs(model)
    code, err = _cli(["register", "--tracking_uri", url, "--work_dir", str(tmp_path / "w"),
                      "--save_path", tiny_model_dir],
                     _env(KUBEDISTILL_MLFLOW_RETRIES="2", KUBEDISTILL_MLFLOW_BACKOFF_S="0.1"))
    line = _one_line(err)
    assert code == 5 and f"MLflow at {url} unreachable" in line


def test_mlflow_unreachable_at_open_run(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from kubedistill.components import steps

    monkeypatch.setenv("KUBEDISTILL_MLFLOW_RETRIES", "2")
    monkeypatch.setenv("KUBEDISTILL_MLFLOW_BACKOFF_S", "0.1")
    url = f"http://127.0.0.1:{free_port()}"
    recipe = (Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text()
    with pytest.raises(ServiceUnavailable, match=f"MLflow at {url} unreachable"):
        steps.open_run("pr-1", recipe=recipe, overrides=json.dumps({"tracking_uri": url}),
                       work_dir=str(tmp_path))
    events = [json.loads(x.split("@@kubedistill ", 1)[1])
              for x in capsys.readouterr().out.splitlines() if "@@kubedistill " in x]
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 5


def test_kfp_host_unreachable(tmp_path):
    from pathlib import Path

    host = f"http://127.0.0.1:{free_port()}"
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    code, err = _cli(["pipeline", "submit", "--host", host, "--recipe", recipe], _env())
    line = _one_line(err)
    assert code == 5 and f"KFP API at {host} is unreachable" in line, err[-2000:]
