"""The parallel layers called as plain PyTorch, for the one-token decode step (``step`` of
:class:`~.mamba.MambaMixer`, :class:`~.attention.SelfAttention`, :class:`~.lm.MLPLayer`).

For Megatron's plain parallel linears these are ``F.linear`` on this rank's shard (plus the all-reduce
of a row-parallel layer), which ``torch.compile`` traces and a CUDA graph captures without Megatron's
autograd functions around them. Any other module, and any layer with forward hooks (nvl-lora attaches
LoRA/DoRA adapters as hooks), is called as a module, so what it adds is never skipped. The values are
those of the module call; the prefill and training call the modules themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def hooked(layer: nn.Module) -> bool:
    """Whether calling ``layer`` does more than its ``forward`` (adapters attached as hooks)."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks)


def column(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A column-parallel linear (its folded input norm included): this rank's output columns."""
    from .parallel import ColumnLinear, NormedColumnParallelLinear

    kind = type(layer)
    if kind is NormedColumnParallelLinear and not hooked(layer):
        return F.linear(layer.normalize(x), layer.weight, layer.bias)
    if kind is ColumnLinear and not hooked(layer):
        return F.linear(x, layer.weight, layer.bias)
    out, _ = layer(x)
    return out


def row(layer: nn.Module, x: torch.Tensor, tp: Any) -> torch.Tensor:
    """A row-parallel linear on this rank's input shard, summed over the TP group."""
    from .parallel import RowLinear

    if type(layer) is RowLinear and not hooked(layer):
        out = F.linear(x, layer.weight)
        if tp.size > 1:
            torch.distributed.all_reduce(out, group=tp.group)
        return out if layer.bias is None else out + layer.bias
    out, _ = layer(x)
    return out


def embedding(layer: nn.Module, ids: torch.Tensor, tp: Any) -> torch.Tensor:
    """A vocab-parallel embedding lookup (a plain lookup at TP=1)."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    if tp.size == 1 and type(layer) is VocabParallelEmbedding and not hooked(layer):
        return F.embedding(ids, layer.weight)
    return layer(ids)
