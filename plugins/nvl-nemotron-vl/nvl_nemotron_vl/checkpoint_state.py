"""Training checkpoints of this model as logical components, written shard by shard.

The trainer saves each parameter (and each Adam moment, which has the parameter's layout) under the
component keys of :mod:`nvl_nemotron_vl.mapping` (the keys ``nvl convert import`` writes and
``nvl convert export`` reads). Every TP rank contributes *its* rows of each component as a DTensor
``Shard(dim)`` (see :func:`nvlcore.checkpoint.shard_tensor`), so nothing is gathered and a checkpoint
saved at one TP size loads at any other:

===================  ==========================================================================
kind                 this rank's part of each component
===================  ==========================================================================
identity (no TP)     the whole tensor (every rank passes it; the writer keeps one copy)
identity (TP dim d)  ``Shard(d)``
vocab                ``Shard(0)`` of the unpadded vocabulary (padding rows are not saved)
lm_qkv / vit_qkv     per KV group ``[q | k | v]`` rows: this rank's groups are a contiguous block of
                     each of ``q``, ``k`` and ``v`` -> three ``Shard(0)``
mamba_in_proj/conv1d ``[z_r | x_r | B_r | C_r | dt_r]``: one ``Shard(0)`` per part
===================  ==========================================================================

Parameters that are not in the mapping table (LoRA adapters, say) return ``None``; the trainer then
uses its generic layout (one tensor per parameter, sharded along ``partition_dim``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

    from .mapping import ParamMapping


def _split_local(m: "ParamMapping", local: "torch.Tensor", tp_size: int) -> list[tuple[str, "torch.Tensor", int | None, int | None]]:
    """``(component key, this rank's part, shard dim or None, logical size along it)`` for one parameter."""
    if m.kind == "identity":
        if m.tp_dim is None or tp_size == 1:
            return [(m.megatron, local, None, None)]
        return [(m.megatron, local, m.tp_dim, local.shape[m.tp_dim] * tp_size)]
    if m.kind == "vocab":
        (vocab,) = m.sizes[:1]
        return [(m.megatron, local, 0, vocab)]
    if m.kind in ("lm_qkv", "vit_qkv"):
        heads, kv, d = m.sizes[:3]
        rep = heads // kv
        groups = kv // tp_size
        s = local.reshape(groups, (rep + 2) * d, *local.shape[1:])
        q, k, v = s.split([rep * d, d, d], dim=1)
        parts = [q.reshape(-1, *local.shape[1:]), k.reshape(-1, *local.shape[1:]), v.reshape(-1, *local.shape[1:])]
        full = [heads * d, kv * d, kv * d]
        return [(c, t, 0, n) for c, t, n in zip(m.components, parts, full)]
    # mamba_in_proj / mamba_conv1d: the rank's slice of each part, concatenated
    sizes = list(m.sizes)
    local_sizes = [n // tp_size for n in sizes]
    return [(c, t, 0, n) for c, t, n in zip(m.components, local.split(local_sizes, dim=0), sizes)]


def _vocab_rows(vocab: int, tp_size: int, tp_rank: int) -> int:
    """Real (unpadded) rows of this rank's vocabulary shard: torch.chunk's split of ``vocab`` rows."""
    per = -(-vocab // tp_size)
    return max(0, min(per, vocab - tp_rank * per))


def checkpoint_entries(
    table: Mapping[str, "ParamMapping"],
    name: str,
    local: "torch.Tensor",
    *,
    tp_group: Any,
    tp_rank: int,
    tp_size: int,
) -> dict[str, Any] | None:
    """This rank's entries for parameter ``name`` (or a tensor laid out like it): ``{key: tensor or DTensor}``."""
    m = table.get(name)
    if m is None:
        return None
    from nvlcore.checkpoint import shard_tensor

    out: dict[str, Any] = {}
    for key, part, dim, size in _split_local(m, local, tp_size):
        if m.kind == "vocab":
            part = part[: _vocab_rows(size, tp_size, tp_rank)]
            if tp_size == 1:
                out[key] = part
                continue
        if dim is None or tp_size == 1:
            out[key] = part if part.is_contiguous() else part.contiguous()
        else:
            part = part if part.is_contiguous() else part.contiguous()
            out[key] = shard_tensor(part, dim, tp_group, global_size=size)
    return out


def assemble_from_entries(
    table: Mapping[str, "ParamMapping"],
    name: str,
    entries: Mapping[str, "torch.Tensor"],
    target: "torch.Tensor",
    *,
    tp_rank: int,
    tp_size: int,
) -> bool:
    """Write this rank's loaded parts (local tensors, keyed as :func:`checkpoint_entries` made them) into ``target``.

    :returns: False when ``name`` is not a mapped parameter.
    """
    import torch

    m = table.get(name)
    if m is None:
        return False
    with torch.no_grad():
        if m.kind == "vocab":
            (part,) = entries.values()
            rows = part.shape[0]
            target[:rows].copy_(part)
            target[rows:].zero_()
            return True
        parts = [entries[c] for c in m.components]
        if m.kind == "identity":
            target.copy_(parts[0])
        elif m.kind in ("lm_qkv", "vit_qkv"):
            heads, kv, d = m.sizes[:3]
            rep, groups = heads // kv, kv // tp_size
            q, k, v = parts
            tail = tuple(target.shape[1:])
            fused = torch.cat([q.reshape(groups, rep * d, *tail), k.reshape(groups, d, *tail),
                               v.reshape(groups, d, *tail)], dim=1)
            target.copy_(fused.reshape(target.shape))
        else:
            target.copy_(torch.cat(list(parts), dim=0))
    return True
