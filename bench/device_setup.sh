#!/usr/bin/env bash
# Source at the start of a command on a lent GPU machine (shared/docs/gpu-runs.md): installs the carried
# wheels (.whl/, once per machine) and nvl with every plugin (entry points included) under /tmp, then exports
# the paths and prints the GPU and the versions.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# the wheels once per machine; nvl itself every time (the tree may have changed since the last call)
if [ ! -d /tmp/site/torchao ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
export PYTHONPATH=/tmp/site
rm -rf /tmp/nvl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/nvl . plugins/*/ || return 1
export PYTHONPATH=/tmp/nvl:/tmp/site PATH=/tmp/nvl/bin:$PATH
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
