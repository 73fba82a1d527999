#!/usr/bin/env bash
# Visit K (2026-12-07, fifth session): issue 22's memory rows and issue 23's CUDA-graph rows on one lent GPU.
# Usage on the device machine, from the repo root, with .whl carried:
#   bash bench/results/raw/visit_k_2026-12-07/command.sh PART MODE [ARGS]
# MODE: "mem ROWS [memory_gpu.py args]", "ft [finetune_gpu.py args]" or "tests [pytest args]"; PART names the
# output files. The wheels are installed once per machine; nvl itself at every call (the tree may have changed).
set -o pipefail
PART=$1; MODE=$2; shift 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [ -d /tmp/site/torchao ]; then
  rm -rf /tmp/nvl
  PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/nvl . plugins/*/ || exit 1
else
  source bench/device_setup.sh || exit 1
fi
export PYTHONPATH=/tmp/nvl:/tmp/site PATH=/tmp/nvl/bin:$PATH
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$OUT/${PART}_gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/${PART}_gpu.txt"
WORK=/tmp/mw-k  # one work dir per machine: the 12b-shape model directory and the data are written once
case "$MODE" in
  tests)
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs "$@" 2>&1 | tail -120 > "$OUT/${PART}_tests.log"
    tail -5 "$OUT/${PART}_tests.log" ;;
  mem)
    ROWS=$1; shift
    timeout "${BENCH_TIMEOUT:-560}" python3 bench/memory_gpu.py --rows "$ROWS" --work "$WORK" --out "$OUT" --tag "$PART" \
      --videos .whl/videos --run-timeout "${RUN_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/${PART}_bench.log" \
      | grep -E "^\[finetune_gpu" ;;
  ft)
    timeout "${BENCH_TIMEOUT:-560}" python3 bench/finetune_gpu.py --work "$WORK" --out "$OUT" --tag "$PART" \
      --run-timeout "${RUN_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/${PART}_bench.log" | grep -E "^\[finetune_gpu" ;;
esac
cp -f "$WORK"/profile_* "$OUT"/ 2>/dev/null
tar czf "$OUT/${PART}_logs.tgz" -C "$WORK" $(cd "$WORK" 2>/dev/null && ls log-* metrics-* 2>/dev/null)
