"""The host-offloaded AdamW's chunked pipeline (nvlcore/training/host_offload.py): cutting the host update into
chunks changes nothing (params and state equal the one-chunk update bit for bit, fp32 and bf16 device
parameters, fraction < 1, chunk boundaries inside and across parameter groups), a skipped chunk is caught,
the fused host kernel equals torch's fused CPU AdamW and foreach to within fp32 rounding, and on a GPU the
whole step equals torch's AdamW with the copies ordered before the next read."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
KW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
SHAPES = ([(32, 64), (16, 64), (64,)], [(64, 32), (24, 32), (32,)])  # two parameter groups
F32_BYTES = 4


def _params(device: str = "cpu"):
    import torch

    g = torch.Generator().manual_seed(0)
    groups = [[torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes] for shapes in SHAPES]
    return groups, g


def _groups(groups):
    return [{"params": groups[0], "weight_decay": 0.1}, {"params": groups[1], "weight_decay": 0.0}]


def _run(make, *, steps: int = 4, device: str = "cpu", bf16: bool = False, edit=None):
    """``steps`` AdamW steps of ``make(groups)`` on fixed gradients; returns the optimizer and the parameters."""
    import torch

    groups, g = _params(device)
    opt = make(_groups(groups))
    if bf16:
        opt.store_params_in(torch.bfloat16)
    if edit is not None:
        edit(opt)
    flat = [p for ps in groups for p in ps]
    for _ in range(steps):
        for p in flat:
            p.grad = torch.randn(p.shape, generator=g).to(device, p.dtype)
        opt.step()
    return opt, flat


def _snapshot(opt, flat):
    """Every parameter's value, its host master if any, and its Adam state, on the CPU."""
    import torch

    out = []
    for p in flat:
        st = opt.state.get(p, {})
        master = opt.host_of.get(p) if hasattr(opt, "host_of") else None
        out.append([p.detach().cpu(), None if master is None else master.clone()]
                   + [st[k].detach().cpu() if isinstance(st.get(k), torch.Tensor) else st.get(k)
                      for k in ("exp_avg", "exp_avg_sq", "step")])
    return out


def _same(a, b) -> bool:
    import torch

    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _offload(fraction: float, chunk_bytes, fused: bool):
    from nvlcore.training.host_offload import HostOffloadAdamW

    return lambda g: HostOffloadAdamW(g, offload_fraction=fraction, chunk_bytes=chunk_bytes, host_fused=fused, **KW)


# chunk sizes: one parameter per chunk; a boundary inside group 0 and a chunk spanning both groups; one chunk
CHUNKS = [1, 40 * 64 * F32_BYTES, None]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("fraction, bf16", [(0.6, False), (1.0, False), (1.0, True)])
def test_chunked_update_equals_the_one_chunk_update(fraction: float, bf16: bool, fused: bool) -> None:
    whole = _snapshot(*_run(_offload(fraction, None, fused), bf16=bf16))
    for chunk_bytes in CHUNKS[:-1]:
        opt, flat = _run(_offload(fraction, chunk_bytes, fused), bf16=bf16)
        assert len(opt._chunks) > 1
        assert _same(_snapshot(opt, flat), whole), chunk_bytes
    # the middle size really cuts a group and spans the two: chunk 0 = w(32x64) + w(16x64), chunk 1 = b(64) + ...
    opt, _ = _run(_offload(1.0, CHUNKS[1], fused), steps=0)
    groups_of = [[next(i for i, g in enumerate(opt.param_groups) if any(p is q for q in g["params"]))
                  for p, _ in c.pairs] for c in opt._chunks]
    assert groups_of[0] == [0, 0] and 0 in groups_of[1] and 1 in groups_of[1], groups_of


@pytest.mark.parametrize("bf16", [False, True])
def test_a_skipped_chunk_is_caught(bf16: bool) -> None:
    """Negative control: the comparison above fails when one chunk is left out of the step."""
    whole = _snapshot(*_run(_offload(1.0, None, False), bf16=bf16))
    opt, flat = _run(_offload(1.0, CHUNKS[1], False), bf16=bf16, edit=lambda o: o._chunks.pop(1))
    assert not _same(_snapshot(opt, flat), whole)


def test_fraction_below_one_keeps_the_rest_on_the_device_optimizer() -> None:
    opt, flat = _run(_offload(0.6, 1, False))
    assert list(opt.host_of) == flat[:4]  # 0.6 of the values: group 0 and the first matrix of group 1
    assert sum(len(c.pairs) for c in opt._chunks) == 4
    assert all(opt.state[p] is opt.device_opt.state[p] for p in flat[4:])
    assert all(opt.state[p] is opt.host_opt.state[opt.host_of[p]] for p in flat[:4])


def test_fused_host_kernel_equals_torch_fused_cpu_adamw_and_foreach_within_fp32_rounding() -> None:
    import torch

    steps = 5
    fused_ref = _snapshot(*_run(lambda g: torch.optim.AdamW(g, fused=True, **KW), steps=steps))
    opt, flat = _run(_offload(0.6, CHUNKS[1], True), steps=steps)
    assert opt.host_fused and opt._chunks[0].opt.defaults["fused"]
    ours = _snapshot(opt, flat)
    host = len(opt.host_of)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ours[:host], fused_ref[:host], strict=True))

    def within_rounding(ref) -> bool:
        # per step the two kernels may round each op differently: a few units in the last place of the value
        # and of the update (about lr), accumulated over the steps
        return all(((a[0] - b[0]).abs() <= steps * 4 * torch.finfo(torch.float32).eps
                    * (b[0].abs() + KW["lr"])).all() for a, b in zip(ours[:host], ref[:host], strict=True))

    foreach = _snapshot(*_run(lambda g: torch.optim.AdamW(g, foreach=True, **KW), steps=steps))
    assert within_rounding(foreach)
    off = _snapshot(*_run(lambda g: torch.optim.AdamW(g, foreach=True, **{**KW, "lr": KW["lr"] * 1.001}),
                          steps=steps))
    assert not within_rounding(off)  # negative control: a 0.1% larger learning rate is outside the bound


def test_bad_chunk_size_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        _run(_offload(1.0, 0, False), steps=0)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
@pytest.mark.parametrize("fraction", [0.6, 1.0])
def test_on_cuda_the_pipelined_step_equals_torch_adamw(fraction: float) -> None:
    """Host part: bit for bit torch's fused CPU AdamW on the same gradients (the copies lose nothing); device
    part: torch's fused CUDA AdamW; whole: torch's CUDA AdamW to within fp32 rounding. A read queued on the
    current stream right after each step sees the new values (the copy-back is ordered before it)."""
    import torch

    steps = 4

    def run(make, device, edit=None):
        groups, g = _params(device)
        opt = make(_groups(groups))
        if edit is not None:
            edit(opt)
        flat = [p for ps in groups for p in ps]
        seen = []
        for _ in range(steps):
            for p in flat:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
            seen.append(torch.cat([p.detach().flatten() for p in flat]))  # queued without a synchronisation
        torch.cuda.synchronize()
        return opt, flat, [s.cpu() for s in seen]

    opt, flat, seen = run(_offload(fraction, 1, None), "cuda")
    assert opt.host_fused and len(opt._chunks) == len(opt.host_of)
    host = len(opt.host_of)
    cpu_ref = _snapshot(*run(lambda g: torch.optim.AdamW(g, fused=True, **KW), "cpu")[:2])
    _, cuda_flat, cuda_seen = run(lambda g: torch.optim.AdamW(g, fused=True, **KW), "cuda")
    ours = _snapshot(opt, flat)
    assert _same([r[:1] for r in ours[:host]], [r[:1] for r in cpu_ref[:host]])
    assert all(torch.equal(a.detach().cpu(), b.detach().cpu()) for a, b in zip(flat[host:], cuda_flat[host:],
                                                                                strict=True))
    for s, r in zip(seen, cuda_seen, strict=True):
        torch.testing.assert_close(s, r, rtol=steps * 8 * torch.finfo(torch.float32).eps, atol=1e-6)
    assert all(opt.state[p]["exp_avg"].device.type == "cpu" for p in flat[:host])
    skipped = run(_offload(fraction, 1, None), "cuda", edit=lambda o: o._chunks.pop(0))
    assert not _same([r[:1] for r in _snapshot(*skipped[:2])[:host]], [r[:1] for r in cpu_ref[:host]])


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_on_cuda_large_chunks_are_read_after_their_copy_back() -> None:
    """Parameters large enough that the copies take longer than launching the next kernel: each step's result,
    read on the current stream at once, equals the host master of that step."""
    import torch

    from nvlcore.training.host_offload import HostOffloadAdamW

    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(1 << 22, generator=g).cuda()) for _ in range(4)]
    opt = HostOffloadAdamW([{"params": ps}], offload_fraction=1.0, chunk_bytes=8 << 20, **KW)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).cuda()
        opt.step()
        seen = [p.detach() * 1 for p in ps]  # a kernel on the current stream, queued at once
        masters = [opt.host_of[p].clone() for p in ps]  # the host values are final when step() returns
        assert all(torch.equal(s.cpu(), m) for s, m in zip(seen, masters, strict=True))


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
@pytest.mark.parametrize("layout", ["fp32", "bf16_grads", "main_grads"])
def test_on_cuda_the_ring_of_gradient_buffers_wraps_without_a_race(layout: str) -> None:
    """Three times as many chunks as ring slots, each large enough that its copies outlast a kernel launch: a
    slot refilled with the next chunk's gradients before the copy back of its last chunk had read the staged
    value would corrupt that parameter. Every step, each host master equals fp32 AdamW fed the gradient the
    device accumulated, and each device value its master (rounded to bf16 where the device stores bf16)."""
    import torch

    from nvlcore.training.grads import grad_of, zero_grads
    from nvlcore.training.host_memory import LANDING_SLOTS
    from nvlcore.training.host_offload import HostOffloadAdamW

    g = torch.Generator().manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(256, 4096 + 64 * i, generator=g).cuda()) for i in range(3 * LANDING_SLOTS)]
    ref = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ps]
    opt = HostOffloadAdamW([{"params": ps, "weight_decay": 0.1}], offload_fraction=1.0, chunk_bytes=1,
                           pin_masters=layout == "fp32", **KW)
    if layout != "fp32":
        opt.store_params_in(torch.bfloat16, main_grads=layout == "main_grads")
    ref_opt = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], fused=True, **KW)
    assert len(opt._chunks) == 3 * LANDING_SLOTS
    for _ in range(3):
        zero_grads(ps)
        for p in ps:
            (p.float() * torch.randn(p.shape, generator=g).cuda()).sum().backward()
        for p, r in zip(ps, ref, strict=True):
            r.grad = grad_of(p).float().cpu()
        opt.step()
        ref_opt.step()
        seen = [p.detach() * 1 for p in ps]  # queued at once on the current stream
        for p, r, s in zip(ps, ref, seen, strict=True):
            assert torch.equal(opt.host_of[p], r.detach())
            assert torch.equal(s.cpu(), r.detach().to(p.dtype))
    assert len(opt._slots) == LANDING_SLOTS
