"""Conversion for Nemotron Nano V2 VL: the mapping table as conversion groups, and checkpoint loading.

Built on :mod:`.mapping` (one table for HF loading, import, export, LoRA merge):

- :func:`conversion_groups`: one :class:`~nvlcore.convert.ConversionGroup` per training parameter
  (HF tensors <-> its components), plus one *carried* group per HF tensor with no training
  counterpart (RADIO's ``input_conditioner.norm_mean``/``norm_std``, ``summary_idxs``, any unknown
  key), stored under :data:`CARRY_PREFIX` so an export reproduces the source exactly;
- :func:`load_checkpoint_weights`: fills a (tensor-parallel) training model from an nvl checkpoint
  of components, whatever TP size it was written at (``--pretrained-checkpoint``);
- :func:`model_components`: the model's parameters as this rank's shards of the logical components
  (the trainer's layout, :mod:`.checkpoint_state`), for :func:`nvlcore.checkpoint.save_checkpoint`;
- :func:`carried_state`: the carried tensors of a checkpoint or HF dir, for a trainer that wants its
  checkpoints to be self-contained.

Heavy imports happen inside functions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

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


def model_components(model: Any) -> dict[str, Any]:
    """The model's parameters as checkpoint entries for :func:`nvlcore.checkpoint.save_checkpoint`.

    The trainer's layout (:mod:`.checkpoint_state`): at TP=1 full components; at TP>1 this rank's
    part of each component as a DTensor over ``model.tp.group`` (replicated parts as plain tensors).
    Nothing is gathered; every rank calls ``save_checkpoint`` with its own dict and DCP writes each
    part once. Parameters outside the mapping (adapters) are saved under their own name, sharded by
    their Megatron ``partition_dim``.
    """
    from nvlcore.checkpoint import shard_tensor

    from .checkpoint_state import checkpoint_entries
    from .mapping import by_megatron_name, mapping_table

    table = by_megatron_name(mapping_table(model.config))
    tp = model.tp
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        ent = checkpoint_entries(table, name, p.detach(), tp_group=tp.group, tp_rank=tp.rank, tp_size=tp.size)
        if ent is None:
            split = tp.size > 1 and getattr(p, "tensor_model_parallel", False)
            ent = {name: shard_tensor(p.detach(), int(getattr(p, "partition_dim", 0)), tp.group) if split else p.detach()}
        out.update(ent)
    return out


def load_checkpoint_weights(model: Any, path: str | Path | Any, *, strict: bool = True) -> dict[str, Any]:
    """Load an nvl checkpoint (base dir, ``iter_N`` dir or opened Checkpoint) into ``model``.

    Works whatever TP size the checkpoint was written at. Parameter by parameter (memory: the largest
    parameter's local part), each rank reads only its part of each component (DTensor destinations
    over ``model.tp.group`` laid out by :mod:`.checkpoint_state`, so DCP reads just those byte ranges)
    and assembles its TP-local parameter. Strict: every model parameter must be mapped and in the
    checkpoint, with matching shapes; ``strict=False`` loads what is there and leaves the rest (e.g.
    LoRA adapters) alone. Tensors the model does not use (carried HF-only tensors, optimizer state)
    are ignored and listed.

    :returns: ``{"loaded": n, "iteration": N, "path": str, "ignored": [...], "not_loaded": [...]}``.
    """
    import torch

    from .checkpoint_state import assemble_from_entries, checkpoint_entries
    from .mapping import by_megatron_name, mapping_table

    ck = _checkpoint(path)
    specs = ck.specs()
    table = by_megatron_name(mapping_table(model.config))
    params = dict(model.named_parameters())
    unmapped = sorted(set(params) - set(table))
    if unmapped and strict:
        raise CheckpointMismatchError(
            f"model parameters outside the Nemotron-VL mapping: {unmapped[:5]}; load pretrained weights before "
            "adding adapters, or pass strict=False to load the mapped ones and leave these alone"
        )
    params = {n: p for n, p in params.items() if n in table}
    needed = [c for n in params for c in table[n].components]
    missing = [c for c in needed if c not in specs]
    if missing and strict:
        raise CheckpointMismatchError(
            f"checkpoint {ck.path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]} "
            f"(it holds {len(specs)}; is it a checkpoint of this model?)"
        )
    from nvlcore.progress import progress_iter

    tp = model.tp
    loaded = 0
    for name, p in progress_iter(params.items(), f"loading {ck.path.name}", total=len(params), unit="tensor"):
        m = table[name]
        if any(c not in specs for c in m.components):
            continue
        buf = torch.empty_like(p, requires_grad=False)
        template = checkpoint_entries(table, name, buf, tp_group=tp.group, tp_rank=tp.rank, tp_size=tp.size)
        for key, t in template.items():
            if tuple(t.shape) != tuple(specs[key].shape):  # a DTensor's shape is the logical one
                raise CheckpointMismatchError(
                    f"shape mismatch for {key}: checkpoint {tuple(specs[key].shape)}, the model needs {tuple(t.shape)} "
                    f"(parameter {name} {tuple(p.shape)} at TP {tp.size}; {ck.path})"
                )
        got = ck.load(template)
        local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in got.items()}
        assemble_from_entries(table, name, local, p.data, tp_rank=tp.rank, tp_size=tp.size)
        loaded += 1
    used = set(needed)
    ignored = sorted(k for k in specs if k not in used)
    not_loaded = unmapped + sorted(n for n in params if any(c not in specs for c in table[n].components))
    return {"loaded": loaded, "iteration": ck.iteration, "path": str(ck.path), "ignored": ignored,
            "not_loaded": not_loaded}


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

    def load_checkpoint_weights(self, model: Any, path: Any, *, strict: bool = True, **_: Any) -> dict[str, Any]:
        """See :func:`load_checkpoint_weights` (the trainer's ``--pretrained-checkpoint``; extra keywords
        such as ``tp_group`` are accepted and unused: the model knows its TP group)."""
        return load_checkpoint_weights(model, path, strict=strict)

    def model_components(self, model: Any) -> dict[str, Any]:
        """See :func:`model_components`."""
        return model_components(model)
