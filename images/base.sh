#!/usr/bin/env bash
# A local Python base image for machines that cannot pull one: Debian bookworm (python3 3.11)
# from Debian's own package mirror with debootstrap, imported with `docker import`.
#   images/base.sh IMAGE [MIRROR]
# Needs root (debootstrap). Skips the work when IMAGE already exists.
set -euo pipefail
IMAGE="${1:?usage: base.sh IMAGE [MIRROR]}"
MIRROR="${2:-http://deb.debian.org/debian}"
DOCKER="${DOCKER:-docker}"
if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base.sh: $IMAGE exists"; exit 0
fi
command -v debootstrap >/dev/null || { echo "base.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/kubedistill-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$ROOTFS" "$MIRROR"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$DOCKER" import --change 'CMD ["python3"]' - "$IMAGE"
echo "base.sh: imported $IMAGE"
