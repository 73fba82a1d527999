"""Frozen parameters stored in the autocast dtype, trainable ones fp32; the memory plan counts them."""

from __future__ import annotations

import torch
from torch import nn

from nvlcore.training.optim import memory_plan, store_frozen_in_


def test_frozen_parameters_go_to_bf16_and_trainable_stay_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    want = model(x)
    model[0].requires_grad_(False)
    converted = store_frozen_in_(model, torch.bfloat16)
    assert converted == 8 * 16 + 16
    assert model[0].weight.dtype == torch.bfloat16 and model[2].weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    got.float().sum().backward()
    assert model[0].weight.grad is None and model[2].weight.grad.dtype == torch.float32
    assert torch.allclose(got.float(), want, atol=5e-2)
    plan = memory_plan(model)
    assert plan.frozen_bytes == (8 * 16 + 16) * 2 and plan.frozen_params == 8 * 16 + 16
    n_train = 16 * 4 + 4
    assert (plan.trainable_bytes, plan.grad_bytes, plan.optimizer_bytes) == (n_train * 4, n_train * 4, n_train * 8)
    assert "before activations" in plan.describe()


def test_the_bridge_rule_keeps_parameters_fp32_and_the_default_keeps_vectors():
    from nvlcore.bridge import ModelBridge

    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    model.requires_grad_(False)
    keep = lambda n, p: ModelBridge.keeps_fp32(None, n, p)  # noqa: E731 - the default reads no bridge state
    assert store_frozen_in_(model, torch.bfloat16, keep_fp32=keep) == 64 * 64
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] + [torch.float32] * 3
    named = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).requires_grad_(False)
    store_frozen_in_(named, torch.bfloat16, keep_fp32=lambda n, p: n.startswith("1."))
    assert [p.dtype for p in named.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2
