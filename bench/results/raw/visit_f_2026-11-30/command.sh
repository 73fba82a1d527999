#!/usr/bin/env bash
# Visit F on nvidia-h200-x2 (2026-11-30, third session; issue 14), after visit E plus: the squared ReLU
# kept in bf16 under autocast (a product, not pow), the trained fp32 biases added in the output dtype
# (the ViT no longer runs in fp32 between its matmuls), fewer host synchronisations (pinned cu_seqlens,
# vision embeddings merged by integer positions, one sync for the id check):
#   GPU 0: the record: MedPix-like LoRA, one sample per row vs packed to 4096 (best_fit), in one
#          bench invocation; the packed run's last step profiled, the one before traced for host syncs;
#   GPU 1: GPU tests of what changed (tiny toy auto vs reference, packed row with kernels, squared ReLU
#          dtype and parity, CUDA-graph capture), then generation (eager vs CUDA-graph step).
source bench/device_setup.sh || exit 1
export R=$OUT/results L=$OUT/logs W=/tmp/ftwork-f; mkdir -p "$R" "$L"
timeout -k 5 "${VISIT_S:-540}" bash -c '
(
  export CUDA_VISIBLE_DEVICES=1
  python3 -m pytest -q -s -p no:cacheprovider plugins/nvl-nemotron-vl/tests/test_kernels_gpu.py \
    -k "packed_row or squared_relu or tiny_toy_training or graph" > "$R/kernels_parity_gpu.log" 2>&1
  echo "parity exit $?" >> "$R/kernels_parity_gpu.log"
  python3 bench/generate_gpu.py --out "$R/generate_gpu" --new-tokens 64 --repeats 1 --variants eager,cudagraph \
    --skip-peer --time-budget 120 > "$L/generate_gpu.log" 2>&1
  echo "generate exit $?" >> "$L/generate_gpu.log"
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
