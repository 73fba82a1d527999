"""Tensor-parallel building blocks over ``megatron.core`` process groups, and the shared norms.

The process groups themselves are the core's (:func:`nvlcore.parallel.init_parallel`); every layer
takes the :class:`nvlcore.parallel.TPContext` it is built over.

Every linear layer of the model is a Megatron-Core ``ColumnParallelLinear`` / ``RowParallelLinear``
(or a subclass here that folds the preceding norm into it, the way Megatron's
``TELayerNormColumnParallelLinear`` does, so parameter names match Megatron's:
``linear_qkv.layer_norm_weight`` next to ``linear_qkv.weight``). Linear layers keep Megatron's calling
convention: ``forward(x) -> (output, bias_or_None)``.

Parameters are allocated uninitialised (``perform_initialization=False``); the model's
:func:`~nvl_nemotron_vl.model.init.init_parameters` or a checkpoint fills them. This avoids Megatron's
CUDA RNG tracker, so the same code builds on CPU (gloo) and GPU (NCCL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from nvlcore.parallel import TPContext

# ------------------------------------------------------------------------------- process groups
# The core owns process groups (nvlcore.parallel.init_parallel); the layers are built over its TPContext.


def megatron_config(tp: TPContext, dtype: torch.dtype, device: torch.device) -> Any:
    """A Megatron ``ModelParallelConfig`` for layers allocated on ``device`` in ``dtype``."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp.size,
        use_cpu_initialization=device.type != "cuda",
        perform_initialization=False,
        params_dtype=dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def _no_init(_: torch.Tensor) -> None:
    return None


def mark_tensor_parallel(param: torch.Tensor, dim: int) -> None:
    """Tag a parameter as split over TP along ``dim`` (what Megatron's optimizers/grad-norm read)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _tag_linear(layer: nn.Module, dim: int) -> None:
    if getattr(layer.weight, "tensor_model_parallel", None) is None:
        mark_tensor_parallel(layer.weight, dim)


# ---------------------------------------------------------------------------------------- norms
def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _RMSNorm(torch.autograd.Function):
    """RMSNorm in fp32 that saves only its input (in the input dtype) and the fp32 ``rstd`` for backward.

    Autograd through the plain expression would keep two fp32 copies of the activation per norm.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = _at_least_fp32(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (_at_least_fp32(weight) * (x32 * rstd)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = _at_least_fp32(x) * rstd
        g = _at_least_fp32(grad_out)
        gw = g * _at_least_fp32(weight)
        grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        grad_w = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32; the result is cast back to ``x``'s dtype: ``w * x / sqrt(mean(x^2) + eps)``."""
    return _RMSNorm.apply(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm computed in fp32; the result is cast back to ``x``'s dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


NormImpl = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]
"""``(x, weight, bias_or_None, eps) -> norm(x)``: a kernel for one norm kind (:mod:`.kernels`)."""


class RMSNorm(nn.Module):
    """A standalone RMSNorm (``decoder.final_norm``)."""

    norm_kind = "rms"

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        #: The kernel computing the norm (set by the model's ``set_kernels``); None: :func:`rms_norm`.
        self.norm_impl: NormImpl | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_impl is not None:
            return self.norm_impl(x, self.weight, None, self.eps)
        return rms_norm(x, self.weight, self.eps)


# -------------------------------------------------------------------------------- linear layers
def _add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    """``out + bias`` in ``out``'s dtype. Megatron adds the bias inside its linear, where an fp32 bias
    (a trained parameter kept in fp32) promotes the autocast bf16 output, and every elementwise op after
    it, to fp32: the ViT ran its MLP and attention outputs in fp32 and cast them back at each matmul."""
    return (out if bias is None else out + bias.to(out.dtype)), None


class _BiasInOutputDtype:
    """Mixin over a Megatron linear built with ``skip_bias_add=True``: ``forward(x) -> (output, None)``
    with the bias added by :func:`_add_bias`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        return _add_bias(*super().forward(x, *args, **kwargs))


class ColumnLinear(_BiasInOutputDtype, ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear`` (same parameters and layout) whose bias is added in the
    output's dtype (:func:`_add_bias`)."""

    def __init__(self, in_size: int, out_size: int, *, bias: bool, tp: TPContext, dtype, device) -> None:
        super().__init__(
            in_size, out_size, config=megatron_config(tp, dtype, device), init_method=_no_init, bias=bias,
            gather_output=False, skip_bias_add=True, tp_group=tp.group,
        )
        _tag_linear(self, 0)


class RowLinear(_BiasInOutputDtype, RowParallelLinear):
    """Megatron's ``RowParallelLinear`` (input split over TP, output all-reduced) whose bias is added
    after the reduction in the output's dtype (:func:`_add_bias`)."""

    def __init__(self, in_size: int, out_size: int, *, bias: bool, tp: TPContext, dtype, device) -> None:
        super().__init__(
            in_size, out_size, config=megatron_config(tp, dtype, device), init_method=_no_init, bias=bias,
            input_is_parallel=True, skip_bias_add=True, tp_group=tp.group,
        )
        _tag_linear(self, 1)


def column_linear(in_size: int, out_size: int, *, bias: bool, tp: TPContext, dtype, device) -> ColumnLinear:
    return ColumnLinear(in_size, out_size, bias=bias, tp=tp, dtype=dtype, device=device)


def row_linear(in_size: int, out_size: int, *, bias: bool, tp: TPContext, dtype, device) -> RowLinear:
    return RowLinear(in_size, out_size, bias=bias, tp=tp, dtype=dtype, device=device)


class NormedColumnParallelLinear(ColumnLinear):
    """A column-parallel linear with its input norm folded in (``layer_norm_weight`` [+ ``layer_norm_bias``]).

    ``norm`` is ``"rms"`` (RMSNorm, weight only) or ``"layer"`` (LayerNorm, weight and bias); the norm is
    computed in fp32 on the full (replicated) input, then the parallel linear runs on its output.
    """

    def __init__(self, in_size: int, out_size: int, *, bias: bool, norm: str, eps: float, tp: TPContext,
                 dtype: torch.dtype, device: torch.device) -> None:
        if norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
        super().__init__(in_size, out_size, bias=bias, tp=tp, dtype=dtype, device=device)
        self.norm_kind, self.norm_eps = norm, eps
        #: The kernel computing the norm (set by the model's ``set_kernels``); None: the fp32 reference.
        self.norm_impl: NormImpl | None = None
        self.layer_norm_weight = nn.Parameter(torch.ones(in_size, dtype=dtype, device=device))
        if norm == "layer":
            self.layer_norm_bias = nn.Parameter(torch.zeros(in_size, dtype=dtype, device=device))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_impl is not None:
            bias = self.layer_norm_bias if self.norm_kind == "layer" else None
            return self.norm_impl(x, self.layer_norm_weight, bias, self.norm_eps)
        if self.norm_kind == "rms":
            return rms_norm(x, self.layer_norm_weight, self.norm_eps)
        return layer_norm(x, self.layer_norm_weight, self.layer_norm_bias, self.norm_eps)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        return super().forward(self.normalize(x), *args, **kwargs)


def normed_column_linear(
    in_size: int, out_size: int, *, bias: bool, norm: str, eps: float, tp: TPContext, dtype, device
) -> NormedColumnParallelLinear:
    return NormedColumnParallelLinear(in_size, out_size, bias=bias, norm=norm, eps=eps, tp=tp, dtype=dtype,
                                      device=device)


def split_size(total: int, tp: TPContext, what: str) -> int:
    """``total // tp.size``, refusing sizes that do not divide."""
    if total % tp.size:
        raise ValueError(f"{what}={total} is not divisible by tensor_model_parallel_size={tp.size}")
    return total // tp.size
