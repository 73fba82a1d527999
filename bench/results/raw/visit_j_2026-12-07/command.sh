#!/usr/bin/env bash
# Visit J (2026-12-07, fourth session), issue 22's memory rows on one lent GPU. Usage on the device machine, from
# the repo root, with .whl carried: bash bench/results/raw/visit_j_2026-12-07/command.sh PART ROWS [EXTRA]
# PART names the output files; ROWS is bench/memory_gpu.py's --rows, or "tests" (EXTRA: pytest's arguments).
# The wheels are installed once per machine; nvl itself at every call (the tree may have changed between calls).
set -o pipefail
PART=$1; ROWS=$2; shift 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [ -d /tmp/site/torchao ]; then
  rm -rf /tmp/nvl
  PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/nvl . plugins/*/ || exit 1
else
  source bench/device_setup.sh || exit 1
fi
export PYTHONPATH=/tmp/nvl:/tmp/site PATH=/tmp/nvl/bin:$PATH
git log -1 --format='tree at %h %s' 2>/dev/null | tee "$OUT/${PART}_gpu.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee -a "$OUT/${PART}_gpu.txt"
if [ "$ROWS" = tests ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs "$@" 2>&1 | tail -80 > "$OUT/${PART}_tests.log"
  tail -5 "$OUT/${PART}_tests.log"
  exit 0
fi
WORK=/tmp/mw-j  # one work dir per machine: the 12b-shape model directory and the data are written once
timeout "${BENCH_TIMEOUT:-560}" python3 bench/memory_gpu.py --rows "$ROWS" --work "$WORK" --out "$OUT" --tag "$PART" \
  --videos .whl/videos --run-timeout "${RUN_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/${PART}_bench.log" \
  | grep -E "^\[finetune_gpu"
tar czf "$OUT/${PART}_logs.tgz" -C "$WORK" $(cd "$WORK" && ls log-* metrics-* 2>/dev/null)
