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

# Committing a dependency layer holds it on disk three times at once (the container's copy, the blob written
# to /var/tmp, the new layer), and podman keeps a build's containers until the build ends. One 6 GB layer
# peaked at 23 GB used; the Dockerfile's two layers (3.4 and 2.7 GB) built in one `podman build` at 17 GB,
# and built one target per `podman build` (below) at 14 GB (measured: 2026-12-06, df each second). A build
# whose dependency layers are cached (same base image, pyproject.toml and Dockerfile up to the final stage)
# needs well under 1 GB, so the previous image is kept for its cache whenever those are unchanged, and
# removed first when they changed and the disk is short. The cached layers' key is a second tag,
# facessl-deps:KEY. Untagged images are removed on every exit, failed builds included: each one otherwise
# leaves up to 6 GB behind on a CI machine that is reused between runs, and a full disk fails the next build
# half-way through.
trap 'rm -f "$conf"; podman image prune -f >/dev/null 2>&1 || true' EXIT
podman image prune -f >/dev/null
key=$( { podman image inspect --format '{{.Id}}' "$base"; cat "$repo/pyproject.toml"
  sed '/^FROM dependencies$/q' "$repo/Dockerfile"; } | sha256sum | cut -c1-16)
if podman image exists "facessl-deps:$key"; then
  need_gb=${FACESSL_BUILD_FREE_GB:-2}
  log "dependency layers cached (facessl-deps:$key): a code-only build"
else
  need_gb=${FACESSL_BUILD_FREE_GB:-16}
fi
dirs=("$(podman info --format '{{.Store.GraphRoot}}')" "${TMPDIR:-/var/tmp}")
least_free_gb() {
  local dir free least=1000000
  for dir in "${dirs[@]}"; do
    free=$(df --output=avail -BG "$dir" | tail -1 | tr -dc 0-9)
    (( free < least )) && least=$free
  done
  echo "$least"
}
# the local image tags whose repository matches the extended regex $1
tags_of() { podman images --format '{{.Repository}}:{{.Tag}}' | grep -E "^(localhost/)?($1):" || true; }
if (( $(least_free_gb) < need_gb )) && [[ -n $(tags_of "${tag%%:*}|facessl-deps") ]]; then
  log "less than $need_gb GB free: removing the previous images to make room (their cached layers go with them)"
  tags_of "${tag%%:*}|facessl-deps" | xargs podman rmi -f >/dev/null
  podman image prune -f >/dev/null
fi
free_gb=$(least_free_gb)
if (( free_gb < need_gb )); then
  log "error: ${dirs[*]}: $free_gb GB free; the build needs about $need_gb GB there."
  log "Free some (old images: podman image prune -a; old work folders under /tmp) and run this again."
  exit 1
fi

build() {
  podman build --network host --build-arg "BASE_IMAGE=$base" -v "$conf:/etc/pip.conf:ro" "${mounts[@]}" "$@" "$repo" >&2
}
for target in cuda dependencies; do
  log "podman build --target $target (base $base)"
  build --target "$target"
done
log "podman build -t $tag"
build -t "$tag"
# one key tag at a time: an older one would keep its image, and its 6 GB of layers, alive
tags_of facessl-deps | xargs -r podman rmi >/dev/null 2>&1 || true
podman tag "$tag" "facessl-deps:$key"
echo "$tag"
