"""Two-layer MLP with its input norm folded into ``linear_fc1`` (LM: squared ReLU; ViT: exact GELU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import TPContext, normed_column_linear, row_linear


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)^2`` in ``x``'s dtype. A product, not ``square()``: CUDA autocast runs ``pow`` in fp32,
    which would turn the MLP's widest activation into an fp32 copy (and its gradient with it); the bf16
    product rounds once from an fp32 result, as the fp32 square cast back would."""
    r = F.relu(x)
    return r * r


def relu_squared_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`relu_squared` at ``x``: ``grad_out * 2 relu(x)``."""
    return grad_out * (2 * F.relu(x))


def squared_relu_function(forward: Callable[[torch.Tensor], torch.Tensor] = relu_squared,
                          backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = relu_squared_grad):
    """An autograd function computing ``relu(x)^2`` with ``forward`` and its gradient with ``backward``
    (the model's kernels pass fused versions), saving only ``x``, not the intermediate too."""

    class SquaredReLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return forward(x)

        @staticmethod
        def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return backward(x, grad_out)

    return SquaredReLU


_SquaredReLU = squared_relu_function()


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return _SquaredReLU.apply(x)


ACTIVATIONS = {"relu2": squared_relu, "gelu": F.gelu}  # F.gelu defaults to the exact erf form


def discard_until_backward(t: torch.Tensor, after: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> bool:
    """Free ``t``'s memory now and refill it with ``recompute()`` when ``after``'s gradient arrives, i.e.
    before the backward of the op that made ``after`` from ``t`` reads what it saved of ``t`` (megatron-core's
    output-discarding checkpointing). The refill writes the storage, not the tensor, so autograd's version
    check still holds. Skipped (False) where it would be wrong or useless: no graph, a ``t`` that is not a
    whole contiguous storage, a CUDA graph capture (no hooks run at replay), or an offloaded layer (the core
    copies what is saved to the host and hands backward that copy: :func:`nvlcore.bridge.saved_tensors_offloaded`)."""
    from nvlcore.bridge import saved_tensors_offloaded

    if not (torch.is_grad_enabled() and after.requires_grad) or saved_tensors_offloaded():
        return False
    storage = t.untyped_storage()
    nbytes = t.numel() * t.element_size()
    if not t.is_contiguous() or t.storage_offset() != 0 or storage.nbytes() != nbytes:
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False

    # The hook lives as long as the graph node it sits on; once it has run it must hold neither the storage nor
    # the recomputation's input, or each layer's refilled activation would outlive its backward.
    held: list[Any] = [storage, recompute]
    # backward runs on autograd's own thread, where the forward's autocast is not in effect: recompute under it
    kind = t.device.type
    autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
    shape, dtype = t.shape, t.dtype

    def refill(grad: torch.Tensor) -> torch.Tensor:
        if held:
            st, again = held
            held.clear()
            with torch.no_grad(), torch.autocast(kind, dtype=autocast[1], enabled=autocast[0]):
                fresh = again()
            if fresh.shape != shape or fresh.dtype != dtype or not fresh.is_contiguous():
                raise RuntimeError(f"model.recompute_modules: a discarded activation came back as {fresh.dtype} "
                                   f"{list(fresh.shape)}, not the forward's {dtype} {list(shape)}")
            st.resize_(nbytes)
            st.copy_(fresh.untyped_storage())
        return grad

    after.register_hook(refill)
    storage.resize_(0)
    return True


class MLP(nn.Module):
    def __init__(
        self, hidden_size: int, ffn_size: int, *, activation: str, bias: bool, norm: str, eps: float,
        tp: TPContext, dtype: torch.dtype, device: torch.device, out_size: int | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation
        #: The activation's implementation (``set_kernels`` may swap in a fused one for ``relu2``).
        self.act = ACTIVATIONS[activation]
        self.linear_fc1 = normed_column_linear(hidden_size, ffn_size, bias=bias, norm=norm, eps=eps, tp=tp,
                                               dtype=dtype, device=device)
        self.linear_fc2 = row_linear(ffn_size, out_size or hidden_size, bias=bias, tp=tp, dtype=dtype, device=device)
        #: ``model.recompute_modules`` ``mlp_act``: the activation's output (which ``linear_fc2``'s adapter saves) is
        #: freed after the forward and recomputed from ``linear_fc1``'s output (which the activation's own backward
        #: keeps anyway) when backward reaches this MLP: :func:`discard_until_backward`.
        self.recompute_act = False

    def forward(self, hidden_states: torch.Tensor, *, sequence_parallel: bool = False) -> torch.Tensor:
        """``sequence_parallel``: ``hidden_states`` and the output are this rank's sequence shard."""
        y, _ = self.linear_fc1(hidden_states, sequence_parallel=sequence_parallel)
        a = self.act(y)
        out, _ = self.linear_fc2(a, sequence_parallel=sequence_parallel)
        if self.recompute_act:
            discard_until_backward(a, out, lambda: self.act(y))
        return out
