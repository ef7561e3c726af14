#!/usr/bin/env bash
# Build one runtime image with BuildKit:  images/build.sh cpu|gpu IMAGE
#
# - Builder: `docker buildx build --load` when buildx is installed, else the first docker CLI
#   on PATH that builds with DOCKER_BUILDKIT=1 (CLIs before 23.0 do it without buildx).
# - Base (cpu): $BASE_IMAGE (default python:3.11-slim) when it is present or can be pulled,
#   else a local Debian bookworm base made by images/base.sh ($LOCAL_BASE_IMAGE).
# - torch (cpu): $TORCH_SPEC (a +cpu build) goes into build/wheels, fetched by this
#   machine's pip with its own configuration (a local wheelhouse, or an index that serves
#   CPU builds: $TORCH_INDEX, e.g. PyTorch's CPU wheel index); the build installs it from
#   there. Without a wheel there, the build fetches it from $TORCH_INDEX itself.
# - A CA bundle ($CA_BUNDLE, default $PIP_CERT or $SSL_CERT_FILE) is passed as the BuildKit
#   secret `cacert`: pip uses it, no layer keeps it.
# - Network: the build runs with --network host (never a docker bridge).
# Prints the elapsed time and the image size at the end.
set -euo pipefail
KIND="${1:?usage: build.sh cpu|gpu IMAGE}"
IMAGE="${2:?usage: build.sh cpu|gpu IMAGE}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
LOCAL_BASE_IMAGE="${LOCAL_BASE_IMAGE:-kubedistill/base:bookworm}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
PYTHON="${PYTHON:-python3}"
CA_BUNDLE="${CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}"
say() { printf 'build.sh: %s\n' "$*"; }
started=$SECONDS

builder=()
if docker buildx version >/dev/null 2>&1; then
  builder=(docker buildx build --load)
else
  IFS=: read -ra dirs <<<"$PATH"
  for dir in "${dirs[@]}"; do
    cli="$dir/docker"; [[ -x "$cli" ]] || continue
    major="$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
    if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 23)); then
      builder=(env DOCKER_BUILDKIT=1 "$cli" build); break
    fi
  done
fi
if ((${#builder[@]} == 0)); then
  say "no BuildKit builder: install docker buildx (or a docker CLI older than 23.0)" >&2
  exit 2
fi
docker info >/dev/null 2>&1 || { say "the docker daemon is not running" >&2; exit 2; }

args=(-f "$ROOT/images/Dockerfile.$KIND" -t "$IMAGE" --network host)
[[ -n "$CA_BUNDLE" && -s "$CA_BUNDLE" ]] && args+=(--secret "id=cacert,src=$CA_BUNDLE")
for a in ${BUILD_ARGS:-}; do args+=(--build-arg "$a"); done

if [[ "$KIND" == cpu ]]; then
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    base="$BASE_IMAGE"
  else
    say "cannot pull $BASE_IMAGE: using a local Debian base ($LOCAL_BASE_IMAGE)"
    bash "$ROOT/images/base.sh" "$LOCAL_BASE_IMAGE"
    base="$LOCAL_BASE_IMAGE"
  fi
  args+=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_SPEC=$TORCH_SPEC")
  mkdir -p "$ROOT/build/wheels"
  if ! ls "$ROOT"/build/wheels/torch-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
      ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
      --dest "$ROOT/build/wheels" "$TORCH_SPEC" >/dev/null 2>&1 \
      || say "this machine's pip cannot get $TORCH_SPEC; the build will use TORCH_INDEX"
  fi
  if ! ls "$ROOT"/build/wheels/torch-*.whl >/dev/null 2>&1 && [[ -z "${TORCH_INDEX:-}" ]]; then
    say "no $TORCH_SPEC wheel: set TORCH_INDEX to an index that serves CPU builds of torch" >&2
    exit 2
  fi
  say "torch: $(ls "$ROOT"/build/wheels/torch-*.whl 2>/dev/null || echo "from $TORCH_INDEX")"
  args+=(--build-arg "TORCH_INDEX=${TORCH_INDEX:-}")
fi

say "${builder[*]} ${args[*]} $ROOT"
"${builder[@]}" "${args[@]}" "$ROOT"
size="$(docker image inspect "$IMAGE" --format '{{.Size}}')"
say "built $IMAGE in $((SECONDS - started))s, size $((size / 1000000)) MB"
