"""The memory-lean autograd functions (RMSNorm, squared ReLU) against autograd of the plain expressions."""

from __future__ import annotations

import torch

from nvl_nemotron_vl.model.mlp import squared_relu
from nvl_nemotron_vl.model.parallel import rms_norm


def test_rms_norm_gradcheck_and_matches_the_expression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = (1 + 0.1 * torch.randn(7, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    plain = w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(rms_norm(x, w, 1e-5), plain)


def test_rms_norm_bf16_input_computes_in_fp32_and_returns_bf16():
    x = torch.randn(3, 64).bfloat16().requires_grad_()
    w = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(y, want)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_squared_relu_gradcheck():
    x = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(squared_relu, (x,))
    assert torch.equal(squared_relu(x), torch.relu(x) ** 2)
