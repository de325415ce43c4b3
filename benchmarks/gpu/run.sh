#!/usr/bin/env bash
# On the GPU machine, in the checkout's root: the full-settings suite for one part packed by pack.sh.
#   bash benchmarks/gpu/run.sh glint    # glint6, glint24-20: prepare-data there (16 cores), then training
#   bash benchmarks/gpu/run.sh celeba   # celeba-wild-75, celeba-pairs: --stage train on the packed data
# Installs nothing (torch, torchvision, OpenCV, scikit-learn, click, matplotlib, tqdm are on the machine;
# boto3 is only needed for s3:// locations). Stops the suite after BUDGET_S seconds (default 530) so that what
# it finished comes back: results.md, results.json, figures-<part>.tar and log-<part>.txt under $OUT.
set -uo pipefail
part=${1:?usage: run.sh glint|celeba}
out=${OUT:-/tmp/facessl-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FACESSL_COMMIT
FACESSL_COMMIT=$(cat ".devdata/$part/commit" 2>/dev/null || echo unknown)
nvidia-smi -L
python3 -c "import torch, torchvision, cv2, sklearn, click, matplotlib, tqdm; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), 'opencv', cv2.__version__)" || exit 3
case "$part" in
  glint) export FACESSL_SHARED=$PWD/.devdata/glint/shared; suite_out=/tmp/suite-glint
         args=(--benchmarks glint6,glint24-20) ;;
  celeba) suite_out=$PWD/.devdata/celeba/suite; args=(--benchmarks celeba-wild-75,celeba-pairs --stage train) ;;
  *) echo "unknown part $part: glint or celeba" >&2; exit 2 ;;
esac
timeout "${BUDGET_S:-530}" python3 benchmarks/suite.py --out "$suite_out" "${args[@]}" --device cuda \
  ${SUITE_ARGS:-} 2>&1 | tee "$out/log-$part.txt"
rc=${PIPESTATUS[0]}
cp "$suite_out"/results.md "$suite_out"/results.json "$out"/ 2>/dev/null
[ -d "$suite_out/figures" ] && tar -C "$suite_out" -cf "$out/figures-$part.tar" figures
echo "suite exit code $rc"
exit "$rc"
