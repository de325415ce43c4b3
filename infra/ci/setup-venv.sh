#!/usr/bin/env bash
# Create (once) the project's virtual environment and install facessl into it.
# Usage: infra/ci/setup-venv.sh [EXTRAS]   e.g. "dev" for the test tools. Prints the venv path.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=${FACESSL_VENV:-$repo/.venv}
extras=${1:-}
spec="$repo"
[ -n "$extras" ] && spec="$repo[$extras]"
stamp="$venv/.facessl-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  echo "installing facessl${extras:+[$extras]} into $venv (a first set-up takes a few minutes)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec" >&2
  touch "$stamp"
fi
echo "$venv"
