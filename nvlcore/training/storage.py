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

With ``model.use_cpu_initialization`` (by default when the PEFT method quantizes the frozen base) the model
is built and loaded in host memory and moves to the GPU once the frozen base is stored: a 4-bit base of a
12B model then never needs its 25 GB bf16 form on a 24 GB card.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch


@attrs.frozen
class DryRun:
    """What applying the freeze flags and the PEFT method to the model built on the meta device says."""

    #: the parameters that train
    trainable: set[str]
    #: whether the PEFT method quantizes the frozen base (its optional ``quantizes_frozen_base``)
    quantizes_base: bool


def dry_run_prepare(bridge: Any, prepare: Callable[[torch.nn.Module], Any], *, seed: int) -> DryRun | None:
    """``prepare`` (freeze flags, then the PEFT method; returns the method, or ``(method, ...)``) run on the
    model built on the meta device; None when the bridge or the method cannot run there."""
    import torch

    try:
        meta = bridge.build_model(dtype=torch.float32, device="meta", init="none", seed=seed)
        method = prepare(meta)
    except Exception:  # a bridge or method that needs real tensors: the caller builds in fp32, as before
        return None
    method = method[0] if isinstance(method, tuple) else method
    return DryRun({name for name, p in meta.named_parameters() if p.requires_grad},
                  bool(getattr(method, "quantizes_frozen_base", False)))


def build_in_storage_dtype(bridge: Any, *, compute_dtype: torch.dtype | None, device: torch.device,
                           init: str, seed: int, prepare: Callable[[torch.nn.Module], Any],
                           frozen_expected: bool, on_host: bool | None = None) -> tuple[torch.nn.Module, str]:
    """The training model, each parameter in its storage dtype, and a line saying how it was built.

    :param compute_dtype: the autocast dtype (None: an fp32 run; everything is built in fp32).
    :param prepare: applies the freeze flags and the PEFT method to a model (run here on a meta copy only).
    :param frozen_expected: whether the config freezes anything (else every parameter trains: fp32).
    :param on_host: ``model.use_cpu_initialization``: build in host memory (the caller moves the model with
        :func:`move_to_device` once the frozen base is stored); None: when the PEFT method quantizes the base.
    """
    import torch

    fp32 = torch.float32
    dry = dry_run_prepare(bridge, prepare, seed=seed) if frozen_expected else None
    host = bool(on_host) if on_host is not None else dry is not None and dry.quantizes_base
    where = torch.device("cpu") if host else device
    say_host = " in host memory (model.use_cpu_initialization)" if host and device.type != "cpu" else ""
    if dry is None or compute_dtype is None or compute_dtype == fp32 or not frozen_expected:
        return bridge.build_model(dtype=fp32, device=where, init=init, seed=seed), "built in fp32" + say_host
    model = bridge.build_model(dtype=compute_dtype, device=where, init=init, seed=seed)
    kept = 0
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != fp32 and (name in dry.trainable or bridge.keeps_fp32(name, p)):
            p.data = p.data.to(fp32)  # before any weights load: the loaded values arrive in full precision
            kept += p.numel()
    return model, (f"built{say_host} in {str(compute_dtype).removeprefix('torch.')} with {kept:,} trainable or "
                   "precision-kept parameters in fp32 (frozen weights never held in fp32)")


def move_to_device(model: torch.nn.Module, device: torch.device) -> int:
    """Move every parameter and buffer not yet on ``device`` there, one tensor at a time (a quantized weight a
    PEFT method already placed stays as it is); returns the bytes moved. Parameters keep their identity
    (tied weights stay tied)."""
    import torch

    moved = 0
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and p.device != device:
                moved += p.numel() * p.element_size()
                there = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
                there.__dict__.update(p.__dict__)  # Megatron's tensor-parallel attributes travel with it
                torch.utils.swap_tensors(p, there)  # the same Parameter object, now on the device
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                moved += b.numel() * b.element_size()
                module._buffers[name] = b.to(device)
    return moved


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
