# Shared by scripts/run and scripts/test: create .venv and install the project (skipped when up to date).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
extras=${1:-}
stamp=".venv/.installed${extras:+-$extras}"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing dependencies (first run compiles llama.cpp: about 5 minutes on 2 cores)..."
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
