#!/usr/bin/env bash
# Ready the full-settings benchmark suite for a GPU machine that receives the checkout plus at most
# 64 MiB per call (this project's lent H200; see benchmarks/gpu/README.md). Runs here, on the CPU, and writes
#   .devdata/glint.tgz    the raw glint24 photos, for glint6 and glint24-20 (prepared on the GPU machine)
#   .devdata/celeba.tgz   celeba-wild-75 and celeba-pairs after the suite's CPU stage (prepare-data and the
#                         pair photos' face crops, at 112 px): none of celeba-wild's 125 MB of raw photos travel
# then checks that each archive, with the working tree, fits one call. gzip takes the tar padding out of the
# shards (celeba: 68 MB of files, 48 MB packed); the JPEGs themselves do not shrink.
# Usage: benchmarks/gpu/pack.sh     (about 11 minutes on 2 cores: face detection on 6,289 photos)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
shared=${FACESSL_SHARED:-$repo/../shared}
venv=$(infra/ci/setup-venv.sh)
rm -rf .devdata
mkdir -p .devdata/glint/shared/data/faces .devdata/celeba
cp -al "$shared/data/faces/glint24" .devdata/glint/shared/data/faces/ 2>/dev/null ||
  cp -r "$shared/data/faces/glint24" .devdata/glint/shared/data/faces/
FACESSL_SHARED=$shared "$venv/bin/python" benchmarks/suite.py --out .devdata/celeba/suite --stage prepare \
  --benchmarks celeba-wild-75,celeba-pairs
rm -rf .devdata/celeba/suite/celeba-pairs-pretrain-raw   # raw photos: the GPU stage reads the prepared shards
commit=$(git rev-parse --short HEAD)$([ -n "$(git status --porcelain --untracked-files=no)" ] && echo +changes)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024 - 2 * 1024 * 1024))   # 2 MiB left for the results carried into the second call
status=0
for part in glint celeba; do
  echo "$commit" > ".devdata/$part/commit"
  tar -C .devdata -czf ".devdata/$part.tgz" "$part"
  size=$(stat -c %s ".devdata/$part.tgz")
  echo "$part.tgz: $((size / 1048576)) MiB + working tree $((tree / 1048576)) MiB, of 62 MiB"
  [ $((size + tree)) -le "$limit" ] || { echo "  too large for one call" >&2; status=1; }
done
exit $status
