"""Build the training model with each parameter in the dtype it is stored in for training.

Under bf16 autocast a frozen parameter is stored once in bf16 (:func:`nvlcore.training.optim.store_frozen_in_`),
while trainable ones keep fp32 masters and the bridge's precision-sensitive ones (:meth:`ModelBridge.keeps_fp32`)
stay fp32. Building the whole model in fp32 first and rounding afterwards needs the fp32 model in memory
once: for a 12B model 49 GB before a single step, more than a 24 or 48 GB card holds, although the run
itself needs far less. This module decides each parameter's storage dtype **before** the real model is
built: the freeze flags and the PEFT method are applied to the model built on the meta device (no memory,
no weights), which says which base parameters will train; the real model is then built in the compute
dtype and only those parameters, and the ones the bridge keeps in fp32, are turned to fp32, before any
weights load, so that nothing trainable or kept loses precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def trainable_after_prepare(bridge: Any, prepare: Callable[[torch.nn.Module], Any], *, seed: int) -> set[str] | None:
    """Names of the parameters that train once ``prepare`` (freeze flags, then the PEFT method) has run,
    found on the model built on the meta device; None when the bridge or the method cannot run there."""
    import torch

    try:
        meta = bridge.build_model(dtype=torch.float32, device="meta", init="none", seed=seed)
        prepare(meta)
    except Exception:  # a bridge or method that needs real tensors: the caller builds in fp32, as before
        return None
    return {name for name, p in meta.named_parameters() if p.requires_grad}


def build_in_storage_dtype(bridge: Any, *, compute_dtype: torch.dtype | None, device: torch.device,
                           init: str, seed: int, prepare: Callable[[torch.nn.Module], Any],
                           frozen_expected: bool) -> tuple[torch.nn.Module, str]:
    """The training model, each parameter in its storage dtype, and a line saying how it was built.

    :param compute_dtype: the autocast dtype (None: an fp32 run; everything is built in fp32).
    :param prepare: applies the freeze flags and the PEFT method to a model (run here on a meta copy only).
    :param frozen_expected: whether the config freezes anything (else every parameter trains: fp32).
    """
    import torch

    fp32 = torch.float32
    trainable = None
    if compute_dtype is not None and compute_dtype != fp32 and frozen_expected:
        trainable = trainable_after_prepare(bridge, prepare, seed=seed)
    if trainable is None:
        return bridge.build_model(dtype=fp32, device=device, init=init, seed=seed), "built in fp32"
    model = bridge.build_model(dtype=compute_dtype, device=device, init=init, seed=seed)
    kept = 0
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != fp32 and (name in trainable or bridge.keeps_fp32(name, p)):
            p.data = p.data.to(fp32)  # before any weights load: the loaded values arrive in full precision
            kept += p.numel()
    return model, (f"built in {str(compute_dtype).removeprefix('torch.')} with {kept:,} trainable or "
                   "precision-kept parameters in fp32 (frozen weights never held in fp32)")


def trainable_in_fp32(model: torch.nn.Module) -> int:
    """Turn every trainable floating-point parameter still in a lower precision to fp32 (the optimizer's
    masters); returns how many values changed. Parameters a PEFT method adds to a base built in bf16
    (adapters take their base's dtype) are the ones this catches."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
            n += p.numel()
    return n
