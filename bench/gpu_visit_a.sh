#!/usr/bin/env bash
# One visit on nvidia-h200-x2 (2026-11-30, second session): single-GPU measurements side by side.
#   GPU 0: `nvl finetune` LoRA benchmarks (text at 4096 and 2048 beside the transformers+PEFT peer at
#          2048; CORD-like; MedPix-like unpacked vs packed to 4096);
#   GPU 1: the GPU parity tests of the new kernels (norms, squared ReLU, packed scan/conv, tiny-toy
#          losses), then `nvl eval`'s throughput (bench/eval_gpu.py, batch 32 vs batch 1).
# Everything lands in $OUT/r.tgz (results/ = bench/results files, logs/ = each run's output).
source bench/device_setup.sh || exit 1
R=$OUT/results L=$OUT/logs; mkdir -p "$R" "$L"
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 330 python3 -m pytest -q -s -p no:cacheprovider plugins/nvl-nemotron-vl/tests/test_kernels_gpu.py \
    -k "norm or relu2 or seq_idx or packed or tiny_toy" > "$R/kernels_parity_gpu_b.log" 2>&1
  echo "parity exit $?" >> "$R/kernels_parity_gpu_b.log"
  timeout 150 nvl toy-model /tmp/toy-12b --size 12b-shape --device cuda > "$L/eval_toy.log" 2>&1
  timeout 240 python3 bench/eval_gpu.py --model-dir /tmp/toy-12b --batch1-samples 32 --out "$R/eval_gpu.json" \
    > "$L/eval_gpu.log" 2>&1
  echo "eval exit $?" >> "$L/eval_gpu.log"
) &
BG=$!
export CUDA_VISIBLE_DEVICES=0
W=/tmp/ftwork
python3 bench/finetune_gpu.py --size 12b-shape --workloads text --seq 4096,2048 --peer-seqs 2048 --steps 8 \
  --run-timeout 240 --work $W/text --out "$R" --tag text > "$L/ft_text.log" 2>&1
python3 bench/finetune_gpu.py --size 12b-shape --workloads cord --peer-seqs '' --steps 8 --profile '' \
  --run-timeout 150 --work $W/cord --out "$R" --tag cord > "$L/ft_cord.log" 2>&1
python3 bench/finetune_gpu.py --size 12b-shape --workloads medpix --variants 'dataset.packing=best_fit' \
  --peer-seqs '' --steps 10 --warmup 3 --profile '' --run-timeout 150 --work $W/medpix --out "$R" --tag packing \
  > "$L/ft_packing.log" 2>&1
wait $BG
cp $W/*/log-*.txt "$L/" 2>/dev/null
tar czf "$OUT/r.tgz" -C "$OUT" results logs && rm -rf "$R" "$L"
ls -la "$OUT"
