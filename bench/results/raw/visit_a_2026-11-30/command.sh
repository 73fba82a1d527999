#!/usr/bin/env bash
# Visit A on nvidia-h200-x2 (2026-11-30, second session), two single-GPU jobs side by side:
#   GPU 0: `nvl finetune` LoRA on text at 4096 and 2048 beside the transformers+PEFT peer at 2048;
#   GPU 1: MedPix-like unpacked vs packed to 4096 (issue 14), then the GPU parity tests of the new
#          kernels (norms, squared ReLU, packed scan/conv, tiny-toy losses).
# Everything lands in $OUT/r.tgz (results/ = bench/results files, logs/ = each run's output), also when
# the time limit cuts the body short.
source bench/device_setup.sh || exit 1
export R=$OUT/results L=$OUT/logs W=/tmp/ftwork; mkdir -p "$R" "$L"
timeout -k 5 "${VISIT_S:-520}" bash -c '
(
  export CUDA_VISIBLE_DEVICES=1
  python3 bench/finetune_gpu.py --size 12b-shape --workloads medpix --variants "dataset.packing=best_fit" \
    --peer-seqs "" --steps 10 --warmup 3 --profile "" --run-timeout 150 --work $W/medpix --out "$R" --tag packing \
    > "$L/ft_packing.log" 2>&1
  python3 -m pytest -q -s -p no:cacheprovider plugins/nvl-nemotron-vl/tests/test_kernels_gpu.py \
    -k "norm or relu2 or seq_idx or packed or tiny_toy" > "$R/kernels_parity_gpu_b.log" 2>&1
  echo "parity exit $?" >> "$R/kernels_parity_gpu_b.log"
) &
export CUDA_VISIBLE_DEVICES=0
python3 bench/finetune_gpu.py --size 12b-shape --workloads text --seq 4096,2048 --peer-seqs 2048 --steps 8 \
  --run-timeout 200 --work $W/text --out "$R" --tag text > "$L/ft_text.log" 2>&1
wait
'
echo "body exit $?"
cp $W/*/log-*.txt "$L/" 2>/dev/null
tar czf "$OUT/r.tgz" -C "$OUT" results logs && rm -rf "$R" "$L"
ls -la "$OUT"
