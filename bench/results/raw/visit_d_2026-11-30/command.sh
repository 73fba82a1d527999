#!/usr/bin/env bash
# Visit D on nvidia-h200-x2 (2026-11-30, third session; issue 14):
#   GPU 0: MedPix-like LoRA packed to 4096 (best_fit) with the packed-batch prefetch thread, one step profiled
#          (per-op and per-input-shape tables);
#   GPU 1: packed causal attention, SDPA block mask vs varlen flash (bench/attention_packed_gpu.py);
#          the GPU parity tests not yet run to the end (packed bf16 scan, packed conv, packed tiny toy,
#          CUDA-graph capture); generation after issue 15's refactor (bench/generate_gpu.py: eager vs
#          CUDA-graph step, cached step vs full forward, no peer).
source bench/device_setup.sh || exit 1
export R=$OUT/results L=$OUT/logs W=/tmp/ftwork-d; mkdir -p "$R" "$L"
timeout -k 5 "${VISIT_S:-540}" bash -c '
(
  export CUDA_VISIBLE_DEVICES=1
  python3 bench/attention_packed_gpu.py --seq 4096 --sample 300 > "$R/attention_packed.log" 2>&1
  python3 -m pytest -q -s -p no:cacheprovider plugins/nvl-nemotron-vl/tests/test_kernels_gpu.py \
    -k "seq_idx or packed or graph" > "$R/kernels_parity_gpu_packed.log" 2>&1
  echo "parity exit $?" >> "$R/kernels_parity_gpu_packed.log"
  python3 bench/generate_gpu.py --out "$R/generate_gpu" --new-tokens 64 --repeats 1 --variants eager,cudagraph \
    --skip-peer --time-budget 200 > "$L/generate_gpu.log" 2>&1
  echo "generate exit $?" >> "$L/generate_gpu.log"
) &
export CUDA_VISIBLE_DEVICES=0
python3 bench/finetune_gpu.py --size 12b-shape --workloads medpix --skip-default --variants "dataset.packing=best_fit" \
  --peer-seqs "" --steps 10 --warmup 3 --profile medpix --run-timeout 300 --work $W/medpix --out "$R" --tag packing \
  > "$L/ft_packing.log" 2>&1
wait
'
echo "body exit $?"
cp $W/*/log-*.txt "$L/" 2>/dev/null
tar czf "$OUT/r.tgz" -C "$OUT" results logs && rm -rf "$R" "$L"
ls -la "$OUT"
