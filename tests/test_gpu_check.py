"""The GPU check scripts cannot rot: ``benchmarks/gpu_check.py --tiny`` runs on CPU with kfp
and mlflow made unimportable (the GPU machine has neither), and ``sglang_check.py`` imports
and answers ``--help`` where sglang is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# kfp / mlflow set to None in sys.modules: any ``import kfp`` (or kfp.dsl ...) raises
BLOCKED = """
import runpy, sys
sys.modules.update(kfp=None, mlflow=None)
for name in ("kfp", "mlflow"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        sys.exit(f"{name} is still importable")
import kubedistill.train.trainer, kubedistill.teacher.cache, kubedistill.losses  # noqa
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT / "runtime"))
    return subprocess.run([sys.executable, "-c", BLOCKED, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_gpu_check_runs_tiny_on_cpu_without_kfp_or_mlflow(tmp_path):
    out = _run(str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--work-dir",
               str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    checks = {line.split(" | ")[0][2:] for line in table[1:]}
    assert {"student training (SFT)", "KD loss V=1,024", "KD loss V=2,048",
            "teacher cache (hf, bf16)", "off-policy step from the cache",
            "flash-attn fallback"} <= checks
    assert all(line.count("|") == 4 for line in table)  # one table, three columns
    cache = next(line for line in table if line.startswith("| teacher cache"))
    assert "bit-exact yes" in cache
    assert "fp32 -> sdpa (model ran: yes)" in out.stdout
    assert sum("KD loss V=1,024 | chunked" in line for line in table) == 1


def test_sglang_check_imports_and_helps_without_sglang():
    script = str(ROOT / "benchmarks" / "sglang_check.py")
    out = _run(script, "--help", timeout=120)
    assert out.returncode == 0 and "--model" in out.stdout, out.stderr
    try:
        import sglang  # noqa: F401
    except ImportError:
        out = _run(script, "--model", str(ROOT), timeout=120)
        assert out.returncode == 2 and "sglang is not installed" in out.stderr
    else:  # pragma: no cover - a GPU node
        pytest.skip("sglang is installed: run the script itself")
