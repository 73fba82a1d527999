"""Where an update reads a parameter's gradient: its fp32 main gradient (``param.main_grad``, megatron-core's
name) where it has one, else ``param.grad``. A leaf module: the optimizer, the host-offloaded optimizer and the
trainer all read gradients through it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def grad_of(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient an update reads: a parameter's fp32 main gradient where it has one (``param.main_grad``,
    megatron-core's name: a bf16 parameter under the precision-aware optimizer fully offloaded,
    :meth:`~nvlcore.training.host_offload.HostOffloadAdamW.store_params_in`), else ``param.grad``."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def zero_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Forget the gradients: ``.grad`` to None, fp32 main gradients (kept allocated) to zero."""
    import torch

    mains = []
    for p in params:
        p.grad = None
        if getattr(p, "main_grad", None) is not None:
            mains.append(p.main_grad)
    if mains:
        torch._foreach_zero_(mains)


__all__ = ["grad_of", "zero_grads"]
