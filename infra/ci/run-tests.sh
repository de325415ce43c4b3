#!/usr/bin/env bash
# The test command: set up the virtual environment with the dev extras, then run the tests.
#   infra/ci/run-tests.sh            the fast tier: everything that trains nothing, plus a smoke run of the jobs
#   infra/ci/run-tests.sh --all      every tier: slow (training), suite (reduced benchmark), container, infra
# Needs the real data of ../shared (or FACESSL_SHARED pointing at it). Other arguments go to pytest
# (a -m of your own replaces the tier's selection).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=$("$repo/infra/ci/setup-venv.sh" dev)
cd "$repo"
select=(-m "not slow and not suite and not container")
args=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then select=(); else args+=("$arg"); fi
done
exec "$venv/bin/python" -m pytest "${select[@]}" "${args[@]}"
