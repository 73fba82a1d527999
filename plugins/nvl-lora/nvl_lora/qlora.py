"""QLoRA (``peft.base_dtype=nf4``): the frozen base's linear weights stored in 4-bit NormalFloat.

Each frozen linear weight becomes torchao's ``NF4Tensor`` (QLoRA's NF4 with double-quantised block
scales, as torchtune's QLoRA uses) held in the module's own ``weight`` parameter, so parameter names,
the tensor-parallel split (each rank quantises the shard it holds) and the adapters stay as they are.
The matmul dequantises the weight to the activation's dtype for each call (bf16 under the GPU's autocast,
fp32 on a CPU) and keeps only the 4-bit weight for backward, where it dequantises it again; no gradient
reaches it. The dequantisation is :func:`dequantize_nf4`, torchao's NF4 layout decoded from the tensor's
parts, under ``torch.compile`` on a GPU: one fused kernel that reads the 4-bit codes and writes the weight
(torchao's own eager decode goes through int64 indices and several full-size temporaries: several memory
passes of ~6 bytes per weight, by our count, not a measured share of a step). The kernel is specialised to
each weight's shape and block sizes (a model has a dozen shapes): compiled with dynamic sizes it divided every
element's index by the block sizes as runtime int64 values, and visit L's profile (2026-12-07, one H100) found
it taking 37% of a QLoRA step's GPU time, 1.64 ms for a 105M-weight matrix that takes ~0.1 ms to read and write.
Where compiling fails, the same function runs eagerly, said once in the log.

Megatron's parallel linears call their ``_forward_impl`` for the matmul; a quantised one gets
:func:`nf4_linear_impl` there (the same tensor-parallel semantics: the input gradient is all-reduced
over the TP group where Megatron's would be). A plain ``nn.Linear`` gets :func:`nf4_plain_forward` as its
``forward`` (``F.linear`` on an ``NF4Tensor`` would take torchao's eager path).

Block sizes: 64 weights per NF4 block (the paper's); the block scales are quantised in groups of 256
(the paper's) or, for a layer whose block count 256 does not divide, the largest power of two that
does. A weight whose element count 64 does not divide stays in the compute dtype and is named in the
run's storage line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from nvl_lora.layers import ADAPTER_ATTR, base_kind

#: Weights per NF4 block (QLoRA's).
NF4_BLOCK = 64
#: Block scales per double-quantisation group (QLoRA's), halved until it divides a layer's block count.
SCALER_BLOCK = 256
#: Megatron's parameter attributes that say how a weight is split over tensor-parallel ranks.
_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "allreduce")


_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def nf4_api() -> tuple[Any, Any]:
    """``(to_nf4, linear_nf4)`` from torchao, or ``ValueError`` in one line naming the fix."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError as exc:
        raise ValueError(
            f"peft.base_dtype=nf4 needs torchao>=0.18's NF4 tensor ({exc}); install it with "
            "`pip install 'nvl-lora[qlora]'` or remove peft.base_dtype"
        ) from None
    return to_nf4, linear_nf4


def check_device(device: torch.device | str) -> None:
    """Quantise and multiply a small weight on ``device``; ``ValueError`` in one line if NF4 cannot run there."""
    to_nf4, linear_nf4 = nf4_api()
    try:
        w = to_nf4(torch.randn(NF4_BLOCK, NF4_BLOCK, device=device), NF4_BLOCK, 1)
        linear_nf4(torch.randn(2, NF4_BLOCK, device=device), w)
    except Exception as exc:  # noqa: BLE001 - any failure means the device cannot run it
        raise ValueError(f"peft.base_dtype=nf4: torchao's NF4 cannot run on {device} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "remove peft.base_dtype") from None


def scaler_block_for(numel: int) -> int | None:
    """The double-quantisation group for a weight of ``numel`` elements, or ``None`` if NF4 cannot block it."""
    if numel == 0 or numel % NF4_BLOCK:
        return None
    blocks, group = numel // NF4_BLOCK, SCALER_BLOCK
    while blocks % group:
        group //= 2
    return group


def _decode_nf4(codes: torch.Tensor, scalers_q: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor,
                table: torch.Tensor, scaler_block: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """torchao's NF4 layout decoded: ``codes`` holds two 4-bit table indices per byte (high nibble first), one
    absmax per ``block`` weights, the absmaxes int8 in groups of ``scaler_block`` with a factor each plus a mean."""
    absmax = (scalers_q.view(-1, scaler_block) / factor.unsqueeze(-1)).flatten().to(table.dtype) + mean
    pairs = torch.stack((table[(codes >> 4).int()], table[(codes & 0xF).int()]), dim=-1)
    return (pairs.view(-1, block) * absmax.unsqueeze(-1)).to(dtype)


_compiled: dict[str, Callable[..., torch.Tensor]] = {}

#: How many weight shapes the compiled decode is specialised to before it stops compiling new ones (torch's
#: default, 8, is fewer than one model's linear shapes; past it Dynamo would run the rest eagerly).
DECODE_SHAPES = 64


def compile_decode() -> Callable[..., torch.Tensor]:
    """:func:`_decode_nf4` under ``torch.compile`` with static sizes: one kernel per weight shape whose index
    arithmetic divides by constants (with ``dynamic=True`` the block sizes became runtime int64 divisors of every
    element's index: see the module docstring). ``emulate_precision_casts`` rounds where eager rounds, so the
    weight equals torchao's bit for bit. Raises the process's Dynamo recompile limit to at least
    :data:`DECODE_SHAPES` (set once here, not patched around each of a step's thousands of calls)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_SHAPES)
    return torch.compile(_decode_nf4, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})


def dequantize_nf4(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (torchao's ``NF4Tensor``) as a plain ``dtype`` tensor, equal to torchao's own dequantisation
    (``weight.to(dtype)``); compiled into one kernel on a GPU (see the module docstring)."""
    if not weight.is_contiguous():  # a transposed view: torchao's own path knows its layout
        return weight.to(dtype)
    args = (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
            weight.nf4, weight.scaler_block_size, weight.block_size, dtype)
    if weight.quantized_data.is_cuda:
        if "cuda" not in _compiled:
            _compiled["cuda"] = compile_decode()
        try:
            return _compiled["cuda"](*args).view(weight.shape)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the eager decode is the same arithmetic
            _log.warning("peft.base_dtype=nf4: compiling the NF4 dequantisation failed (%s: %s); it runs eagerly",
                         type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _compiled["cuda"] = _decode_nf4
    return _decode_nf4(*args).view(weight.shape)


class _NF4Linear(torch.autograd.Function):
    """``input @ dequant(weight).T`` keeping only the 4-bit weight for backward (it never gets a gradient)."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: Any) -> torch.Tensor:  # noqa: A002 - torch's name
        ctx.weight = weight  # a frozen parameter: held by the module anyway, nothing saved twice
        return torch.nn.functional.linear(input, dequantize_nf4(weight, input.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ dequantize_nf4(ctx.weight, grad.dtype), None


def linear_nf4(input: torch.Tensor, weight: Any) -> torch.Tensor:  # noqa: A002 - torch's name
    """``F.linear(input, weight)`` for an NF4 ``weight``, dequantised by :func:`dequantize_nf4`."""
    if torch.is_autocast_enabled(input.device.type):
        input = input.to(torch.get_autocast_dtype(input.device.type))
    return _NF4Linear.apply(input, weight)


def nf4_plain_forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
    """``nn.Linear.forward`` of a plain linear layer whose weight is NF4 (one given a plain weight since, e.g.
    dequantised for a test, is an ``nn.Linear`` again)."""
    if not hasattr(module.weight, "quantized_data"):
        return torch.nn.functional.linear(input, module.weight, module.bias)
    out = linear_nf4(input, module.weight)
    return out if module.bias is None else out + module.bias


def nf4_linear_impl(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    allreduce_dgrad: bool = False, sequence_parallel: bool = False, tp_group: Any = None,
                    **_: Any) -> torch.Tensor:
    """Megatron's ``_forward_impl`` contract for a frozen NF4 weight: ``input @ dequant(weight).T + bias``;
    with ``allreduce_dgrad`` the input's gradient is all-reduced over ``tp_group`` (a column-parallel
    layer whose input is replicated), as Megatron's ``linear_with_frozen_weight`` does."""
    if sequence_parallel:
        raise NotImplementedError("peft.base_dtype=nf4 with sequence parallelism is not supported")
    if allreduce_dgrad:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    out = linear_nf4(input, weight)
    return out if bias is None else out + bias


@attrs.define
class NF4Report:
    """What :func:`quantize_frozen_linears` did (names are this rank's modules)."""

    quantized: list[str] = attrs.field(factory=list)
    #: Frozen linear weights left in the compute dtype: NF4 cannot block-quantise their shape.
    kept: list[str] = attrs.field(factory=list)
    #: Frozen linear weights the model bridge keeps in the compute dtype (``quantize_module_filter``).
    excluded: list[str] = attrs.field(factory=list)

    def notes(self) -> list[str]:
        """The run's storage-line notes."""
        out = []
        if not self.kept:
            out.append(f"all {len(self.quantized)} other frozen linear weights in NF4" if self.excluded else
                       f"all {len(self.quantized)} frozen linear weights in NF4")
        else:
            shown = ", ".join(self.kept[:4]) + (f" and {len(self.kept) - 4} more" if len(self.kept) > 4 else "")
            out.append(f"{len(self.quantized)} frozen linear weights in NF4, {len(self.kept)} kept in the compute "
                       f"dtype (element count not a multiple of {NF4_BLOCK}): {shown}")
        if self.excluded:
            out.insert(0, f"{', '.join(self.excluded)} kept in the compute dtype by the model bridge")
        return out


@torch.no_grad()
def quantize_frozen_linears(model: nn.Module, *, compute_dtype: torch.dtype | None = None,
                            device: torch.device | str | None = None,
                            module_filter: Callable[[str], bool] | None = None) -> NF4Report:
    """Store every frozen linear weight of ``model`` (adapters excluded) as NF4, in place.

    ``compute_dtype``: the dtype the weight dequantises to (bf16 under autocast); ``None`` keeps the
    weight's own. ``device``: where the NF4 weights live (None: where each weight is); a model built in
    host memory is quantized one weight at a time on the GPU, so the GPU never holds the unquantized base.
    Each rank quantises the shard it holds; the parameter keeps its Megatron TP attributes.
    ``module_filter``: the model bridge's ``quantize_module_filter`` (a layer it leaves out keeps the compute
    dtype and is reported as kept).
    """
    from nvlcore.progress import progress_iter

    to_nf4, _ = nf4_api()
    report = NF4Report()
    # a 12B base takes a while (each weight to the GPU, then quantized): a bar over the layers that may be quantized
    layers = [(name, module, kind) for name, module in model.named_modules()
              if name and (kind := base_kind(module)) is not None and f".{ADAPTER_ATTR}." not in f".{name}."]
    for name, module, kind in progress_iter(layers, "quantizing the frozen base to NF4", unit="weight"):
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.requires_grad or hasattr(w, "__tensor_flatten__") or w.dim() != 2:
            continue
        if module_filter is not None and not module_filter(name):
            report.excluded.append(name)  # stays as stored (the compute dtype), moved like the rest
            continue
        group = scaler_block_for(w.numel())
        if group is None:
            report.kept.append(name)
            continue
        src = w.detach().to(device=device if device is not None else w.device, dtype=compute_dtype or w.dtype)
        q = nn.Parameter(to_nf4(src.contiguous(), NF4_BLOCK, group), requires_grad=False)
        del src
        for attr in _TP_ATTRS:
            if hasattr(w, attr):
                setattr(q, attr, getattr(w, attr))
        module.weight = q
        if kind != "plain":
            module._forward_impl = nf4_linear_impl  # the instance's matmul; see the module docstring
        else:
            module.forward = functools.partial(nf4_plain_forward, module)
        report.quantized.append(name)
    return report
