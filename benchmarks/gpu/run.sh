#!/usr/bin/env bash
# On the GPU machine, in the checkout's root: the full-settings suite for one part packed by pack.sh.
#   bash benchmarks/gpu/run.sh glint    # carry .devdata/glint.tgz: glint6, glint24-20 (prepare-data there, 16 cores)
#   bash benchmarks/gpu/run.sh celeba   # carry .devdata/celeba.tgz and .devdata/carry-in (the glint part's
#                                       # results.json and figures/): celeba-wild-75, celeba-pairs, --stage train
# Installs nothing (torch, torchvision, OpenCV, scikit-learn, click, matplotlib, tqdm are on the machine;
# boto3 is only needed for s3:// locations). Stops the suite after BUDGET_S seconds (default 530) so that what
# it finished comes back: results.md, results.json, figures-<part>.tar and log-<part>.txt under $OUT.
set -uo pipefail
part=${1:-}
case "$part" in glint|celeba) ;; *) echo "usage: run.sh glint|celeba (got '$part')" >&2; exit 2 ;; esac
out=${OUT:-/tmp/facessl-gpu-out}
work=/tmp/facessl-$part
rm -rf "$work"   # a rerun on a warm machine starts from the archive, not from the last run's outputs
mkdir -p "$out" "$work"
tar -C "$work" -xzf ".devdata/$part.tgz" || { echo "no .devdata/$part.tgz: run pack.sh and carry it" >&2; exit 3; }
export PYTHONUNBUFFERED=1 FACESSL_COMMIT
FACESSL_COMMIT=$(cat "$work/$part/commit" 2>/dev/null || echo unknown)
nvidia-smi -L
python3 -c "import torch, torchvision, cv2, sklearn, click, matplotlib, tqdm; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), 'opencv', cv2.__version__)" || exit 3
if [ "$part" = glint ]; then
  export FACESSL_SHARED=$work/glint/shared
  suite_out=$work/suite; args=(--benchmarks glint6,glint24-20)
else
  suite_out=$work/celeba/suite; args=(--benchmarks celeba-wild-75,celeba-pairs --stage train)
  [ -d .devdata/carry-in ] && cp -r .devdata/carry-in/. "$suite_out"/   # the glint rows and figures, merged
fi
timeout "${BUDGET_S:-530}" python3 benchmarks/suite.py --out "$suite_out" "${args[@]}" --device "${DEVICE:-cuda}" \
  ${SUITE_ARGS:-} 2>&1 | tee "$out/log-$part.txt"
rc=${PIPESTATUS[0]}
cp "$suite_out"/results.md "$suite_out"/results.json "$out"/ 2>/dev/null
mkdir -p "$suite_out/figures" && tar -C "$suite_out" -cf "$out/figures-$part.tar" figures
echo "suite exit code $rc"
exit "$rc"
