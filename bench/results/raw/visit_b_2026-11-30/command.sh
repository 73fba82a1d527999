#!/usr/bin/env bash
# Visit B on nvidia-h200-x2 (2026-11-30, second session):
#   both GPUs: full fine-tuning at TP=2 through `nvl finetune --nproc-per-node 2`, text at seq 4096,
#              no checkpoint written (selective recompute follows only if the default runs out of memory);
#   then GPU 0: `nvl eval` throughput (bench/eval_gpu.py: 12b-shape toy, 256 CORD-like receipts, batch 32
#              vs batch 1 on the first 32);
#        GPU 1: MedPix-like LoRA unpacked vs packed to 4096 (issue 14).
source bench/device_setup.sh || exit 1
export R=$OUT/results L=$OUT/logs W=/tmp/ftwork-b; mkdir -p "$R" "$L"
timeout -k 5 "${VISIT_S:-540}" bash -c '
python3 bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text --peer-seqs "" \
  --steps 6 --warmup 2 --profile text --run-timeout 240 --work $W/tp2 --out "$R" --tag tp2 > "$L/ft_tp2.log" 2>&1
if grep -q "\"oom\"" "$R/finetune_gpu_tp2.json"; then
  python3 bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text --peer-seqs "" \
    --variants "model.recompute_granularity=selective" --skip-default --steps 6 --warmup 2 --profile "" \
    --run-timeout 200 --work $W/tp2s --out "$R" --tag tp2_selective > "$L/ft_tp2_selective.log" 2>&1
fi
(
  export CUDA_VISIBLE_DEVICES=1
  python3 bench/finetune_gpu.py --size 12b-shape --workloads medpix --variants "dataset.packing=best_fit" \
    --peer-seqs "" --steps 10 --warmup 3 --profile "" --run-timeout 200 --work $W/medpix --out "$R" --tag packing \
    > "$L/ft_packing.log" 2>&1
) &
export CUDA_VISIBLE_DEVICES=0
nvl toy-model /tmp/toy-12b --size 12b-shape --device cuda > "$L/eval_toy.log" 2>&1
python3 bench/eval_gpu.py --model-dir /tmp/toy-12b --batch1-samples 32 --out "$R/eval_gpu.json" > "$L/eval_gpu.log" 2>&1
echo "eval exit $?" >> "$L/eval_gpu.log"
wait
'
echo "body exit $?"
cp $W/*/log-*.txt "$L/" 2>/dev/null
tar czf "$OUT/r.tgz" -C "$OUT" results logs && rm -rf "$R" "$L"
ls -la "$OUT"
