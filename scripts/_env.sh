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
want=$(cat pyproject.toml scripts/install-llama.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing dependencies into .venv (first run builds llama.cpp: about 5 minutes on 2 cores)..."
  python -m pip install --quiet --upgrade pip
  # first, so that the project's own install finds it satisfied and never takes one from pip's cache
  bash scripts/install-llama.sh
  python -m pip install --quiet -e ".${extras:+[$extras]}"
  # prove the embedded model generates on this CPU before saying the install is done
  python -m agent.llm.providers.local_selftest
  echo "$want" > "$stamp"
else
  bash scripts/install-llama.sh  # a no-op unless llama-cpp-python was replaced since
fi
