#!/usr/bin/env bash
# Visit C on nvidia-h200-x2 (2026-11-30, second session):
#   both GPUs: full fine-tuning at TP=2 (`nvl finetune` as two torchrun ranks), text at seq 4096, no
#              checkpoint written; selective recompute follows only if the default runs out of memory;
#   then GPU 0: `nvl eval` throughput (bench/eval_gpu.py: 12b-shape toy, 256 CORD-like receipts, batch 32
#              vs batch 1 on the first 32), then MedPix-like packed with 8 loader workers;
#        GPU 1: LoRA text at seq 2048 with micro-batch 1 and 2 beside the transformers+PEFT peer at 2048,
#              then the packed-sample GPU parity tests.
source bench/device_setup.sh || exit 1
export R=$OUT/results L=$OUT/logs W=/tmp/ftwork-c; mkdir -p "$R" "$L"
timeout -k 5 "${VISIT_S:-550}" bash -c '
python3 bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text --peer-seqs "" \
  --steps 6 --warmup 2 --profile text --run-timeout 240 --work $W/tp2 --out "$R" --tag tp2 > "$L/ft_tp2.log" 2>&1
if grep -q "\"oom\"" "$R/finetune_gpu_tp2.json"; then
  python3 bench/finetune_gpu.py --size 12b-shape --methods full --tp 2 --nproc 2 --workloads text --peer-seqs "" \
    --variants "model.recompute_granularity=selective" --skip-default --steps 6 --warmup 2 --profile "" \
    --run-timeout 200 --work $W/tp2s --out "$R" --tag tp2_selective > "$L/ft_tp2_selective.log" 2>&1
fi
(
  export CUDA_VISIBLE_DEVICES=1
  python3 bench/finetune_gpu.py --size 12b-shape --workloads text --seq 2048 --variants "train.micro_batch_size=2" \
    --peer-seqs 2048 --steps 8 --profile "" --run-timeout 150 --work $W/s2048 --out "$R" --tag seq2048 \
    > "$L/ft_seq2048.log" 2>&1
  python3 -m pytest -q -s -p no:cacheprovider plugins/nvl-nemotron-vl/tests/test_kernels_gpu.py \
    -k "seq_idx or packed" > "$R/kernels_parity_gpu_packed.log" 2>&1
  echo "parity exit $?" >> "$R/kernels_parity_gpu_packed.log"
) &
export CUDA_VISIBLE_DEVICES=0
nvl toy-model /tmp/toy-12b --size 12b-shape --device cuda > "$L/eval_toy.log" 2>&1
python3 bench/eval_gpu.py --model-dir /tmp/toy-12b --batch1-samples 32 --out "$R/eval_gpu.json" > "$L/eval_gpu.log" 2>&1
echo "eval exit $?" >> "$L/eval_gpu.log"
python3 bench/finetune_gpu.py --size 12b-shape --workloads medpix --skip-default \
  --variants "dataset.packing=best_fit,dataset.num_workers=8" --peer-seqs "" --steps 10 --warmup 3 --profile "" \
  --run-timeout 200 --work $W/medpix --out "$R" --tag packing_nw8 > "$L/ft_packing_nw8.log" 2>&1
wait
'
echo "body exit $?"
cp $W/*/log-*.txt "$L/" 2>/dev/null
tar czf "$OUT/r.tgz" -C "$OUT" results logs && rm -rf "$R" "$L"
ls -la "$OUT"
