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

Sequence parallelism (``model.sequence_parallel``, Megatron's scheme for tensor parallelism): between
the TP regions (the residual stream, the norms) the language model's activations are split along the
sequence over the TP ranks; a column-parallel linear all-gathers its (normalised) input shard and a
row-parallel linear reduce-scatters its output instead of all-reducing it. Megatron-Core's layers do
this along dim 0 of ``[s, b, h]`` activations (and allocate on CUDA); nvl's activations are ``[b, s, h]``,
so the collectives below work along dim 1, on gloo and NCCL alike.
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


# -------------------------------------------------------------------------- sequence parallelism
# Single-tensor collectives (PyTorch renamed them *_single; the older names still work, with a warning).
_ALL_GATHER = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
_REDUCE_SCATTER = (getattr(torch.distributed, "reduce_scatter_single", None)
                   or torch.distributed.reduce_scatter_tensor)


def _seq_gather(x: torch.Tensor, tp: TPContext, async_op: bool = False):
    """``[b, s, ...]`` shards -> ``[b, s * tp, ...]`` (rank order); with ``async_op`` also the work handle,
    and the result is valid once it is waited on."""
    # the ranks' shards concatenated along dim 0 (the form every backend takes), [tp * b, s, ...]
    buf = x.new_empty((tp.size * x.shape[0], *x.shape[1:]))
    work = _ALL_GATHER(buf, x.contiguous(), group=tp.group, async_op=async_op)

    def result() -> torch.Tensor:
        # [tp, b, s, ...] -> [b, tp * s, ...]: a view when b == 1 (packed rows), one copy otherwise
        return buf.view(tp.size, *x.shape).movedim(0, 1).reshape(x.shape[0], tp.size * x.shape[1], *x.shape[2:])

    return (result, work) if async_op else result()


def _seq_reduce_scatter(x: torch.Tensor, tp: TPContext, async_op: bool = False):
    """``[b, s * tp, ...]`` partial sums -> this rank's ``[b, s, ...]`` slice of their sum (with
    ``async_op``: ``(output, work)``, the output valid once the work is waited on)."""
    b, length = x.shape[0], x.shape[1]
    s = length // tp.size
    parts = x.reshape(b, tp.size, s, *x.shape[2:]).movedim(1, 0).reshape(tp.size * b, s, *x.shape[2:])
    out = x.new_empty((b, s, *x.shape[2:]))
    work = _REDUCE_SCATTER(out, parts, group=tp.group, async_op=async_op)
    return (out, work) if async_op else out


def _seq_split(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    s = x.shape[1] // tp.size
    return x[:, tp.rank * s:(tp.rank + 1) * s].contiguous()


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's sequence slice of a replicated tensor; backward: all-gather the grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp = tp
        return _seq_split(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_gather(grad, ctx.tp), None


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather the sequence shards into the replicated tensor; backward: keep this rank's
    slice (what follows is replicated, so every rank holds the same full gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp = tp
        return _seq_gather(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_split(grad, ctx.tp), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: sum the ranks' partial outputs and keep this rank's sequence slice (a row-parallel
    linear's reduction under sequence parallelism); backward: all-gather the grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp = tp
        return _seq_reduce_scatter(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_gather(grad, ctx.tp), None


class _GatheredLinear(torch.autograd.Function):
    """``F.linear(all_gather_seq(x), weight)`` keeping only the shard ``x`` for backward, as Megatron's
    sequence-parallel linear does: backward gathers ``x`` again while it computes the input gradient,
    and reduce-scatters that gradient while it computes the weight gradient (both overlap on NCCL)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, tp: TPContext) -> torch.Tensor:
        ctx.tp = tp
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            # The matmul casts its input to the autocast dtype anyway: cast the shard first, so that the
            # all-gathers move (and backward keeps) half the bytes of an fp32 residual stream's norm output.
            x = x.to(torch.get_autocast_dtype("cuda"))
        ctx.save_for_backward(x, weight)
        return F.linear(_seq_gather(x, tp), weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        tp = ctx.tp
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gathered = _seq_gather(x, tp, async_op=True) if need_w else None
        grad_x = scattered = None
        if need_x:
            grad_total = grad.matmul(weight)  # under the forward's autocast state (custom_bwd)
            grad_x, scattered = _seq_reduce_scatter(grad_total, tp, async_op=True)
        grad_w = None
        if need_w:
            result, work = gathered
            work.wait()
            total = result()
            grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(total.reshape(-1, total.shape[-1]))
        if scattered is not None:
            scattered.wait()
        return grad_x, grad_w, None


def gather_sequence(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """Sequence shards ``[b, s, ...]`` -> the replicated ``[b, s * tp, ...]`` (backward: this rank's slice)."""
    return _GatherFromSequence.apply(x, tp)


def scatter_sequence(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """A replicated ``[b, L, ...]`` -> this rank's sequence shard ``[b, L / tp, ...]`` (backward: all-gather)."""
    return _ScatterToSequence.apply(x, tp)


def reduce_grad_over_tp(param: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """``param`` as it is, whose gradient is summed over the TP ranks in backward: a replicated weight
    used on sequence shards (a norm's) gets a partial gradient on each rank (Megatron all-reduces those
    marked ``sequence_parallel`` after the backward pass; here it happens in the backward itself)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(param, group=tp.group)


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

    def forward(self, x: torch.Tensor, grad_over: TPContext | None = None) -> torch.Tensor:
        """``grad_over``: ``x`` is a sequence shard; the weight's partial gradients are summed over that
        group's ranks in backward."""
        weight = self.weight if grad_over is None else reduce_grad_over_tp(self.weight, grad_over)
        if self.norm_impl is not None:
            return self.norm_impl(x, weight, None, self.eps)
        return rms_norm(x, weight, self.eps)


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
    output's dtype (:func:`_add_bias`).

    ``forward(x, sequence_parallel=True)``: ``x`` is this rank's sequence shard ``[b, s / tp, in]``,
    all-gathered before the matmul (backward: its gradient reduce-scattered)."""

    def __init__(self, in_size: int, out_size: int, *, bias: bool, tp: TPContext, dtype, device) -> None:
        super().__init__(
            in_size, out_size, config=megatron_config(tp, dtype, device), init_method=_no_init, bias=bias,
            gather_output=False, skip_bias_add=True, tp_group=tp.group,
        )
        self.tp_context = tp
        _tag_linear(self, 0)

    def forward(self, x: torch.Tensor, *args: Any, sequence_parallel: bool = False, **kwargs: Any):
        if sequence_parallel:
            return _add_bias(_GatheredLinear.apply(x, self.weight, self.tp_context), self.bias)
        return super().forward(x, *args, **kwargs)


class RowLinear(_BiasInOutputDtype, RowParallelLinear):
    """Megatron's ``RowParallelLinear`` (input split over TP, output all-reduced) whose bias is added
    after the reduction in the output's dtype (:func:`_add_bias`)."""

    def __init__(self, in_size: int, out_size: int, *, bias: bool, tp: TPContext, dtype, device) -> None:
        super().__init__(
            in_size, out_size, config=megatron_config(tp, dtype, device), init_method=_no_init, bias=bias,
            input_is_parallel=True, skip_bias_add=True, tp_group=tp.group,
        )
        self.tp_context = tp
        _tag_linear(self, 1)

    def forward(self, x: torch.Tensor, *args: Any, sequence_parallel: bool = False, **kwargs: Any):
        """``sequence_parallel``: the partial outputs are reduce-scattered along the sequence (this rank
        gets its shard ``[b, s / tp, out]``) instead of all-reduced; a bias, added to the shard, has its
        gradient summed over the ranks."""
        if sequence_parallel:
            tp = self.tp_context
            out = _ReduceScatterToSequence.apply(F.linear(x, self.weight), tp)
            return _add_bias(out, None if self.bias is None else reduce_grad_over_tp(self.bias, tp))
        return super().forward(x, *args, **kwargs)


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

    def normalize(self, x: torch.Tensor, grad_over: TPContext | None = None) -> torch.Tensor:
        """The norm of ``x``; ``grad_over``: ``x`` is a sequence shard, so the norm's parameters get
        partial gradients, summed over that group's ranks in backward."""
        weight = self.layer_norm_weight
        bias = self.layer_norm_bias if self.norm_kind == "layer" else None
        if grad_over is not None:
            weight = reduce_grad_over_tp(weight, grad_over)
            bias = None if bias is None else reduce_grad_over_tp(bias, grad_over)
        if self.norm_impl is not None:
            return self.norm_impl(x, weight, bias, self.norm_eps)
        if self.norm_kind == "rms":
            return rms_norm(x, weight, self.norm_eps)
        return layer_norm(x, weight, bias, self.norm_eps)

    def forward(self, x: torch.Tensor, *args: Any, sequence_parallel: bool = False, **kwargs: Any):
        """``sequence_parallel``: ``x`` is this rank's sequence shard; it is normalised as a shard and
        all-gathered before the matmul (Megatron's sequence-parallel ``LayerNormColumnParallelLinear``)."""
        if sequence_parallel:
            return super().forward(self.normalize(x, self.tp_context), sequence_parallel=True)
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
