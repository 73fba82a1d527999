"""What a bridge gives the converter: groups of tensors that convert together.

A model bridge supplies them through :meth:`nvlcore.bridge.ModelBridge.conversion_groups` (by default
one group per entry of its mapping table) and checks a TP size with
:meth:`~nvlcore.bridge.ModelBridge.check_tensor_parallel`.

A :class:`ConversionGroup` ties a few HF tensors to a few checkpoint tensors (for example
``q_proj``/``k_proj``/``v_proj`` to the components of ``linear_qkv``) with a function each way. The
converter streams one group at a time, so memory is bounded by the largest group.

The functions must be plain tensor code (reshape, split, cat, index, ``clone``): the converter runs
them on ``meta`` tensors first to learn every output's shape and dtype without reading any data, so
it can validate shapes and lay out the output files before writing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


TensorDict = dict[str, "torch.Tensor"]


def _identity(d: TensorDict) -> TensorDict:
    return dict(d)


@dataclass(frozen=True)
class ConversionGroup:
    """HF tensors <-> checkpoint tensors that convert together.

    :param hf_keys: the HF keys of the group (each HF key belongs to exactly one group).
    :param checkpoint_keys: the checkpoint keys it produces (each belongs to exactly one group).
    :param to_checkpoint: ``{hf_key: tensor} -> {checkpoint_key: tensor}``.
    :param to_hf: the inverse, ``{checkpoint_key: tensor} -> {hf_key: tensor}``.
    :param carried: the HF tensors have no training counterpart and are only carried through the
        checkpoint (under the bridge's reserved prefix) so that export reproduces them. When a
        checkpoint lacks them (one written by a trainer from the model's parameters), export takes
        them from the source HF directory instead.
    """

    hf_keys: tuple[str, ...]
    checkpoint_keys: tuple[str, ...]
    to_checkpoint: Callable[[TensorDict], TensorDict] = field(default=_identity, compare=False)
    to_hf: Callable[[TensorDict], TensorDict] = field(default=_identity, compare=False)
    carried: bool = False
    name: str = ""

    @classmethod
    def rename(cls, hf_key: str, checkpoint_key: str, *, carried: bool = False) -> ConversionGroup:
        """A one-to-one rename."""
        return cls(
            (hf_key,),
            (checkpoint_key,),
            lambda d: {checkpoint_key: d[hf_key]},
            lambda d: {hf_key: d[checkpoint_key]},
            carried=carried,
            name=checkpoint_key,
        )
