#!/usr/bin/env bash
# Build the facessl image with podman on a machine with no Docker engine and no reachable image registry
# (this project's CI machines). Usage: infra/ci/build-image.sh [TAG]   (default facessl:ci; prints the tag)
#
#   1. podman, runc and debootstrap from Debian packages, and the containers.conf these machines need;
#   2. a base image equivalent to python:3.11-slim-bookworm (Debian bookworm's Python 3.11), made with
#      `debootstrap --variant=minbase` and `podman import`, since no registry can be pulled from;
#   3. `podman build` of the top-level Dockerfile, unchanged, with that base as BASE_IMAGE, pip's host
#      configuration (local wheel folders and indexes, CA bundle) bind-mounted into the build.
# A user with a registry runs plain `docker build -t facessl .` instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tag=${1:-facessl:ci}
base=facessl-base:bookworm
log() { echo "[build-image] $*" >&2; }

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing podman, runc and debootstrap"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >&2
fi
if ! grep -qs 'runtime = "runc"' /etc/containers/containers.conf; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' \
    > /etc/containers/containers.conf
fi

if ! podman image exists "$base"; then
  log "building the base image $base with debootstrap"
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --change 'CMD ["python3"]' - "$base" >/dev/null
  rm -rf "$root"
fi

# pip's configuration on this host (wheel folders, local indexes, constraints, CA bundle) as one pip.conf
# for the build, and every local folder it names, bind-mounted read-only at the same path.
conf=$(mktemp)
mounts=()
declare -A settings=()
while IFS= read -r line; do  # lines like global.find-links='/opt/wheels' or :env:.cert='...'
  key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
  [[ $key == cert ]] && continue  # the host's bundle is mounted over the image's own, below
  settings[$key]=$value
done < <(pip config list 2>/dev/null)
echo "[global]" > "$conf"
for key in "${!settings[@]}"; do
  echo "$key = ${settings[$key]}" >> "$conf"
  for word in ${settings[$key]}; do
    path=${word#file://}
    [[ $path == /* && -e $path ]] || continue
    [[ $(basename "$path") == simple ]] && path=$(dirname "$path")  # index pages link to ../files
    [[ -f $path ]] && path=$(dirname "$path")
    mounts+=(-v "$path:$path:ro")
  done
done
cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[[ -f $cert ]] && mounts+=(-v "$cert:/etc/ssl/certs/ca-certificates.crt:ro")

# Committing the 6 GB dependency layer (torch and CUDA) takes about 23 GB at its peak: the container's copy,
# the blob written to /var/tmp, and the committed layer, with the tar files in between. A build after a
# code-only change reuses that cached layer and needs little, so the previous image under this tag is kept
# while the disk allows, and removed first when it does not. Untagged images are removed on every exit,
# failed builds included: each one otherwise leaves up to 6 GB behind on a CI machine that is reused between
# runs, and a full disk fails the next build half-way through.
trap 'rm -f "$conf"; podman image prune -f >/dev/null 2>&1 || true' EXIT
podman image prune -f >/dev/null
need_gb=${FACESSL_BUILD_FREE_GB:-26}
dirs=("$(podman info --format '{{.Store.GraphRoot}}')" "${TMPDIR:-/var/tmp}")
least_free_gb() {
  local dir free least=1000000
  for dir in "${dirs[@]}"; do
    free=$(df --output=avail -BG "$dir" | tail -1 | tr -dc 0-9)
    (( free < least )) && least=$free
  done
  echo "$least"
}
if (( $(least_free_gb) < need_gb )) && podman image exists "$tag"; then
  log "less than $need_gb GB free: removing the previous $tag to make room (its cached layers go with it)"
  podman rmi -f "$tag" >/dev/null
  podman image prune -f >/dev/null
fi
free_gb=$(least_free_gb)
if (( free_gb < need_gb )); then
  log "error: ${dirs[*]}: $free_gb GB free; the build needs about $need_gb GB there."
  log "Free some (old images: podman image prune -a; old work folders under /tmp) and run this again."
  exit 1
fi

log "podman build -t $tag (base $base)"
podman build --network host --build-arg "BASE_IMAGE=$base" -v "$conf:/etc/pip.conf:ro" "${mounts[@]}" \
  -t "$tag" "$repo" >&2
echo "$tag"
