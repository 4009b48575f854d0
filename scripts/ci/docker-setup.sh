#!/usr/bin/env bash
# Make a docker engine and the test image `conveyor-test/python:3.11` available, without
# any registry: Debian's docker.io and debootstrap packages, a minimal bookworm root file
# system with python3, python3-venv and git, imported as an image. Idempotent: every
# step is skipped when its result is already there (dockerd running, image present).
#
#   scripts/ci/docker-setup.sh          # as root; ~70 s the first time, ~1 s after
#
# Environment: CONVEYOR_TEST_IMAGE (image name), CONVEYOR_ROOTFS_DIR (where the root
# file system is built and kept), DOCKERD_LOG (dockerd's log file).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

IMAGE=${CONVEYOR_TEST_IMAGE:-conveyor-test/python:3.11}
ROOTFS=${CONVEYOR_ROOTFS_DIR:-/var/tmp/conveyor-rootfs/bookworm}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}

say() { printf '[docker-setup] %s\n' "$*"; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing docker.io and debootstrap"
  apt-get update -qq
  apt-get install -y -qq docker.io debootstrap >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: $DOCKERD_LOG)"
  nohup dockerd >"$DOCKERD_LOG" 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    say "dockerd did not come up; last lines of its log:"
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    exit 1
  fi
fi
say "docker engine $(docker version --format '{{.Server.Version}}') is running"

if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    say "building a bookworm root file system in $ROOTFS (debootstrap, about a minute)"
    rm -rf "$ROOTFS.partial"
    mkdir -p "$(dirname "$ROOTFS")"
    debootstrap --variant=minbase --include=python3,python3-venv,git bookworm "$ROOTFS.partial" >/dev/null
    rm -rf "$ROOTFS"
    mv "$ROOTFS.partial" "$ROOTFS"
  fi
  say "importing $ROOTFS as image $IMAGE"
  tar -C "$ROOTFS" -c . | docker import - "$IMAGE" >/dev/null
fi
say "image $IMAGE: $(docker run --rm "$IMAGE" python3 --version)"
