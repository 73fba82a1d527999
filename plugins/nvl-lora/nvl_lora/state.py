"""Adapter state as logical full tensors, independent of the tensor-parallel size.

Checkpoints hold every tensor in its logical (TP=1) shape so that a run saved at TP=N resumes or
merges at TP=M. Every adapter parameter is either replicated or a plain split of a logical tensor
along one dimension (Megatron's ``tensor_model_parallel``/``partition_dim`` attributes say which), so
"logical" is simply the concatenation of the ranks' shards:

* B of a column-parallel base, ``[out, r]``, rows in the base weight's (training) row order: for the
  LM's ``linear_qkv`` that is Megatron's per-KV-group ``[q, k, v]`` interleave, which is TP-independent
  because every rank holds whole groups; for a fused layer whose local rows are components split
  over TP (Mamba ``in_proj``: z, x, B, C, dt) B is held as one parameter per component,
  ``...in_proj.adapter.linear_out.weight.z`` etc., each a plain split;
* A of a row-parallel base, ``[r, in]``, split along its input columns;
* replicated tensors as they are.

This is exactly what the trainer's generic checkpointing does with the attributes (a DTensor
``Shard(partition_dim)`` per split parameter), so :func:`gather_adapter_state` and
:func:`load_adapter_state` give the same keys and tensors as a trainer checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nvl_lora.layers import ADAPTER_ATTR, LoRAAdapter


def _adapters(model: nn.Module) -> dict[str, LoRAAdapter]:
    return {
        n: m.get_submodule(ADAPTER_ATTR)
        for n, m in model.named_modules()
        if n and isinstance(getattr(m, ADAPTER_ATTR, None), LoRAAdapter)
    }


def _all_gather(t: torch.Tensor, adapter: LoRAAdapter) -> list[torch.Tensor]:
    if adapter.tp_size == 1:
        return [t]
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(adapter.tp_size)]
    torch.distributed.all_gather(out, t, group=adapter.tp_group)
    return out


def gather_adapter_state(
    model: nn.Module, *, param_dtype: torch.dtype | None = None, grads: bool = False
) -> dict[str, torch.Tensor]:
    """Every adapter tensor as a logical full tensor (on CPU), keyed by its parameter name.

    Collective over each adapter's TP group when TP > 1: call it on every rank. With ``grads`` the
    parameters' gradients are gathered instead (zeros where there is none), e.g. for parity tests.
    """
    out: dict[str, torch.Tensor] = {}
    for name, ad in _adapters(model).items():
        for rel, p, dim in ad.split_params():
            t = p.grad if grads else p
            if t is None:
                t = torch.zeros_like(p)
            t = t.detach()
            full = t if dim is None else torch.cat(_all_gather(t, ad), dim=dim)
            out[f"{name}.{ADAPTER_ATTR}.{rel}"] = full.to("cpu", param_dtype).clone()
    return out


def adapter_keys(model: nn.Module) -> list[str]:
    """The keys :func:`gather_adapter_state` produces, without communication."""
    return [f"{n}.{ADAPTER_ATTR}.{rel}" for n, ad in _adapters(model).items() for rel, _, _ in ad.split_params()]


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Copy logical full adapter tensors into this rank's shards.

    With ``strict``, a missing adapter key is an error naming it; a shape mismatch always is. Extra
    non-adapter keys in ``state`` are ignored (an adapter checkpoint also holds unfrozen weights).
    Returns the keys used.
    """
    used: list[str] = []
    missing: list[str] = []
    for name, ad in _adapters(model).items():
        for rel, p, dim in ad.split_params():
            key = f"{name}.{ADAPTER_ATTR}.{rel}"
            if key not in state:
                missing.append(key)
                continue
            full = state[key]
            expected = ad.full_shape(rel)
            if tuple(full.shape) != expected:
                raise ValueError(
                    f"adapter tensor {key}: shape {tuple(full.shape)}, expected {expected} "
                    "(was the checkpoint trained with another rank or model?)"
                )
            local = full if dim is None else full.chunk(ad.tp_size, dim=dim)[ad.tp_rank]
            p.copy_(local.to(p.dtype))
            used.append(key)
    if missing and strict:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise KeyError(f"adapter state lacks {len(missing)} key(s): {shown}")
    return used
