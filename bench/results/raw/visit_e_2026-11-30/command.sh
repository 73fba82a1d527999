#!/usr/bin/env bash
# Visit E on nvidia-h200-x2 (2026-11-30, third session; issue 14), after: the packed-batch prefetch
# thread, LoRA without fp32 up-casts under autocast, packed attention through varlen flash attention,
# sample boundaries from the processor (no GPU sync per layer):
#   GPU 0: the record: MedPix-like LoRA, one sample per row vs packed to 4096 (best_fit), in one
#          bench invocation; the packed run's last step profiled, the one before traced for host syncs;
#   GPU 1: packed attention kernels side by side (bench/attention_packed_gpu.py); the packed GPU parity
#          tests (varlen attention vs the fp32 block mask, the scan's reset check, conv, tiny toy).
source bench/device_setup.sh || exit 1
export R=$OUT/results L=$OUT/logs W=/tmp/ftwork-e; mkdir -p "$R" "$L"
timeout -k 5 "${VISIT_S:-550}" bash -c '
(
  export CUDA_VISIBLE_DEVICES=1
  python3 bench/attention_packed_gpu.py --seq 4096 --sample 300 > "$R/attention_packed.log" 2>&1
  python3 -m pytest -q -s -p no:cacheprovider plugins/nvl-nemotron-vl/tests/test_kernels_gpu.py \
    -k "packed_attention or scan_kernel_with_seq_idx or conv_kernel_with_seq_idx or packed_row" \
    > "$R/kernels_parity_gpu_packed.log" 2>&1
  echo "parity exit $?" >> "$R/kernels_parity_gpu_packed.log"
) &
export CUDA_VISIBLE_DEVICES=0
python3 bench/finetune_gpu.py --size 12b-shape --workloads medpix --variants "dataset.packing=best_fit" \
  --peer-seqs "" --steps 12 --warmup 3 --profile medpix --profile-variant 1 --run-timeout 300 --work $W/medpix \
  --out "$R" --tag packing > "$L/ft_packing.log" 2>&1
wait
'
echo "body exit $?"
cp $W/*/log-*.txt "$L/" 2>/dev/null
tar czf "$OUT/r.tgz" -C "$OUT" results logs && rm -rf "$R" "$L"
ls -la "$OUT"
