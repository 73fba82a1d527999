#!/usr/bin/env bash
# One visit on nvidia-h200-x2 (2026-11-30, second session): full fine-tuning at TP=2 through
# `nvl finetune --nproc-per-node 2`, text at seq 4096 and CORD-like receipts, no checkpoint written.
# If the default (no recompute) runs out of memory, the same run with selective recompute follows.
source bench/device_setup.sh || exit 1
R=$OUT/results L=$OUT/logs; mkdir -p "$R" "$L"
W=/tmp/ftwork-tp2
python3 bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text,cord --peer-seqs '' \
  --steps 6 --warmup 2 --profile text --run-timeout 240 --work $W/a --out "$R" --tag tp2 > "$L/ft_tp2.log" 2>&1
if grep -q '"oom"' "$R/finetune_gpu_tp2.json"; then
  python3 bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text --peer-seqs '' \
    --variants 'model.recompute_granularity=selective' --skip-default --steps 6 --warmup 2 --profile '' --run-timeout 240 \
    --work $W/b --out "$R" --tag tp2_selective > "$L/ft_tp2_selective.log" 2>&1
fi
cp $W/*/log-*.txt "$L/" 2>/dev/null
tar czf "$OUT/r.tgz" -C "$OUT" results logs && rm -rf "$R" "$L"
ls -la "$OUT"
