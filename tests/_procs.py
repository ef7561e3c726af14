"""Process helpers for the tests that kill a torchrun run part-way."""

import json
import os
import signal
import subprocess
import time

from kubedistill.procs import process_cmdline as cmdline  # noqa: F401  (re-exported)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_at_first_checkpoint(cfg, timeout_s: float = 240) -> int:
    """Start ``cfg``'s torchrun run, SIGKILL it and all its workers as soon as its first
    checkpoint is committed (``latest.json``); return the step that checkpoint holds."""
    from kubedistill.train.launch import torchrun_command

    config_file = os.path.join(cfg.storage.work_dir, "train", "config.yaml")
    os.makedirs(os.path.dirname(config_file), exist_ok=True)
    with open(config_file, "w") as f:
        f.write(cfg.to_yaml())
    proc = subprocess.Popen(torchrun_command(cfg, config_file), start_new_session=True)
    latest = os.path.join(cfg.train.ckpt_path, "latest.json")
    deadline = time.monotonic() + timeout_s
    try:
        while not os.path.exists(latest) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and its workers
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    with open(latest) as f:
        return json.load(f)["step"]
