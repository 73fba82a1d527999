#!/usr/bin/env bash
# Create (or reuse) a virtual environment with nvlcore, every plugin under plugins/ and the test tools.
# Keeps an existing torch (a CUDA build, say); otherwise installs the CPU build first so that no
# dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
P="$VENV/bin/python"
"$P" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
if ! "$P" -c "import torch" 2>/dev/null; then
  echo "== installing torch (CPU build)"
  "$P" -m pip install -q "torch==${NVL_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
fi
args=(-e ".[test,wandb]")
for d in plugins/*/; do
  [ -f "$d/pyproject.toml" ] || continue
  if grep -q '^video *=' "$d/pyproject.toml"; then args+=(-e "${d%/}[video]"); else args+=(-e "${d%/}"); fi
done
echo "== installing nvlcore and ${#args[@]} packages"
"$P" -m pip install -q "${args[@]}" 2>&1 | grep -vE '^WARNING: Location|BuildBackendWarning|^ *$' || true
"$P" -c "import nvlcore, torch; print('nvlcore', nvlcore.__version__, '| torch', torch.__version__)"
