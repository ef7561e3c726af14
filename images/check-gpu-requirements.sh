#!/usr/bin/env bash
# Resolve the GPU image's pins without building it (no CUDA base, no GBs of wheels):
#   images/check-gpu-requirements.sh [REPORT.json]
# A throwaway venv (Python $GPU_PYTHON, default python3.12: Ubuntu 24.04's, the GPU base)
# with a current pip runs `pip install --dry-run --report` of exactly what Dockerfile.gpu
# installs (torch pin, pyproject + gpu and s3 extras but flash-attn, boto3), reading wheel
# metadata through HTTP range requests (fast-deps). It ignores this machine's pip config:
# only the package index is used, as in the image build ($CA_BUNDLE, default $PIP_CERT, is
# the CA bundle for it). Then it checks the resolution: torch and sglang at their pins,
# torch_memory_saver present (SGLang's memory release), transformers within our range, and
# the pinned flash-attn version on the index (the image builds it from its sdist).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPORT="${1:-$ROOT/build/gpu-requirements.json}"
PY="${GPU_PYTHON:-python3.12}"
"$PY" -c "" 2>/dev/null || { echo "check-gpu: $PY does not run; using python3" >&2; PY=python3; }
CA_BUNDLE="${CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}"
dockerfile_arg() { sed -n "s/^ARG $1=//p" "$ROOT/images/Dockerfile.gpu" | head -1; }
TORCH_SPEC="$(dockerfile_arg TORCH_SPEC)"
FLASH_ATTN_SPEC="$(dockerfile_arg FLASH_ATTN_SPEC)"
VENV="$(mktemp -d "${TMPDIR:-/tmp}/kubedistill-gpu-check.XXXXXX")"
trap 'rm -rf "$VENV"' EXIT
pipx() { PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" --isolated ${CA_BUNDLE:+--cert "$CA_BUNDLE"} "$@"; }
"$PY" -m venv "$VENV"
pipx install -q --upgrade pip packaging
(cd "$ROOT" && python3 images/requirements.py gpu s3) | grep -v '^flash-attn' > "$VENV/requirements.txt"
mkdir -p "$(dirname "$REPORT")"
started=$SECONDS
pipx install -q --dry-run --ignore-installed --use-feature=fast-deps --report "$REPORT" \
  "$TORCH_SPEC" -r "$VENV/requirements.txt" "boto3>=1.34" 2>&1 | grep -v "fast-deps" || true
[[ -s "$REPORT" ]] || { echo "check-gpu: the GPU requirements do not resolve" >&2; exit 1; }
"$VENV/bin/python" - "$REPORT" "$TORCH_SPEC" "$FLASH_ATTN_SPEC" <<'PY'
import json, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
report, torch_spec, fa_spec = sys.argv[1:]
got = {canon(i["metadata"]["name"]): i["metadata"]["version"]
       for i in json.load(open(report))["install"]}
problems = []
for spec in (torch_spec, "sglang==0.5.23", "transformers>=5.19,<5.25", "torch_memory_saver"):
    req = Requirement(spec)
    have = got.get(canon(req.name))
    if have is None or (req.specifier and have not in req.specifier):
        problems.append(f"{spec}: resolved {have}")
print("check-gpu: " + ", ".join(f"{n}=={got.get(canon(n))}" for n in (
    "torch", "sglang", "transformers", "tokenizers", "torch_memory_saver", "flashinfer-python",
    "triton", "liger-kernel", "kfp", "mlflow")) + f" ({len(got)} distributions)")
if problems:
    sys.exit("check-gpu: " + "; ".join(problems))
PY
FA_NAME="${FLASH_ATTN_SPEC%%==*}"; FA_VERSION="${FLASH_ATTN_SPEC##*==}"
pipx index versions "$FA_NAME" 2>/dev/null | grep -q "[ ,]$FA_VERSION\(,\|$\)" \
  || { echo "check-gpu: $FLASH_ATTN_SPEC is not on the index" >&2; exit 1; }
echo "check-gpu: $FLASH_ATTN_SPEC is on the index; resolved in $((SECONDS - started))s (report: $REPORT)"
