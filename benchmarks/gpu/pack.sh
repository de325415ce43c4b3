#!/usr/bin/env bash
# Ready the full-settings benchmark suite for a GPU machine that receives the checkout plus at most
# 64 MiB per call (this project's lent H200; see benchmarks/gpu/README.md). Runs here, on the CPU:
#   .devdata/glint/   the raw glint24 photos (hard links) for glint6 and glint24-20, prepared there
#   .devdata/celeba/  celeba-wild-75 and celeba-pairs after the suite's CPU stage (prepare-data, pair crops at
#                     112 px), so the GPU machine needs none of celeba-wild's 125 MB of raw photos
# and checks that each part, with the working tree, fits one call.
# Usage: benchmarks/gpu/pack.sh            (about 6 minutes on 2 cores: face detection on 6,289 photos)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
shared=${FACESSL_SHARED:-$repo/../shared}
[ -d "$shared/data/faces" ] || shared=/work/shared
faces="$shared/data/faces"
venv=$(infra/ci/setup-venv.sh)
rm -rf .devdata
mkdir -p .devdata/glint/shared/data/faces .devdata/celeba
cp -al "$faces/glint24" .devdata/glint/shared/data/faces/ 2>/dev/null || cp -r "$faces/glint24" .devdata/glint/shared/data/faces/
FACESSL_SHARED=$shared "$venv/bin/python" benchmarks/suite.py --out .devdata/celeba/suite --stage prepare \
  --benchmarks celeba-wild-75,celeba-pairs
rm -rf .devdata/celeba/suite/celeba-pairs-pretrain-raw   # raw photos: the GPU stage reads the prepared shards
commit=$(git rev-parse --short HEAD)$([ -n "$(git status --porcelain --untracked-files=no)" ] && echo +changes)
echo "$commit" > .devdata/glint/commit
echo "$commit" > .devdata/celeba/commit
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
status=0
for part in glint celeba; do
  size=$(du -sb ".devdata/$part" | cut -f1)
  total=$((size + tree))
  echo "$part: $((size / 1048576)) MiB + working tree $((tree / 1048576)) MiB = $((total / 1048576)) MiB of 64"
  [ "$total" -le "$limit" ] || { echo "  too large for one call" >&2; status=1; }
done
exit $status
