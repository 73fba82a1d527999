"""Conversion for Nemotron Nano V2 VL: the mapping table as conversion groups, and checkpoint loading.

Built on :mod:`.mapping` (one table for HF loading, import, export, LoRA merge):

- :func:`conversion_groups`: one :class:`~nvlcore.convert.ConversionGroup` per training parameter
  (HF tensors <-> its components), plus one *carried* group per HF tensor with no training
  counterpart (RADIO's ``input_conditioner.norm_mean``/``norm_std``, ``summary_idxs``, any unknown
  key), stored under :data:`CARRY_PREFIX` so an export reproduces the source exactly;
- :func:`load_checkpoint_weights`: fills a (tensor-parallel) training model from an nvl checkpoint
  of components, whatever TP size it was written at (``--pretrained-checkpoint``);
- :func:`model_components`: the model's parameters as this rank's shards of the logical components,
  for :func:`nvlcore.checkpoint.save_checkpoint` (the trainer's save);
- :func:`carried_state`: the carried tensors of a checkpoint or HF dir, for a trainer that wants its
  checkpoints to be self-contained.

Heavy imports happen inside functions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

    from nvlcore.checkpoint import TensorSpec
    from nvlcore.convert import ConversionGroup

    from .config import NemotronVLConfig

#: Checkpoint key prefix of HF tensors that have no training parameter (carried losslessly).
CARRY_PREFIX = "hf_only."


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message names the keys and shapes."""


def conversion_groups(cfg: "NemotronVLConfig", hf_specs: Mapping[str, "TensorSpec"]) -> list["ConversionGroup"]:
    """Groups covering every HF tensor of ``hf_specs`` exactly once (see the module docstring)."""
    from nvlcore.convert import ConversionGroup

    from .mapping import CARRIED_HF_KEYS, mapping_table

    table = mapping_table(cfg)
    missing = [k for m in table for k in m.hf if k not in hf_specs]
    if missing:
        raise CheckpointMismatchError(
            f"{len(missing)} HF tensor(s) the model described by {cfg.source} needs are not in the checkpoint, "
            f"e.g. {missing[:5]}; is config.json consistent with the weights?"
        )
    groups = [
        ConversionGroup(tuple(m.hf), tuple(m.components), m.hf_to_components, m.components_to_hf, name=m.megatron)
        for m in table
    ]
    mapped = {k for m in table for k in m.hf}
    unknown = [k for k in hf_specs if k not in mapped and k not in CARRIED_HF_KEYS]
    if unknown:
        print(
            f"nvl convert: note: {len(unknown)} HF tensor(s) have no place in the training model and are carried "
            f"unchanged under {CARRY_PREFIX!r}: {unknown[:5]}",
            file=sys.stderr,
        )
    for k in hf_specs:
        if k not in mapped:
            groups.append(ConversionGroup.rename(k, CARRY_PREFIX + k, carried=True))
    return groups


def _checkpoint(path: str | Path | Any) -> Any:
    from nvlcore.checkpoint import Checkpoint, open_checkpoint

    return path if isinstance(path, Checkpoint) else open_checkpoint(path)


# -------------------------------------------------------------------------------------------------
# this rank's part of each component (no gather, no full copies): the inverse pair of layouts


def _check_units(m: Any, tp_size: int) -> None:
    # The same rule as components_to_local: a split must not cut a unit (a Mamba group) in half,
    # even when the row count happens to divide.
    for field, n in getattr(m, "tp_units", ()):
        if n % tp_size:
            raise ValueError(f"{m.megatron}: {field} = {n} is not divisible by tensor_model_parallel_size={tp_size}")


def local_parts(m: Any, local: "torch.Tensor", tp_size: int, tp_rank: int) -> list[tuple[str, "torch.Tensor", int | None]]:
    """Split rank ``tp_rank``'s parameter ``local`` into its part of each component of mapping ``m``.

    Returns ``(component key, part, dim)``: ``part`` is the ``tp_rank``-th chunk of the logical
    component along ``dim`` (``None``: the part is the whole component, replicated on every rank).
    This is :meth:`~.mapping.ParamMapping.components_to_local` read backwards for one rank.
    """
    if tp_size == 1:
        return [(c, t, None) for c, t in m.local_to_components([local]).items()]
    _check_units(m, tp_size)
    if m.kind == "identity":
        return [(m.megatron, local, m.tp_dim)]
    if m.kind == "vocab":
        (vocab,) = m.sizes
        n = local.shape[0]
        valid = max(0, min(n, vocab - tp_rank * n))  # the last ranks' padding rows are not logical rows
        return [(m.megatron, local[:valid], 0)]
    if m.kind in ("lm_qkv", "vit_qkv"):
        heads, kv, d = m.sizes
        rep = heads // kv
        rest = tuple(local.shape[1:])
        s = local.reshape(kv // tp_size, (rep + 2) * d, *rest)
        q, k, v = s.split([rep * d, d, d], dim=1)
        return [(c, x.reshape(-1, *rest), 0) for c, x in zip(m.components, (q, k, v))]
    if m.kind in ("mamba_in_proj", "mamba_conv1d"):
        sizes = [n // tp_size for n in m.sizes]
        return [(c, x, 0) for c, x in zip(m.components, local.split(sizes, dim=0))]
    raise ValueError(f"{m.megatron}: unknown mapping kind {m.kind!r}")


def assemble_local(m: Any, parts: Sequence["torch.Tensor"], tp_size: int, tp_rank: int) -> "torch.Tensor":
    """Inverse of :func:`local_parts`: this rank's parameter from its parts of each component."""
    import torch

    if tp_size == 1:
        return m.components_to_local(dict(zip(m.components, parts)), 1, 0)
    _check_units(m, tp_size)
    if m.kind == "identity":
        return parts[0]
    if m.kind == "vocab":
        (vocab,) = m.sizes
        n = -(-vocab // tp_size)
        (t,) = parts
        if t.shape[0] < n:
            t = torch.cat([t, t.new_zeros((n - t.shape[0],) + tuple(t.shape[1:]))], dim=0)
        return t
    if m.kind in ("lm_qkv", "vit_qkv"):
        heads, kv, d = m.sizes
        g = kv // tp_size
        q, k, v = parts
        rest = tuple(q.shape[1:])
        q = q.reshape(g, (heads // kv) * d, *rest)
        k = k.reshape(g, d, *rest)
        v = v.reshape(g, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    return torch.cat(list(parts), dim=0)


def _global_size(m: Any) -> int | None:
    """The logical size along the split dim when it is not ``local * tp`` (the padded vocabulary)."""
    return m.sizes[0] if m.kind == "vocab" else None


def model_components(model: Any) -> dict[str, Any]:
    """The model's parameters as logical components for :func:`nvlcore.checkpoint.save_checkpoint`.

    At TP=1: full tensors (views of the parameters). At TP>1: this rank's part of each component as a
    DTensor over ``model.tp.group`` (replicated parts as plain tensors): nothing is gathered, every
    rank calls ``save_checkpoint`` with its own dict, and DCP writes each part once.
    """
    from nvlcore.checkpoint import shard_tensor

    from .mapping import mapping_table

    params = dict(model.named_parameters())
    tp = model.tp
    out: dict[str, Any] = {}
    for m in mapping_table(model.config):
        p = params.get(m.megatron)
        if p is None:
            continue
        for key, part, dim in local_parts(m, p.detach(), tp.size, tp.rank):
            out[key] = part if dim is None else shard_tensor(part, dim, tp.group, global_size=_global_size(m))
    return out


def load_checkpoint_weights(model: Any, checkpoint: str | Path | Any, *, strict: bool = True) -> dict[str, Any]:
    """Load an nvl checkpoint (base dir, ``iter_N`` dir or opened Checkpoint) into ``model``.

    Works whatever TP size the checkpoint was written at. Parameter by parameter (memory: the largest
    parameter's local part), each rank reads only its part of each component (DTensor destinations
    over ``model.tp.group``, so DCP reads just those byte ranges) and lays it out through the mapping.
    Strict: every model parameter must be in the checkpoint; tensors the model does not use (carried
    HF-only tensors, optimizer state) are ignored and listed.

    :returns: ``{"loaded": n, "iteration": N, "path": str, "ignored": [...]}``.
    """
    import torch

    from nvlcore.checkpoint import shard_tensor

    from .mapping import mapping_table

    ck = _checkpoint(checkpoint)
    specs = ck.specs()
    table = mapping_table(model.config)
    params = dict(model.named_parameters())
    unmapped = sorted(set(params) - {m.megatron for m in table})
    if unmapped:
        raise RuntimeError(f"model parameters missing from the mapping table: {unmapped[:8]}")
    needed = [c for m in table if m.megatron in params for c in m.components]
    missing = [c for c in needed if c not in specs]
    if missing and strict:
        raise CheckpointMismatchError(
            f"checkpoint {ck.path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]} "
            f"(it holds {len(specs)}; is it a checkpoint of this model?)"
        )
    tp = model.tp
    loaded = 0
    with torch.no_grad():
        for m in table:
            p = params.get(m.megatron)
            if p is None or any(c not in specs for c in m.components):
                continue
            layout = local_parts(m, torch.empty(p.shape, dtype=p.dtype, device="meta"), tp.size, tp.rank)
            template: dict[str, Any] = {}
            for key, part, dim in layout:
                want = list(part.shape)
                if dim is not None:
                    want[dim] = _global_size(m) or part.shape[dim] * tp.size
                if tuple(want) != tuple(specs[key].shape):
                    raise CheckpointMismatchError(
                        f"shape mismatch for {key}: checkpoint {tuple(specs[key].shape)}, the model needs "
                        f"{tuple(want)} (parameter {m.megatron} {tuple(p.shape)} at TP {tp.size}; {ck.path})"
                    )
                buf = torch.empty(part.shape, dtype=p.dtype, device=p.device)
                template[key] = buf if dim is None else shard_tensor(buf, dim, tp.group, global_size=want[dim])
            got = ck.load(template)
            parts = [got[key].to_local() if hasattr(got[key], "to_local") else got[key] for key, _, _ in layout]
            p.copy_(assemble_local(m, parts, tp.size, tp.rank))
            loaded += 1
    used = set(needed)
    ignored = sorted(k for k in specs if k not in used)
    return {"loaded": loaded, "iteration": ck.iteration, "path": str(ck.path), "ignored": ignored}


def carried_state(source: str | Path) -> dict[str, "torch.Tensor"]:
    """The HF-only tensors (under :data:`CARRY_PREFIX`) of an nvl checkpoint or an HF directory."""
    from nvlcore.checkpoint import CheckpointNotFoundError
    from nvlcore.convert.safetensors_io import SafetensorsReader

    from .config import NemotronVLConfig
    from .mapping import mapping_table

    try:
        ck = _checkpoint(source)
    except CheckpointNotFoundError:
        reader = SafetensorsReader(source)
        mapped = {k for m in mapping_table(NemotronVLConfig.from_hf_dir(source)) for k in m.hf}
        keys = [k for k in reader.keys() if k not in mapped]
        return {CARRY_PREFIX + k: v for k, v in reader.read(keys).items()}
    keys = [k for k in ck.keys() if k.startswith(CARRY_PREFIX)]
    return ck.load(keys)


class BridgeConversionMixin:
    """The conversion face of :class:`~.bridge.NemotronVLBridge` (``nvl convert``, ``--pretrained-checkpoint``)."""

    config: "NemotronVLConfig"

    def conversion_groups(self, hf_specs: Mapping[str, "TensorSpec"]) -> list["ConversionGroup"]:
        """See :func:`conversion_groups`."""
        return conversion_groups(self.config, hf_specs)

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise naming every dimension ``tp`` does not divide."""
        self.config.check_tensor_parallel(tp)

    def load_checkpoint_weights(self, model: Any, checkpoint: Any, *, strict: bool = True) -> dict[str, Any]:
        """See :func:`load_checkpoint_weights`."""
        return load_checkpoint_weights(model, checkpoint, strict=strict)

    def model_components(self, model: Any) -> dict[str, Any]:
        """See :func:`model_components`."""
        return model_components(model)
