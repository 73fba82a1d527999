#!/usr/bin/env bash
# Visit H (2026-12-07, second session), issue 22's memory rows on one lent GPU. Usage on the device machine,
# from the repo root, with .whl carried: bash bench/results/raw/visit_h_2026-12-07/command.sh PART ROWS [EXTRA]
# PART names the output files; ROWS is bench/memory_gpu.py's --rows (or "tests" for the GPU tests).
set -o pipefail
PART=$1; ROWS=$2; shift 2
[ -d /tmp/nvl/nvlcore ] || { source bench/device_setup.sh || exit 1; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONPATH=/tmp/nvl:/tmp/site PATH=/tmp/nvl/bin:$PATH
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$OUT/${PART}_gpu.txt"
if [ "$ROWS" = tests ]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tail -60 > "$OUT/${PART}_tests.log"
  exit 0
fi
WORK=/tmp/mw-h  # one work dir for the whole visit: the 12b-shape model directory and the data are written once
timeout "${BENCH_TIMEOUT:-560}" python3 bench/memory_gpu.py --rows "$ROWS" --work "$WORK" --out "$OUT" --tag "$PART" \
  --videos .whl/videos --run-timeout 300 "$@" 2>&1 | tee "$OUT/${PART}_bench.log" | grep -E "^\[finetune_gpu"
tar czf "$OUT/${PART}_logs.tgz" -C "$WORK" $(cd "$WORK" && ls log-* metrics-* 2>/dev/null)
