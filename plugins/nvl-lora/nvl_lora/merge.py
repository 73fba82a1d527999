"""Merging adapters into base weights on logical (TP-independent) tensors.

``W' = W + (alpha / r) * B @ A`` (LoRA) or ``W' = m / ||V||_row ⊙ V`` with ``V = W + (alpha / r) * B @ A``
(DoRA, whose magnitude ``m`` is ``M.adapter.magnitude.weight`` ``[out, 1]``), computed in fp32 and cast
back to W's dtype, for every adapted module ``M``: A is ``M.adapter.linear_in.weight``; B is
``M.adapter.linear_out.weight`` and W is ``M.weight``, or, for a base the checkpoint stores as row components (Mamba
``in_proj``), B and W are ``...weight.<component>`` pairs merged component by component (the components partition the
rows, so this is the same as merging the fused matrix).

Works on plain ``{name: tensor}`` mappings, so it needs neither the model nor a process group: the
``nvl peft merge`` command runs it on CPU, one module at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping

import attrs
import torch

IN_SUFFIX = ".adapter.linear_in.weight"
OUT_SUFFIX = ".adapter.linear_out.weight"
MAG_SUFFIX = ".adapter.magnitude.weight"


class MergeError(ValueError):
    """The adapter and base checkpoints do not fit together."""


@attrs.frozen
class AdapterPair:
    """One adapted module's tensors: A, and B with the base key each B part merges into."""

    module: str
    a_key: str
    parts: tuple[tuple[str, str], ...]  # (B key, base weight key)


def is_adapter_key(key: str) -> bool:
    return IN_SUFFIX in key or OUT_SUFFIX in key or MAG_SUFFIX in key


def magnitude_key(b_key: str) -> str:
    """The DoRA magnitude key that goes with a B key (same component suffix)."""
    return b_key.replace(OUT_SUFFIX, MAG_SUFFIX)


def adapter_pairs(keys: list[str] | set[str] | Mapping[str, object]) -> list[AdapterPair]:
    """Group adapter keys by module; an A without B (or B without A) is a :class:`MergeError`."""
    keys = set(keys)
    modules_a = {k[: -len(IN_SUFFIX)] for k in keys if k.endswith(IN_SUFFIX)}
    outs: dict[str, list[str]] = {}
    for k in keys:
        i = k.find(OUT_SUFFIX)
        if i >= 0:
            outs.setdefault(k[:i], []).append(k)
    missing_b = sorted(modules_a - outs.keys())
    missing_a = sorted(outs.keys() - modules_a)
    if missing_b or missing_a:
        parts = []
        if missing_b:
            parts.append(f"A without B for {missing_b[:4]}")
        if missing_a:
            parts.append(f"B without A for {missing_a[:4]}")
        raise MergeError("incomplete adapter state: " + "; ".join(parts))
    pairs = []
    for m in sorted(modules_a):
        bparts = []
        for bk in sorted(outs[m]):
            comp = bk[len(m) + len(OUT_SUFFIX) :]  # "" or ".z"
            bparts.append((bk, f"{m}.weight{comp}"))
        pairs.append(AdapterPair(m, m + IN_SUFFIX, tuple(bparts)))
    return pairs


def merged_weight(
    w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None
) -> torch.Tensor:
    """``w + scale * b @ a`` in fp32, cast back to ``w``'s dtype; with a DoRA ``magnitude`` (``[out]`` or
    ``[out, 1]``) each row of that is rescaled to ``magnitude / its norm``."""
    v = w.float() + scale * (b.float() @ a.float())
    if magnitude is not None:
        m = magnitude.float().reshape(-1)
        if m.shape[0] != v.shape[0]:
            raise MergeError(f"DoRA magnitude has {m.shape[0]} rows, the weight {v.shape[0]}")
        v = (m / v.norm(dim=1))[:, None] * v
    return v.to(w.dtype)


def check_rank(pairs: list[AdapterPair], adapter: Mapping[str, torch.Tensor], dim: int) -> None:
    for p in pairs:
        a = adapter[p.a_key]
        if a.ndim != 2 or a.shape[0] != dim:
            raise MergeError(f"{p.a_key}: shape {tuple(a.shape)} does not have rank {dim} rows (peft.dim={dim})")
        for bk, _ in p.parts:
            if adapter[bk].ndim != 2 or adapter[bk].shape[1] != dim:
                raise MergeError(f"{bk}: shape {tuple(adapter[bk].shape)} does not have rank {dim} columns")


def merge_into(
    base: MutableMapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    dim: int,
) -> Iterator[str]:
    """Merge every adapter of ``adapter`` into ``base`` in place, yielding each merged base key.

    Non-adapter tensors of ``adapter`` (weights the LoRA run trained fully, e.g. the ViT with
    ``--lora-on-language-model``) replace the base's. A base key that is missing, or whose shape does
    not fit ``B @ A``, is a :class:`MergeError` naming it.
    """
    pairs = adapter_pairs(adapter.keys())
    check_rank(pairs, adapter, dim)
    scale = float(alpha) / int(dim)
    for key, t in adapter.items():
        if is_adapter_key(key):
            continue
        if key not in base:
            raise MergeError(f"the LoRA checkpoint's trained tensor {key} has no counterpart in the base checkpoint")
        if tuple(base[key].shape) != tuple(t.shape):
            raise MergeError(f"{key}: LoRA checkpoint shape {tuple(t.shape)} != base shape {tuple(base[key].shape)}")
        base[key] = t.to(base[key].dtype)
        yield key
    for p in pairs:
        a = adapter[p.a_key]
        for bk, wk in p.parts:
            if wk not in base:
                raise MergeError(
                    f"adapter {bk} belongs to base weight {wk}, which the base checkpoint lacks "
                    "(is --pretrained the checkpoint this adapter was trained on?)"
                )
            w, b = base[wk], adapter[bk]
            if tuple(w.shape) != (b.shape[0], a.shape[1]):
                raise MergeError(
                    f"{wk}: base shape {tuple(w.shape)} does not match adapter B {tuple(b.shape)} @ A {tuple(a.shape)}"
                )
            base[wk] = merged_weight(w, b, a, scale, adapter.get(magnitude_key(bk)))
            yield wk
