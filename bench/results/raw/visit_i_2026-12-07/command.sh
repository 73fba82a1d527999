#!/usr/bin/env bash
# Visit I (2026-12-07, third session), issue 22 on one lent H100: the video row (decord now carried), QLoRA at
# 22 GB with full recomputation asked for, and the auto QLoRA run of visit H again with --debug for the
# traceback of its out-of-memory. From the repo root with .whl carried: bash .../command.sh
set -o pipefail
source bench/device_setup.sh || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
WORK=/tmp/mw-i
timeout 400 python3 bench/memory_gpu.py --rows video_8192_80,qlora_24_full --no-baseline video_8192_80,qlora_24_full \
  --work "$WORK" --out "$OUT" --tag pC --videos .whl/videos --run-timeout 240 --steps 5 --warmup 2 2>&1 \
  | tee "$OUT/pC_bench.log" | grep -E "^\[finetune_gpu"
# the auto QLoRA run (visit H's qlora_24 row) once more with --debug: where the 2.5 GiB allocation comes from
FRAC=$(python3 -c "import torch; print(f'{24e9 / torch.cuda.get_device_properties(0).total_memory:.4f}')")
NVL_BENCH_MEMORY_FRACTION=$FRAC timeout 150 python3 bench/finetune_gpu.py --child --debug \
  --hf-model-path $WORK/model-12b-shape --random-init --lora-on-language-model --lora-on-vision-model \
  dataset.maker_name=make_cord_v2_dataset "dataset.maker_kwargs={\"path\": \"$WORK/cord-v2\"}" \
  dataset.seq_length=4096 model.seq_length=4096 train.train_iters=2 train.global_batch_size=1 train.micro_batch_size=1 \
  logger.log_interval=1 validation.eval_iters=0 checkpoint.save=null peft.base_dtype=nf4 train.memory_plan=auto \
  train.memory_budget_gb=22 > "$OUT/pC_qlora_debug.log" 2>&1
tail -5 "$OUT/pC_qlora_debug.log"
tar czf "$OUT/pC_logs.tgz" -C "$WORK" $(cd "$WORK" && ls log-* metrics-* 2>/dev/null)
