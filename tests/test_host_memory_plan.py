"""The memory plan counts host memory too (issue 22): what the offloaded optimizer holds (fp32 masters, moments,
pinned gradient buffers, each pinned allocation rounded up to a power of two as PyTorch's pinned allocator does),
the offloaded activations and a model built in host memory; ``auto`` passes over an option the host cannot hold
and a run that fits no host is refused in one line. The plan's inventory equals what
:class:`~nvlcore.training.host_offload.HostOffloadAdamW` allocates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_support"))

import tiny_plugin  # noqa: E402

from nvlcore.training.host_memory import offload_host_bytes, pinned_size  # noqa: E402
from nvlcore.training.memory import PlanInputs, estimate  # noqa: E402


def test_pinned_size_is_the_next_power_of_two() -> None:
    assert [pinned_size(n) for n in (0, 1, 3, 4, 5, 1 << 20, (1 << 20) + 1)] == [0, 1, 4, 4, 8, 1 << 20, 2 << 20]


@pytest.fixture
def tiny_bridge(tmp_path):
    from nvlcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(1, device_type="cpu")  # the tiny model is built over megatron-core's process groups
    yield tiny_plugin.TinyBridge.from_hf_dir(tiny_plugin.write_tiny_hf_dir(tmp_path / "hf"))
    destroy_parallel(ctx)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_the_plans_host_bytes_are_what_the_offloaded_optimizer_holds(tiny_bridge, fraction: float) -> None:
    """Full fine-tuning of the tiny model on the CPU (nothing pinned): the plan's figure equals the optimizer's
    own count of its masters and moments after a step, for the whole state and for half of it."""
    import torch

    from nvlcore.training import optim

    model = tiny_bridge.build_model(dtype=torch.float32)
    named = optim.trainable_named_parameters(model)
    opt = optim.build_optimizer(named, lr=1e-3, offload_fraction=fraction)
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt.step()
    plan = estimate(tiny_bridge, PlanInputs(workload=(64, 0), autocast=False, optimizer_offload_fraction=fraction,
                                            pinned_host=False))
    assert plan.host == opt.host_bytes() > 0
    assert opt.host_bytes() == sum(12 * h.numel() for h in opt.host_of.values())
    half = estimate(tiny_bridge, PlanInputs(workload=(64, 0), autocast=False, optimizer_offload_fraction=0.0))
    assert half.host == 0


@pytest.mark.parametrize("bf16", [False, True])
def test_the_plans_pinned_buffers_are_the_optimizers_chunks(bf16: bool) -> None:
    """On a GPU the gradients land in a ring of pinned buffers, one per gradient dtype and slot, each sized for
    the largest chunk and rounded up to a power of two: the plan's chunking of parameters of mixed sizes (small
    chunks, so there are several) gives the optimizer's. The CPU stands in (its masters are not pinned, so the
    plan is told they are not either)."""
    import torch

    from nvlcore.training.host_offload import HostOffloadAdamW

    sizes = [(300, 7), (5,), (40, 40), (3, 1000), (64,), (999, 3), (2, 2), (50, 100)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
    opt = HostOffloadAdamW([{"params": params}], offload_fraction=1.0, chunk_bytes=4096)
    if bf16:
        opt.store_params_in(torch.bfloat16)
    opt._cuda = True  # count the pinned buffers a GPU step makes
    items = [(p.numel(), 2.0 if p.dtype == torch.bfloat16 else 4.0, False) for p in params]
    assert len(opt._chunks) > 2
    assert opt.host_bytes() == offload_host_bytes(items, 1.0, pinned=True, chunk_bytes=4096)
    assert opt.host_bytes() != offload_host_bytes(items, 1.0, pinned=True, chunk_bytes=None)  # chunking matters


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_on_cuda_only_fp32_masters_are_pinned_and_the_count_holds() -> None:
    import torch

    from nvlcore.training.host_offload import HostOffloadAdamW

    w, v, b = (torch.nn.Parameter(torch.randn(*s, device="cuda")) for s in ((512, 300), (64, 64), (300,)))
    opt = HostOffloadAdamW([{"params": [w, v, b]}], offload_fraction=1.0, chunk_bytes=1 << 16, pin_masters=False)
    opt.store_params_in(torch.bfloat16, keep=lambda p: p is v, main_grads=True)
    assert not opt.host_of[w].is_pinned() and opt.host_of[v].is_pinned() and opt.host_of[b].is_pinned()
    for p in (w, v, b):
        (p.float().sum() * 2).backward()
    opt.step()
    torch.cuda.synchronize()
    items = [(w.numel(), 4.0, False), (v.numel(), 4.0, True), (b.numel(), 4.0, True)]
    assert opt.host_bytes() == offload_host_bytes(items, 1.0, pinned=True, chunk_bytes=1 << 16)
