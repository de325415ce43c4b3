#!/usr/bin/env bash
# The main job: prepare-data -> pretrain-simclr -> train-classifier on the glint6 benchmark
# (6 identities of glint24), then print the test metrics.
#
# Usage: infra/local/run-pipeline.sh [RAW_DIR] [OUT_DIR]
#   RAW_DIR  raw photos, one folder per identity (default ../shared/data/faces/glint24, beside the repo)
#   OUT_DIR  where prepared/, simclr/ and classifier/ go (default ./runs/glint6); may be s3://bucket/prefix
# The first run creates .venv with the package installed. Settings are sized for a 2-core CPU
# (about 8 minutes on an idle 2-core CPU); on a GPU raise EPOCHS_* and the image sizes (see README, "Measured results").
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# the shared data: FACESSL_SHARED, or ../shared beside the checkout
default_raw=${FACESSL_SHARED:-$repo/../shared}/data/faces/glint24
raw=${1:-$default_raw}
out=${2:-$repo/runs/glint6}
if [[ "$raw" != s3://* && ! -d "$raw" ]]; then
  echo "error: raw photo folder $raw not found (pass it as the first argument)" >&2
  exit 2
fi
venv=$("$repo/infra/ci/setup-venv.sh")
export PATH="$venv/bin:$PATH"

CLASSES="Leonardo DiCaprio,Barack Obama,Keanu Reeves,Tom Hanks,Keira Knightley,Jennifer Aniston"
EPOCHS_SIMCLR=${EPOCHS_SIMCLR:-12}
EPOCHS_CLASSIFIER=${EPOCHS_CLASSIFIER:-10}
SEED=${SEED:-1337}

start=$(date +%s)
echo "== prepare-data: $raw -> $out/prepared"
prepare-data --input "$raw" --output "$out/prepared" --classes "$CLASSES" --image-size 112 \
  --on-no-face keep-full --seed "$SEED"
echo "== pretrain-simclr: $out/simclr"
pretrain-simclr --data "$out/prepared" --output "$out/simclr" --epochs "$EPOCHS_SIMCLR" --image-size 64 \
  --batch-size 128 --warmup-epochs 1 --knn-every "$EPOCHS_SIMCLR" --log-every 0 --seed "$SEED"
echo "== train-classifier: $out/classifier"
train-classifier --data "$out/prepared" --output "$out/classifier" --encoder "$out/simclr" \
  --epochs "$EPOCHS_CLASSIFIER" --image-size 96 --optimizer adamw --lr 1e-3 --weight-decay 0.05 \
  --label-smoothing 0.1 --warmup-epochs 1 --seed "$SEED"
python - "$out" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from facessl.common.storage import open_storage
m = json.loads(open_storage(sys.argv[1]).read_text("classifier/metrics.json"))
print(f"\nglint6 test metrics ({m['test']['n']} images, {len(m['classes'])} identities):")
print(f"  top-1 {m['test']['top1']:.4f}   top-3 {m['test']['top3']:.4f}   macro-F1 {m['test']['macro_f1']:.4f}")
print(f"  pipeline time {int(sys.argv[2]) // 60} min {int(sys.argv[2]) % 60} s; outputs in {sys.argv[1]}")
PY
