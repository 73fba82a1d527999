#!/usr/bin/env bash
# Create (or reuse) a virtual environment with nvlcore, every plugin under plugins/ and the test tools.
# Keeps an existing torch (a CUDA build, say); otherwise installs torch==2.13.0 (the CPU build where the
# index offers it) first, so that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${NVL_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
P="$VENV/bin/python"

# pip, quietly; on failure show what pip said and stop (a silent half-installed venv is worse)
pip_install() {
  local log
  log=$(mktemp)
  if ! "$P" -m pip install "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: 'pip install $*' failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
}

if "$P" -c "import torch" 2>/dev/null; then
  echo "== keeping installed torch $("$P" -c 'import torch; print(torch.__version__)')"
else
  echo "== installing torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
fi

args=(-e ".[test,wandb]")
for d in plugins/*/; do
  [ -f "$d/pyproject.toml" ] || continue
  if grep -q '^video *=' "$d/pyproject.toml"; then args+=(-e "${d%/}[video]"); else args+=(-e "${d%/}"); fi
done
echo "== installing nvlcore and $(( ${#args[@]} / 2 - 1 )) plugins (editable, with test extras)"
pip_install "${args[@]}"
"$P" -c "import nvlcore, torch; print('== nvlcore', nvlcore.__version__, '| torch', torch.__version__)"
"$VENV/bin/nvl" plugins list
