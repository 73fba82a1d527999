#!/usr/bin/env bash
# One call of a GPU visit (the device tool), kept in the tree so a visit record can name the commit it ran.
# Usage on the device machine, from the repo root, with .whl carried:
#   bash bench/device_visit.sh PART MODE [ARGS]
# MODE: "mem ROWS [memory_gpu.py args]", "ft [finetune_gpu.py args]" or "tests [pytest args]"; PART names the
# output files. bench/device_setup.sh installs the wheels once per machine and nvl at every call.
set -o pipefail
PART=$1; MODE=$2; shift 2
source bench/device_setup.sh > /tmp/nvl-setup.txt 2>&1 || { cat /tmp/nvl-setup.txt; exit 1; }
tee "$OUT/${PART}_gpu.txt" < /tmp/nvl-setup.txt
source bench/device_kernel_cache.sh restore  # compiled and autotuned kernels of an earlier visit, if carried
WORK=/tmp/nvl-visit  # one work dir per machine: the 12b-shape model directory and the data are written once
case "$MODE" in
  tests)
    # SIGINT, not timeout's SIGTERM: pytest then stops as on Ctrl-C and still prints the failures so far (visit L's
    # run, killed by SIGTERM, left only "FF"); --tb=short -rfEs keeps each failure's reason short and in the log
    timeout -s INT -k 30 "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider --tb=short -rfEs "$@" \
      > "$OUT/${PART}_tests.log" 2>&1
    tail -25 "$OUT/${PART}_tests.log" ;;
  mem)
    ROWS=$1; shift
    timeout "${BENCH_TIMEOUT:-560}" python3 bench/memory_gpu.py --rows "$ROWS" --work "$WORK" --out "$OUT" --tag "$PART" \
      --videos .whl/videos --run-timeout "${RUN_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/${PART}_bench.log" \
      | grep -E "^\[finetune_gpu" ;;
  ft)
    timeout "${BENCH_TIMEOUT:-560}" python3 bench/finetune_gpu.py --work "$WORK" --out "$OUT" --tag "$PART" \
      --run-timeout "${RUN_TIMEOUT:-300}" "$@" 2>&1 | tee "$OUT/${PART}_bench.log" | grep -E "^\[finetune_gpu" ;;
esac
# the runs' logs and metrics, and any profiles, in one file (at most 8 files come back, named in safe characters)
PROFILES=$(cd "$OUT" && ls profile_* 2>/dev/null)
LOGS=$(cd "$WORK" 2>/dev/null && ls log-* metrics-* 2>/dev/null)
if [ -n "$LOGS$PROFILES" ]; then
  tar czf "$OUT/${PART}_logs.tgz" ${LOGS:+-C "$WORK" $LOGS} ${PROFILES:+-C "$OUT" $PROFILES} && (cd "$OUT" && rm -f $PROFILES)
fi
source bench/device_kernel_cache.sh save
