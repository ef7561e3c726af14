"""Fault suite, storage: a disk that fills during shard writes (a real, small tmpfs), two
cache-teacher processes writing one cache, the S3 API server stopped and restarted while
shards are written and while they are read. Every case ends with the cache equal, byte for
byte, to an uninterrupted run, and a failure is exit 5 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from _prepared import write_prepared

from kubedistill import storage
from kubedistill.config import load_config
from kubedistill.errors import KubedistillError
from kubedistill.failures import explain
from kubedistill.teacher.cache import cache_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS_PER_SHARD = 2


@pytest.fixture(scope="module")
def prepared(smollm2_dir, tmp_path_factory) -> str:
    return write_prepared(str(tmp_path_factory.mktemp("prep") / "prepared"), smollm2_dir,
                          n_train=12, n_eval=4, max_tokens=48)


def _argv(teacher: str, prepared: str, cache: str) -> list[str]:
    return ["--teacher_name_or_path", teacher, "--prepared_path", prepared,
            "--teacher_cache_path", cache, "--cache_rows_per_shard", str(ROWS_PER_SHARD),
            "--attn_implementation", "sdpa", "--cache_dtype", "fp32", "--tracking_uri", "off"]


def _cfg(teacher: str, prepared: str, cache: str):
    argv = _argv(teacher, prepared, cache)
    return load_config(None, {k[2:]: v for k, v in zip(argv[::2], argv[1::2], strict=True)})


def shard_bytes(cache: str) -> dict[str, bytes]:
    manifest = storage.read_json(storage.join(cache, "manifest.json"))
    return {e["file"]: storage.read_bytes(storage.join(cache, e["file"]))
            for e in manifest["shards"]}


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, prepared, tmp_path_factory) -> str:
    cache = str(tmp_path_factory.mktemp("ref") / "cache")
    cache_teacher(_cfg(tiny_teacher_dir, prepared, cache))
    return cache


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size mounted at a fresh folder (skips where mounting is refused);
    ``resize(kib)`` grows it in place, keeping its files."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(kib: int) -> str:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs",
                              str(where)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        mounted.append(where)
        return str(where)

    def resize(kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(where)], check=True)

    mount.resize = resize
    yield mount
    for m in mounted:
        subprocess.run(["umount", str(m)], check=False)


def _cli(args: list[str], timeout: int = 240):
    env = {**os.environ, "KUBEDISTILL_SYSTEM_METRICS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kubedistill.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _visible_shards_are_complete(cache: str) -> int:
    """Every ``.arrow`` file has its marker and matches its recorded sha256; no temp files."""
    import json

    files = os.listdir(cache)
    assert not [f for f in files if f.endswith(".tmp")], files
    arrows = [f for f in files if f.endswith(".arrow")]
    for f in arrows:
        with open(os.path.join(cache, "markers", f.replace(".arrow", ".json"))) as m:
            entry = json.load(m)
        assert storage.sha256_file(os.path.join(cache, f)) == entry["sha256"]
    return len(arrows)


def test_disk_fills_during_shard_writes(tiny_teacher_dir, prepared, reference, small_disk):
    head = os.path.getsize(os.path.join(reference, "lm_head.safetensors"))
    shard = max(os.path.getsize(os.path.join(reference, f)) for f in shard_bytes(reference))
    disk = small_disk(head // 1024 + 3 * (shard // 1024 + 8) + 48)  # head + ~3 shards
    cache = os.path.join(disk, "cache")
    out = _cli(["cache-teacher", *_argv(tiny_teacher_dir, prepared, cache)])
    assert out.returncode == 5, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("kubedistill: error:")]
    assert len(errors) == 1 and "no room to write" in errors[0] and "Traceback" not in out.stderr
    assert not os.path.exists(os.path.join(cache, "manifest.json"))
    written = _visible_shards_are_complete(cache)
    assert 0 < written < len(shard_bytes(reference))  # it filled up part-way
    small_disk.resize(64 * 1024)  # room again: the rerun finishes the same cache
    assert _cli(["cache-teacher", *_argv(tiny_teacher_dir, prepared, cache)]).returncode == 0
    assert shard_bytes(cache) == shard_bytes(reference)


def test_two_cache_teacher_processes_write_one_cache(tiny_teacher_dir, prepared, reference,
                                                     tmp_path):
    cache = str(tmp_path / "cache")
    env = {**os.environ, "KUBEDISTILL_SYSTEM_METRICS": "0", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "kubedistill.cli", "cache-teacher",
            *_argv(tiny_teacher_dir, prepared, cache)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert shard_bytes(cache) == shard_bytes(reference)
    assert storage.read_json(os.path.join(cache, "manifest.json")) == \
        storage.read_json(os.path.join(reference, "manifest.json"))
    _visible_shards_are_complete(cache)


def _restart_when(s3_server: str, seen, down_s: float = 3.0) -> threading.Thread:
    """Stop moto's server once ``seen()`` is true, keep it down ``down_s``, start it again on
    the same port (moto keeps its buckets in this process, so data survives)."""
    import moto.server

    host, port = s3_server.rsplit(":", 1)[0].split("//")[1], int(s3_server.rsplit(":", 1)[1])

    def run() -> None:
        deadline = time.monotonic() + 240
        while not seen() and time.monotonic() < deadline:
            time.sleep(0.02)
        server = _SERVERS[s3_server]
        server.stop()
        time.sleep(down_s)
        restarted = moto.server.ThreadedMotoServer(ip_address=host, port=port)
        restarted.start()
        _SERVERS[s3_server] = restarted

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


_SERVERS: dict = {}


@pytest.fixture
def moto(s3_server, request):
    """The session's moto server object, so a test can stop and restart it."""
    import gc

    from moto.server import ThreadedMotoServer

    if s3_server not in _SERVERS:
        found = [o for o in gc.get_objects() if isinstance(o, ThreadedMotoServer)
                 and o._port == int(s3_server.rsplit(":", 1)[1])]
        assert found, "the session's moto server"
        _SERVERS[s3_server] = found[0]
    return s3_server


def _settle(fn):
    """Run ``fn``; a failure must be a documented one (exit 5), never a bug."""
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - classified below
        err = explain(exc)
        assert isinstance(err, KubedistillError) and err.exit_code == 5, repr(exc)
        return err


def test_s3_server_restarted_mid_write(tiny_teacher_dir, prepared, reference, moto, s3_bucket):
    cache = f"{s3_bucket}/cache"
    fs, path = storage.filesystem(cache)
    restart = _restart_when(moto, lambda: bool(fs.glob(f"{path}/markers/train-*.json")))
    first = _settle(lambda: cache_teacher(_cfg(tiny_teacher_dir, prepared, cache)))
    restart.join(timeout=60)
    if first is not None:  # it gave up while the server was down: a rerun resumes
        cache_teacher(_cfg(tiny_teacher_dir, prepared, cache))
    fs.invalidate_cache()
    assert shard_bytes(cache) == shard_bytes(reference)


def test_s3_server_restarted_mid_read(tiny_teacher_dir, prepared, reference, moto, s3_bucket):
    from kubedistill.teacher.reader import TeacherCache

    cache = f"{s3_bucket}/cache"
    storage.upload_dir(reference, cache)
    local = TeacherCache(reference)
    remote = TeacherCache(cache)
    ids = local.sample_ids()
    got: dict = {}

    def read_all() -> None:
        for i, sid in enumerate(ids):
            got[sid] = remote.get(sid)
            if i == 0:
                time.sleep(0.5)

    restart = _restart_when(moto, lambda: len(got) >= 1, down_s=2.0)
    err = _settle(read_all)
    restart.join(timeout=60)
    if err is not None:
        read_all()
    for sid in ids:
        want = local.get(sid)
        assert torch.equal(got[sid].positions, want.positions)
        assert torch.equal(got[sid].hidden, want.hidden)
