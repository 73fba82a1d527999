#!/usr/bin/env bash
# Source on a lent GPU machine, from the repo root: `source bench/device_kernel_cache.sh restore` before the runs,
# `source bench/device_kernel_cache.sh save` after them.
#
# The first run on a fresh machine spends minutes compiling and autotuning Triton kernels (mamba-ssm's scan,
# flash-linear-attention's conv, torch.compile's fused ops): visit K's first CORD iteration took 193 s, the next
# run's 60 s. restore unpacks a cache carried in .whl/kernel_cache.tgz (if any) and points Triton and Inductor at
# it, with Triton's autotuning results kept on disk too (TRITON_CACHE_AUTOTUNING=1); save packs it into
# $OUT/kernel_cache.tgz when it is under the 16 MiB a returned file may have. Copy that file into .whl/ here to
# carry it on the next visit (the carried tree stays under 64 MiB: check `du -sh .whl`). Kernels compiled for one
# GPU architecture (sm_90: H100 and H200) are reused only on the same; Triton keys its cache by device and version.
KC=/tmp/nvl-kernel-cache
export TRITON_CACHE_DIR=$KC/triton TORCHINDUCTOR_CACHE_DIR=$KC/inductor TRITON_CACHE_AUTOTUNING=1
case "$1" in
  restore)
    if [ ! -d "$KC" ] && [ -f .whl/kernel_cache.tgz ]; then
      mkdir -p "$KC" && tar xzf .whl/kernel_cache.tgz -C "$KC" && echo "kernel cache restored: $(du -sh "$KC" | cut -f1)"
    fi
    mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" ;;
  save)
    size=0
    if [ -n "$(find "$KC" -type f 2>/dev/null | head -1)" ] && tar czf /tmp/kernel_cache.tgz -C "$KC" .; then
      size=$(stat -c %s /tmp/kernel_cache.tgz)
    fi
    if [ "$size" -gt 0 ] && [ "$size" -lt 16000000 ]; then
      cp /tmp/kernel_cache.tgz "$OUT/kernel_cache.tgz" && echo "kernel cache saved: $size bytes"
    else
      echo "kernel cache not saved: $size bytes (over the 16 MiB a returned file may have, or empty)"
    fi ;;
  *) echo "usage: source bench/device_kernel_cache.sh restore|save" >&2 ;;
esac
