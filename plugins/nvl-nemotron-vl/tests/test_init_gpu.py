"""Random initialisation of a model built in host memory for a GPU run (``model.use_cpu_initialization`` with
``--random-init``): drawn on the GPU one parameter at a time, so it equals a model built on the GPU (GPU only)."""

from __future__ import annotations

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _params(model):
    return {n: p.detach().float().cpu() for n, p in model.named_parameters()}


@cuda
def test_a_host_built_model_draws_what_a_gpu_built_one_does(tiny_toy, monkeypatch):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    torch.cuda.init()
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    on_gpu = _params(bridge.build_model(dtype=torch.float32, device="cuda", seed=5))
    on_host = _params(bridge.build_model(dtype=torch.float32, device="cpu", seed=5))
    assert on_gpu.keys() == on_host.keys()
    assert all(torch.equal(on_gpu[n], on_host[n]) for n in on_gpu)
    # negative control: the CPU's generator (what a process that uses no GPU gets) draws other values
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    on_cpu = _params(bridge.build_model(dtype=torch.float32, device="cpu", seed=5))
    assert not all(torch.equal(on_gpu[n], on_cpu[n]) for n in on_gpu)
