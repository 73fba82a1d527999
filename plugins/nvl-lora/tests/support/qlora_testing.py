"""Worker for the QLoRA tensor-parallel test (spawned processes import it by module name)."""

from __future__ import annotations

from typing import Any

import torch
from lora_testing import ALL_TOY_TARGETS, make_toy, random_adapter_state
from torch import nn


def dequantize_in_place(model: nn.Module) -> None:
    """Undo :func:`nvl_lora.qlora.quantize_frozen_linears` with the values NF4 stored: plain weights equal
    to the dequantised ones and Megatron's own matmul again."""
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and hasattr(w, "get_original_weight"):
            plain = nn.Parameter(w.get_original_weight(), requires_grad=False)
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(w, attr):
                    setattr(plain, attr, getattr(w, attr))
            module.weight = plain
            module.__dict__.pop("_forward_impl", None)
            module.__dict__.pop("forward", None)


def qlora_tp_worker(rank: int, world: int, plant: str = "") -> dict[str, Any]:
    """The toy at TP=``world`` with an NF4 base, and the same shards dequantised into plain weights run
    through Megatron's own linears: outputs and adapter gradients. ``plant="no_dgrad_allreduce"``
    drops the input-gradient all-reduce of a column-parallel NF4 layer (a negative control)."""
    from nvl_lora import qlora
    from nvl_lora.config import LoRAConfig
    from nvl_lora.method import apply_lora
    from nvl_lora.state import gather_adapter_state, load_adapter_state
    from nvlcore.parallel import init_parallel

    tpw = init_parallel(world, device_type="cpu").tp_group
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    impl = qlora.nf4_linear_impl
    if plant == "no_dgrad_allreduce":
        def impl(input, weight, bias=None, **kw):  # noqa: ANN001, ANN202 - the planted bug
            return qlora.nf4_linear_impl(input, weight, bias, **{**kw, "allreduce_dgrad": False})
    out: dict[str, Any] = {}
    for label in ("nf4", "dequantized"):
        model = make_toy(tpw)
        apply_lora(model, LoRAConfig(target_modules=ALL_TOY_TARGETS, dim=4, alpha=8, freeze_other=True))
        full = gather_adapter_state(model)
        load_adapter_state(model, random_adapter_state(sorted(full), {k: tuple(v.shape) for k, v in full.items()}))
        report = qlora.quantize_frozen_linears(model)
        for module in model.modules():
            if "_forward_impl" in module.__dict__:
                module._forward_impl = impl
        if label == "dequantized":
            dequantize_in_place(model)
        y = model(x)
        y.square().mean().backward()
        out[label] = {"y": y.detach(), "grads": gather_adapter_state(model, grads=True), "quantized": report.quantized,
                      "tp_marked": sorted(n for n, p in model.named_parameters()
                                          if getattr(p, "tensor_model_parallel", False) and ".adapter." not in n)}
    return out
