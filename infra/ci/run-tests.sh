#!/usr/bin/env bash
# The test command: set up the virtual environment with the dev extras, then run the whole test suite.
# Needs the real data of ../shared (or FACESSL_SHARED pointing at it). Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=$("$repo/infra/ci/setup-venv.sh" dev)
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
