"""The chunked SSD scan computes the exact Mamba2 recurrence (checked against a token-by-token loop)."""

from __future__ import annotations

import pytest
import torch

from nvl_nemotron_vl.model.ssd import ssd_final_state, ssd_scan_reference, ssd_scan_sequential


def _inputs(b=2, L=37, h=6, p=5, g=3, n=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, L, h, generator=gen, dtype=dtype) - 1)
    A = -torch.exp(torch.rand(h, generator=gen, dtype=dtype) * 2)
    B = torch.randn(b, L, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, L, g, n, generator=gen, dtype=dtype)
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, s0


@pytest.mark.parametrize("chunk", [1, 4, 8, 37, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_the_recurrence(chunk, with_state):
    x, dt, A, B, C, s0 = _inputs()
    s0 = s0 if with_state else None
    want_y, want_s = ssd_scan_sequential(x, dt, A, B, C, s0)
    y, s = ssd_scan_reference(x.float(), dt.float(), A.float(), B.float(), C.float(), chunk,
                              None if s0 is None else s0.float())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    # fp32 arithmetic against an fp64 loop: agreement to fp32 rounding, relative to the output scale
    assert (y.double() - want_y).abs().max().item() < 2e-6 * want_y.abs().max().item()
    assert (s.double() - want_s).abs().max().item() < 2e-6 * want_s.abs().max().item()


def test_scan_state_is_fp32_for_bf16_inputs():
    x, dt, A, B, C, _ = _inputs(dtype=torch.float32)
    y, s = ssd_scan_reference(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 8)
    assert y.dtype == torch.float32 and s.dtype == torch.float32


def test_splitting_a_sequence_and_carrying_the_state_is_exact():
    x, dt, A, B, C, _ = _inputs(dtype=torch.float32)
    y, s = ssd_scan_reference(x, dt, A, B, C, 8)
    y1, s1 = ssd_scan_reference(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], 8)
    y2, s2 = ssd_scan_reference(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], 8, initial_state=s1)
    assert (torch.cat([y1, y2], 1) - y).abs().max().item() < 1e-5
    assert (s2 - s).abs().max().item() < 1e-5


def test_gradients_match_the_recurrence():
    x, dt, A, B, C, _ = _inputs(L=19)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    ssd_scan_sequential(*leaves)[0].square().sum().backward()
    want = [t.grad for t in leaves]
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    ssd_scan_reference(*leaves, 4)[0].square().sum().backward()
    for got, w in zip((t.grad for t in leaves), want, strict=True):
        assert (got.double() - w).abs().max().item() < 1e-6 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("L", [1, 5, 37, 300])
def test_final_state_equals_the_recurrence(L):
    """The closed-form state a prefill leaves behind (whichever scan computed the outputs)."""
    x, dt, A, B, C, _ = _inputs(L=L)
    _, want = ssd_scan_sequential(x, dt, A, B, C)
    got = ssd_final_state(x.float(), dt.float(), A.float(), B.float())
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max().item() < 2e-6 * want.abs().max().item()
    _, chunked = ssd_scan_reference(x.float(), dt.float(), A.float(), B.float(), C.float(), 8)
    assert (got - chunked).abs().max().item() < 2e-6 * want.abs().max().item()
