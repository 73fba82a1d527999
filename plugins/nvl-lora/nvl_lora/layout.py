"""Adapter tensors in the layouts of the model bridge's weight mapping.

The bridge's mapping table (one :class:`nvlcore.mapping.ParamMapping` per training parameter: its HF
keys, its transform kind, the TP split dimension ``tp_dim``) describes how a base weight's rows are
laid out. An adapter follows its base:

* B of a column-parallel base (``tp_dim == 0``) has the base weight's rows, so it takes the base's
  mapping with its own name: for ``linear_qkv`` the components ``q``, ``k``, ``v`` (HF ``q_proj``,
  ``k_proj``, ``v_proj`` for the LM; rows of the fused ``attn.qkv`` for the ViT); for Mamba
  ``in_proj`` the components ``z, x, B, C, dt`` (``ParamMapping.renamed``, so a bridge's own kind
  carries over too);
* A of a row-parallel base (``tp_dim == 1``) has the base's input columns: an
  :class:`~nvlcore.mapping.IdentityMapping` split on dim 1;
* the other factor is replicated;
* DoRA's magnitude (``[out, 1]``, one value per output row) is laid out like B: the base's row
  mapping for a column-parallel base, replicated for a row-parallel one. Its HF name is
  ``<module>.lora_magnitude_vector`` (1-D in the PEFT file).

The entries are the core's public :class:`nvlcore.mapping.ParamMapping`, read through the bridge
(``bridge.mapping_table()``), so this plugin never imports a model plugin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from nvlcore.mapping import IdentityMapping

IN = ".adapter.linear_in.weight"
OUT = ".adapter.linear_out.weight"
#: DoRA's magnitude, held ``[out, 1]`` so that it takes B's row layout (HF PEFT: ``lora_magnitude_vector``, 1-D).
MAG = ".adapter.magnitude.weight"


def split_adapter_key(key: str) -> tuple[str, str, str] | None:
    """``(module, "A"|"B"|"M", component suffix)`` for an adapter key, else ``None`` ("M": DoRA's magnitude)."""
    for marker, which in ((IN, "A"), (OUT, "B"), (MAG, "M")):
        i = key.find(marker)
        if i >= 0:
            return key[:i], which, key[i + len(marker) :]
    return None


def base_entry(by_name: Mapping[str, Any], module: str) -> Any:
    try:
        return by_name[f"{module}.weight"]
    except KeyError:
        raise KeyError(
            f"adapter on {module}: the model's mapping has no base weight {module}.weight "
            "(was this adapter trained on another model?)"
        ) from None


def adapter_entry(base: Any, module: str, which: str) -> Any:
    """The mapping entry of one adapter factor, derived from its base's (see the module docstring)."""
    name = module + {"A": IN, "B": OUT, "M": MAG}[which]
    if which == "M":
        hf = tuple(k[: -len(".weight")] + ".lora_magnitude_vector" for k in base.hf)
    else:
        lora = "lora_A" if which == "A" else "lora_B"
        hf = tuple(k[: -len(".weight")] + f".{lora}.weight" for k in base.hf)
    column = base.tp_dim == 0
    if which in ("B", "M") and column:
        return base.renamed(name, hf)
    split = 1 if (which == "A" and base.tp_dim == 1) else None
    return IdentityMapping(name, hf, split, tp_units=base.tp_units)


def adapter_entries(table: Iterable[Any], adapter_param_names: Iterable[str]) -> dict[str, Any]:
    """Adapter parameter name -> its derived mapping entry."""
    by_name = {m.megatron: m for m in table}
    out = {}
    for name in adapter_param_names:
        parsed = split_adapter_key(name)
        if parsed is None or parsed[2]:
            raise ValueError(f"{name} is not an adapter parameter name")
        module, which, _ = parsed
        out[name] = adapter_entry(base_entry(by_name, module), module, which)
    return out


def to_components(table: Iterable[Any], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors in component form, whatever form they were saved in.

    A trainer that saves parameters generically stores B of ``linear_qkv`` as one fused tensor in the
    training model's row order (per KV group ``[q, k, v]``), which is TP-independent because each
    rank holds whole groups; the bridge's form is the components. Both are accepted here, and
    non-adapter tensors pass through unchanged.
    """
    by_name = {m.megatron: m for m in table}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        parsed = split_adapter_key(key)
        if parsed is None or parsed[2]:
            out[key] = t
            continue
        module, which, _ = parsed
        entry = adapter_entry(base_entry(by_name, module), module, which)
        out.update(entry.local_to_components([t]))
    return out


def base_to_components(entry: Any, base: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """The base weight of ``entry`` as components, and whether ``base`` held it fused."""
    comps = entry.components
    if all(c in base for c in comps):
        return {c: base[c] for c in comps}, False
    if entry.megatron in base:
        return entry.local_to_components([base[entry.megatron]]), True
    raise KeyError(f"the base checkpoint has neither {list(comps)} nor {entry.megatron}")


def adapters_by_module(
    table: list[Any], state: Mapping[str, Any]
) -> tuple[dict[str, dict[str, tuple[Any, ...]]], dict[str, Any]]:
    """Every adapter of ``state`` in HF form: training module -> {HF module: ``(lora_A [r, in], lora_B [out, r])``,
    plus ``lora_magnitude_vector [out]`` for DoRA} (a fused training module, e.g. an attention ``linear_qkv``, has
    several HF modules, B's rows split between them); and the non-adapter tensors (trained fully) by training name."""
    by_name = {m.megatron: m for m in table}
    comps = to_components(table, state)
    modules = sorted({p[0] for k in comps if (p := split_adapter_key(k))})
    trained = {k: comps[k] for k in sorted(comps) if not split_adapter_key(k)}
    out: dict[str, dict[str, tuple[Any, ...]]] = {}
    for module in modules:
        base = base_entry(by_name, module)
        a = comps[f"{module}.adapter.linear_in.weight"]
        b_entry = adapter_entry(base, module, "B")
        missing = [c for c in b_entry.components if c not in comps]
        if missing:
            raise KeyError(f"adapter of {module}: tensors {missing} are missing from the checkpoint")
        b_hf = b_entry.components_to_hf({c: comps[c] for c in b_entry.components})
        m_entry = adapter_entry(base, module, "M")
        m_hf = None
        if any(c in comps for c in m_entry.components):
            missing = [c for c in m_entry.components if c not in comps]
            if missing:
                raise KeyError(f"DoRA adapter of {module}: magnitude tensors {missing} are missing from the checkpoint")
            m_hf = m_entry.components_to_hf({c: comps[c] for c in m_entry.components})
        for hf_key in base.hf:
            hf_module = hf_key[: -len(".weight")]
            pair = (a, b_hf[f"{hf_module}.lora_B.weight"])
            if m_hf is not None:
                pair += (m_hf[f"{hf_module}.lora_magnitude_vector"].reshape(-1),)
            out.setdefault(module, {})[hf_module] = pair
    return out, trained
