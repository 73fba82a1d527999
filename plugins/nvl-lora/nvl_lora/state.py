"""Adapter state as logical full tensors, independent of the tensor-parallel size.

Checkpoints hold every tensor in its logical (TP=1) shape so that a run saved at TP=N resumes or
merges at TP=M. For an adapter that means:

* B of a column-parallel base, ``[out, r]``, in the **same row layout as the base weight**: the rows
  of ``linear_qkv``'s B are interleaved per KV group exactly like ``linear_qkv.weight``; for a base the
  mapping stores as components (Mamba ``in_proj``: z, x, B, C, dt, each split over TP), B is stored as
  the same components, ``...in_proj.adapter.linear_out.weight.z`` etc., so that merging is
  ``W.c + scale * B.c @ A`` component by component;
* A of a row-parallel base, ``[r, in]``, gathered along its input columns;
* replicated tensors as they are (rank 0's copy).

``row_components(module_name)`` tells which adapted modules have such component rows: it returns
``[(component, full_rows), ...]`` in the order the TP-local rows are laid out on each rank
(``[z_r, x_r, B_r, C_r, dt_r]``), or ``None`` for a plain split. The model bridge provides it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from nvl_lora.layers import ADAPTER_ATTR, LoRAAdapter

RowComponents = Callable[[str], "Sequence[tuple[str, int]] | None"]

ADAPTER_IN = f"{ADAPTER_ATTR}.linear_in.weight"
ADAPTER_OUT = f"{ADAPTER_ATTR}.linear_out.weight"


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


def _check_components(name: str, comps: Sequence[tuple[str, int]], full_rows: int, tp: int) -> None:
    total = sum(n for _, n in comps)
    if total != full_rows:
        raise ValueError(f"{name}: components {list(comps)} sum to {total} rows, the layer has {full_rows}")
    bad = [c for c, n in comps if n % tp]
    if bad:
        raise ValueError(f"{name}: components {bad} do not split evenly over TP={tp}")


def gather_adapter_state(
    model: nn.Module,
    row_components: RowComponents | None = None,
    *,
    param_dtype: torch.dtype | None = None,
    grads: bool = False,
) -> dict[str, torch.Tensor]:
    """Every adapter tensor as a logical full tensor (on CPU), keyed by its parameter name.

    Collective over each adapter's TP group when TP > 1: call it on every rank. With ``grads`` the
    parameters' gradients are gathered instead (zeros where there is none), e.g. for parity tests.
    """
    out: dict[str, torch.Tensor] = {}
    for name, ad in _adapters(model).items():
        for short, dim in ad.split_dims.items():
            p = getattr(ad, short.split(".")[0]).weight
            if grads:
                p = p.grad if p.grad is not None else torch.zeros_like(p)
            key = f"{name}.{ADAPTER_ATTR}.{short}"
            comps = row_components(name) if (row_components and short == "linear_out.weight") else None
            if dim is None:
                full = p.detach()
                if comps:
                    for c, part in zip([c for c, _ in comps], full.split([n for _, n in comps], dim=0)):
                        out[f"{key}.{c}"] = part.to("cpu", param_dtype).clone()
                    continue
                out[key] = full.to("cpu", param_dtype).clone()
                continue
            shards = _all_gather(p, ad)
            if comps:
                _check_components(name, comps, ad.out_features, ad.tp_size)
                local_sizes = [n // ad.tp_size for _, n in comps]
                per_rank = [s.split(local_sizes, dim=0) for s in shards]
                for i, (c, _) in enumerate(comps):
                    out[f"{key}.{c}"] = torch.cat([r[i] for r in per_rank], dim=0).to("cpu", param_dtype)
            else:
                out[key] = torch.cat(shards, dim=dim).to("cpu", param_dtype)
    return out


def adapter_keys(model: nn.Module, row_components: RowComponents | None = None) -> list[str]:
    """The keys :func:`gather_adapter_state` produces, without communication."""
    keys = []
    for name, ad in _adapters(model).items():
        keys.append(f"{name}.{ADAPTER_IN}")
        comps = row_components(name) if row_components else None
        if comps:
            keys.extend(f"{name}.{ADAPTER_OUT}.{c}" for c, _ in comps)
        else:
            keys.append(f"{name}.{ADAPTER_OUT}")
    return keys


@torch.no_grad()
def load_adapter_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    row_components: RowComponents | None = None,
    *,
    strict: bool = True,
) -> list[str]:
    """Copy logical full adapter tensors into this rank's shards.

    With ``strict``, a missing adapter key or a shape mismatch is an error that names the key; extra
    non-adapter keys in ``state`` are ignored (an adapter checkpoint also holds unfrozen weights).
    Returns the keys used.
    """
    used: list[str] = []
    missing: list[str] = []
    for name, ad in _adapters(model).items():
        for short, dim in ad.split_dims.items():
            p = getattr(ad, short.split(".")[0]).weight
            key = f"{name}.{ADAPTER_ATTR}.{short}"
            comps = row_components(name) if (row_components and short == "linear_out.weight") else None
            if comps:
                ckeys = [f"{key}.{c}" for c, _ in comps]
                absent = [k for k in ckeys if k not in state]
                if absent:
                    missing.extend(absent)
                    continue
                full_parts = [state[k] for k in ckeys]
                for k, t, (_, n) in zip(ckeys, full_parts, comps):
                    if t.shape != (n, ad.rank):
                        raise ValueError(f"adapter tensor {k}: shape {tuple(t.shape)}, expected {(n, ad.rank)}")
                if dim is None:
                    local = torch.cat(full_parts, dim=0)
                else:
                    local = torch.cat([t.chunk(ad.tp_size, dim=0)[ad.tp_rank] for t in full_parts], dim=0)
                p.copy_(local.to(p.dtype))
                used.extend(ckeys)
                continue
            if key not in state:
                missing.append(key)
                continue
            full = state[key]
            expected = (ad.rank, ad.in_features) if short.startswith("linear_in") else (ad.out_features, ad.rank)
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
