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
