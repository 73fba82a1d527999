"""The weight mapping table: how each training parameter relates to HF tensors and checkpoint tensors.

A model bridge describes its model with one :class:`ParamMapping` per training parameter
(:meth:`nvlcore.bridge.ModelBridge.mapping_table`). Everything the core does with weights is built
on that one table, implemented once here and in :class:`~nvlcore.bridge.ModelBridge`: HF loading,
``nvl convert`` (conversion groups), training checkpoints (component entries at any TP size),
checkpoint loading, and the layout of PEFT adapters (an adapter plugin reads the same table through
the bridge).

Three faces of every weight:

* **HF tensors**: the checkpoint's keys and layouts.
* **Components**: logical, full-shape tensors keyed by the training parameter name; a fused
  parameter is stored as its parts (``...linear_qkv.weight.q``, ``.k``, ``.v``; ``...weight.z``,
  ``.x`` ... for a :class:`PartsMapping`). A checkpoint of components loads at any TP size.
* **TP-local parameters**: what rank ``r`` of ``tp`` holds in ``model.named_parameters()``.

Each transform kind is a subclass of :class:`ParamMapping` that owns both directions of both steps
(HF <-> components, components <-> TP-local, and the per-rank checkpoint layout); the core calls
those methods and never asks which kind it holds. The built-in kinds:

=======================  ===================================================  ============================
class                    HF  <->  components                                  components -> TP-local
=======================  ===================================================  ============================
``IdentityMapping``      same tensor                                          chunk ``tp_dim`` (or whole)
``VocabMapping``         same tensor (``[vocab, ...]``)                       pad rows to a multiple of tp
                                                                              with zeros, chunk dim 0
``QKVMapping``           three HF tensors (``q``, ``k``, ``v``) one to one,   per KV group ``[q (its
                         or one fused tensor of rows ``[Q; K; V]``            heads), k, v]``; each rank
                                                                              gets whole groups
``PartsMapping``         one HF tensor of rows ``[p0 | p1 | ...]``, or one    ``[p0_r | p1_r | ...]``: each
                         HF tensor per part                                   part chunked over TP
=======================  ===================================================  ============================

A bridge whose checkpoint needs another transform subclasses one of these (or :class:`ParamMapping`
itself) in its own package and puts instances in its table; see docs/plugin-authors.md. Transforms
must be pure tensor reshapes/concatenations/permutations (they also run on ``meta`` tensors, which
``nvl convert`` uses to plan without reading data), and each inverse must be exact: conversion is lossless.

:class:`LinearLayout` is what the table says about a linear layer for adapter methods: whether it
normalises its own input (its ``layer_norm_weight`` is in the table; such a layer exposes
``normalize(x)``, see :class:`NormFusedLinear`) and the named row parts of a fused layer.

Importing this module is cheap (torch is imported inside functions).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

#: Checkpoint key prefix of HF tensors with no training parameter (carried losslessly through ``nvl convert``).
CARRY_PREFIX = "hf_only."


class LocalComponent(NamedTuple):
    """One component's part of a rank's TP-local parameter, as a training checkpoint stores it."""

    #: the component key (:attr:`ParamMapping.components`)
    key: str
    #: this rank's rows of that component
    tensor: torch.Tensor
    #: the dimension ranks split the component on; ``None``: every rank holds it whole
    dim: int | None
    #: the component's full (logical) size along ``dim``
    size: int | None


@dataclass(frozen=True)
class ParamMapping(ABC):
    """How one training parameter relates to HF keys and to its checkpoint components (a transform kind).

    Subclasses implement the six abstract methods (HF <-> components, the TP split and gather, the
    checkpoint layout and its inverse); a kind with several components overrides :attr:`components` too. Subclasses are
    frozen dataclasses: :meth:`renamed` (used to lay an adapter factor out like its base weight) copies them with
    ``dataclasses.replace``.

    :param megatron: the training parameter's name (as in ``model.named_parameters()``).
    :param hf: its HF keys.
    :param tp_units: counts TP must divide for the split to be meaningful (a part split may not cut a
        group in half even when the row count happens to divide), as ``(config field, value)``; the
        error names the field.
    """

    megatron: str
    hf: tuple[str, ...]
    tp_units: tuple[tuple[str, int], ...] = field(default=(), kw_only=True)

    #: a short name of the transform for messages and docs (never dispatched on)
    kind: ClassVar[str] = "custom"
    #: the dimension of the TP-local parameter that tensor parallelism splits (``None``: replicated);
    #: adapter methods read it to tell column- (0) from row-parallel (1) layers
    tp_dim: ClassVar[int | None] = None

    # -------------------------------------------------------------------------------- names
    @property
    def components(self) -> tuple[str, ...]:
        """Checkpoint keys of this parameter's logical parts (default: one, the parameter's name)."""
        return (self.megatron,)

    @property
    def row_parts(self) -> tuple[tuple[str, int], ...]:
        """A fused column-parallel layer's rows as ``((part, full rows), ...)``, each part chunked over TP
        and the rank's parts concatenated (:class:`LinearLayout`); ``()`` for any other layout."""
        return ()

    def renamed(self, megatron: str, hf: Sequence[str]) -> ParamMapping:
        """The same layout under other names (an adapter factor laid out like its base weight)."""
        return dataclasses.replace(self, megatron=megatron, hf=tuple(hf))

    # ------------------------------------------------------------------------ HF <-> components
    @abstractmethod
    def hf_to_components(self, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF tensors (at least this mapping's :attr:`hf` keys) -> this parameter's components."""

    @abstractmethod
    def components_to_hf(self, comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Exact inverse of :meth:`hf_to_components`."""

    # ------------------------------------------------------------------ components <-> TP-local
    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ``ValueError`` naming what ``tp_size`` does not divide (the declared units; subclasses add theirs)."""
        for name, n in self.tp_units:
            _div(n, tp_size, f"{self.megatron}: {name}")

    @abstractmethod
    def components_to_local(self, comps: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> torch.Tensor:
        """Components -> what rank ``tp_rank`` of ``tp_size`` holds (the TP split)."""

    @abstractmethod
    def local_to_components(self, shards: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`components_to_local`, from the local tensors of all ranks in rank order (the gather)."""

    # ------------------------------------------------------------------ training checkpoints
    @abstractmethod
    def local_components(self, local: torch.Tensor, tp_size: int, tp_rank: int) -> list[LocalComponent]:
        """This rank's part of each component, cut from its local tensor without communication
        (a training checkpoint stores each as a DTensor ``Shard(dim)``, so it loads at any TP size)."""

    @abstractmethod
    def assemble_local(self, parts: Mapping[str, torch.Tensor], target: torch.Tensor, tp_size: int,
                       tp_rank: int) -> None:
        """Inverse of :meth:`local_components`: write this rank's parts (keyed by component) into ``target``."""

    # ------------------------------------------------------------------------------ helpers
    def need(self, d: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        """``d[key]``, or a ``KeyError`` naming this parameter and the missing key."""
        return _need(d, key, self.megatron)


class _OneTensor:
    """HF <-> components of a kind whose one component is its one HF tensor (the first HF key)."""

    megatron: str
    hf: tuple[str, ...]

    def hf_to_components(self, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.megatron: self.need(hf, self.hf[0])}  # type: ignore[attr-defined]

    def components_to_hf(self, comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.hf[0]: self.need(comps, self.megatron)}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class IdentityMapping(_OneTensor, ParamMapping):
    """The HF tensor is the parameter; TP chunks ``tp_dim`` (``None``: replicated).

    With several HF keys the first is the tensor (an adapter's A factor mirrors its base's keys).
    """

    tp_dim: int | None = None  # type: ignore[misc]  # a field here, a class default on the base
    kind: ClassVar[str] = "identity"

    def components_to_local(self, comps: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> torch.Tensor:
        self.check_tensor_parallel(tp_size)
        t = self.need(comps, self.megatron)
        return t if self.tp_dim is None else _chunk(t, self.tp_dim, tp_size, self.megatron)[tp_rank]

    def local_to_components(self, shards: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        full = shards[0] if self.tp_dim is None else torch.cat(list(shards), dim=self.tp_dim)
        return {self.megatron: full}

    def local_components(self, local: torch.Tensor, tp_size: int, tp_rank: int) -> list[LocalComponent]:
        if self.tp_dim is None or tp_size == 1:
            return [LocalComponent(self.megatron, local, None, None)]
        return [LocalComponent(self.megatron, local, self.tp_dim, local.shape[self.tp_dim] * tp_size)]

    def assemble_local(self, parts: Mapping[str, torch.Tensor], target: torch.Tensor, tp_size: int,
                       tp_rank: int) -> None:
        target.copy_(self.need(parts, self.megatron))


@dataclass(frozen=True)
class VocabMapping(_OneTensor, ParamMapping):
    """A vocabulary-parallel tensor ``[vocab_size, ...]``: TP pads the rows with zeros to a multiple of tp
    and chunks dim 0; checkpoints hold only the real rows."""

    vocab_size: int
    kind: ClassVar[str] = "vocab"
    tp_dim: ClassVar[int | None] = 0

    def components_to_local(self, comps: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> torch.Tensor:
        import torch

        self.check_tensor_parallel(tp_size)
        t = self.need(comps, self.megatron)
        pad = (-t.shape[0]) % tp_size
        if pad:
            t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))], dim=0)
        return t.chunk(tp_size, dim=0)[tp_rank]

    def local_to_components(self, shards: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        return {self.megatron: torch.cat(list(shards), dim=0)[: self.vocab_size]}

    def _real_rows(self, tp_size: int, tp_rank: int) -> int:
        """Real (unpadded) rows of this rank's shard: torch.chunk's split of ``vocab_size`` rows."""
        per = -(-self.vocab_size // tp_size)
        return max(0, min(per, self.vocab_size - tp_rank * per))

    def local_components(self, local: torch.Tensor, tp_size: int, tp_rank: int) -> list[LocalComponent]:
        part = local[: self._real_rows(tp_size, tp_rank)]
        return [LocalComponent(self.megatron, part, None if tp_size == 1 else 0, self.vocab_size)]

    def assemble_local(self, parts: Mapping[str, torch.Tensor], target: torch.Tensor, tp_size: int,
                       tp_rank: int) -> None:
        part = self.need(parts, self.megatron)
        target[: part.shape[0]].copy_(part)
        target[part.shape[0]:].zero_()


@dataclass(frozen=True)
class FusedRowsMapping(ParamMapping):
    """Base of kinds whose parameter is named row blocks fused along dim 0 (:meth:`part_rows`).

    HF holds either one tensor per part (as many keys as parts) or one fused tensor of rows
    ``[p0 | p1 | ...]`` (one key). The TP layout here chunks every part over the ranks and
    concatenates the rank's chunks (``[p0_r | p1_r | ...]``); a kind with another layout overrides
    the TP methods (see :class:`QKVMapping`).
    """

    tp_dim: ClassVar[int | None] = 0

    @abstractmethod
    def part_rows(self) -> tuple[tuple[str, int], ...]:
        """``((part name, full rows), ...)`` in fused order."""

    def __post_init__(self) -> None:
        n = len(self.part_rows())
        if len(self.hf) not in (1, n):
            raise ValueError(f"{self.megatron}: {len(self.hf)} HF keys for {n} component(s); give 1 (fused) or {n}")

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(f"{self.megatron}.{p}" for p, _ in self.part_rows())

    @property
    def row_parts(self) -> tuple[tuple[str, int], ...]:
        return self.part_rows()

    def hf_to_components(self, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ts = [self.need(hf, k) for k in self.hf]
        if len(ts) == len(self.components):
            return dict(zip(self.components, ts, strict=True))
        (t,) = ts
        rows = [n for _, n in self.part_rows()]
        if t.shape[0] != sum(rows):
            raise ValueError(f"{self.hf[0]}: {t.shape[0]} rows, expected {sum(rows)} ({self.kind} parts {rows})")
        return dict(zip(self.components, t.split(rows, dim=0), strict=True))

    def components_to_hf(self, comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        ts = [self.need(comps, k) for k in self.components]
        if len(self.hf) == len(ts):
            return dict(zip(self.hf, ts, strict=True))
        return {self.hf[0]: torch.cat(ts, dim=0)}

    def check_tensor_parallel(self, tp_size: int) -> None:
        super().check_tensor_parallel(tp_size)
        for name, n in self.part_rows():
            _div(n, tp_size, f"{self.megatron}: part {name}")

    def components_to_local(self, comps: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> torch.Tensor:
        import torch

        super().check_tensor_parallel(tp_size)
        ts = [self.need(comps, k) for k in self.components]
        return torch.cat([_chunk(t, 0, tp_size, self.megatron)[tp_rank] for t in ts], dim=0)

    def local_to_components(self, shards: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        local_rows = [_div(n, len(shards), f"{self.megatron} part") for _, n in self.part_rows()]
        split = [s.split(local_rows, dim=0) for s in shards]
        return {c: torch.cat([p[i] for p in split], dim=0) for i, c in enumerate(self.components)}

    def local_components(self, local: torch.Tensor, tp_size: int, tp_rank: int) -> list[LocalComponent]:
        rows = [n for _, n in self.part_rows()]
        local_rows = [n // tp_size for n in rows]
        return [LocalComponent(c, t, 0, n) for c, t,
                n in zip(self.components, local.split(local_rows, dim=0), rows, strict=True)]

    def assemble_local(self, parts: Mapping[str, torch.Tensor], target: torch.Tensor, tp_size: int,
                       tp_rank: int) -> None:
        import torch

        target.copy_(torch.cat([self.need(parts, c) for c in self.components], dim=0))


@dataclass(frozen=True)
class PartsMapping(FusedRowsMapping):
    """Named row parts fused along dim 0 (an SSM mixer's ``in_proj`` ``[z | x | B | C | dt]``), each chunked over TP.

    :param parts: ``((name, full rows), ...)`` in fused order; the names are the component key suffixes.
    """

    parts: tuple[tuple[str, int], ...]
    kind: ClassVar[str] = "parts"

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"{self.megatron}: a parts mapping needs at least one (name, rows) in parts")
        super().__post_init__()

    def part_rows(self) -> tuple[tuple[str, int], ...]:
        return tuple((str(p), int(n)) for p, n in self.parts)


@dataclass(frozen=True)
class QKVMapping(FusedRowsMapping):
    """An attention ``linear_qkv``: components ``q``, ``k``, ``v``; the TP-local tensor holds whole KV
    groups, each as ``[q (its heads), k, v]`` rows (Megatron's interleaved layout).

    Sizes carry megatron-core's names: ``num_attention_heads``, ``num_query_groups`` (KV heads) and
    ``kv_channels`` (the head dimension). ``parts``: the component suffixes (default ``q, k, v``).
    """

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    parts: tuple[str, str, str] = ("q", "k", "v")
    kind: ClassVar[str] = "qkv"

    def __post_init__(self) -> None:
        if len(self.parts) != 3:
            raise ValueError(f"{self.megatron}: a QKV mapping has three parts (q, k, v), not {self.parts!r}")
        super().__post_init__()

    def part_rows(self) -> tuple[tuple[str, int], ...]:
        q, k, v = self.parts
        kv = self.num_query_groups * self.kv_channels
        return ((q, self.num_attention_heads * self.kv_channels), (k, kv), (v, kv))

    @property
    def row_parts(self) -> tuple[tuple[str, int], ...]:
        return ()  # rows are interleaved per KV group, not chunked per part

    def check_tensor_parallel(self, tp_size: int) -> None:
        ParamMapping.check_tensor_parallel(self, tp_size)
        _div(self.num_query_groups, tp_size, f"{self.megatron}: KV groups")

    def _grouped(self, t: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
        """``t`` (local rows of ``groups`` KV groups) -> its q, k, v rows, each ``[groups, rows/group, ...]``."""
        d, rep = self.kv_channels, self.num_attention_heads // self.num_query_groups
        s = t.reshape(groups, (rep + 2) * d, *t.shape[1:])
        return tuple(s.split([rep * d, d, d], dim=1))

    def components_to_local(self, comps: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> torch.Tensor:
        import torch

        ParamMapping.check_tensor_parallel(self, tp_size)
        kv, d = self.num_query_groups, self.kv_channels
        g = _div(kv, tp_size, f"{self.megatron}: KV groups")
        sl = slice(tp_rank * g, (tp_rank + 1) * g)
        q, k, v = (self.need(comps, c) for c in self.components)
        q = q.reshape(kv, (self.num_attention_heads // kv) * d, *q.shape[1:])[sl]
        k = k.reshape(kv, d, *k.shape[1:])[sl]
        v = v.reshape(kv, d, *v.shape[1:])[sl]
        return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])

    def local_to_components(self, shards: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        groups = self.num_query_groups // len(shards)
        per_rank = [self._grouped(s, groups) for s in shards]
        return {c: torch.cat([p[i].reshape(-1, *p[i].shape[2:]) for p in per_rank])
                for i, c in enumerate(self.components)}

    def local_components(self, local: torch.Tensor, tp_size: int, tp_rank: int) -> list[LocalComponent]:
        tail = tuple(local.shape[1:])
        ts = [t.reshape(-1, *tail) for t in self._grouped(local, self.num_query_groups // tp_size)]
        return [LocalComponent(c, t, 0, n) for c, t, (_, n) in zip(self.components, ts, self.part_rows(), strict=True)]

    def assemble_local(self, parts: Mapping[str, torch.Tensor], target: torch.Tensor, tp_size: int,
                       tp_rank: int) -> None:
        import torch

        d, groups = self.kv_channels, self.num_query_groups // tp_size
        rep = self.num_attention_heads // self.num_query_groups
        tail = tuple(target.shape[1:])
        q, k, v = (self.need(parts, c) for c in self.components)
        fused = torch.cat([q.reshape(groups, rep * d, *tail), k.reshape(groups, d, *tail),
                           v.reshape(groups, d, *tail)], dim=1)
        target.copy_(fused.reshape(target.shape))


def _need(d: Mapping[str, torch.Tensor], key: str, owner: str) -> torch.Tensor:
    try:
        return d[key]
    except KeyError:
        raise KeyError(f"{key!r} is needed for {owner!r} but is missing") from None


def _div(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}: {n} is not divisible by tensor_model_parallel_size={tp}")
    return n // tp


def _chunk(t: torch.Tensor, dim: int, tp: int, what: str) -> Any:
    _div(t.shape[dim], tp, f"{what} dim {dim}")
    return t.chunk(tp, dim=dim)


# ------------------------------------------------------------------------------ whole-table API
def hf_to_components(table: Iterable[ParamMapping], hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors -> components (all mappings; raises naming the first missing HF key)."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.hf_to_components(hf))
    return out


def components_to_hf(table: Iterable[ParamMapping], comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Components -> HF tensors (carried extras are not included; copy them from the source)."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.components_to_hf(comps))
    return out


def components_to_local(
    table: Iterable[ParamMapping], comps: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int
) -> dict[str, torch.Tensor]:
    """Components -> the TP-local parameters of rank ``tp_rank`` (keyed like ``named_parameters()``)."""
    return {m.megatron: m.components_to_local(comps, tp_size, tp_rank) for m in table}


def local_to_components(
    table: Iterable[ParamMapping], shards_by_rank: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """TP-local parameters of every rank (in rank order) -> components."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.local_to_components([s[m.megatron] for s in shards_by_rank]))
    return out


def classify_hf_keys(table: Iterable[ParamMapping], hf_keys: Iterable[str],
                     carried: Iterable[str] = ()) -> tuple[set[str], set[str], set[str]]:
    """Split checkpoint keys into (mapped, carried, unknown); ``carried``: the bridge's carried HF keys."""
    mapped_all = {k for m in table for k in m.hf}
    keys = set(hf_keys)
    kept = keys & set(carried)
    mapped = keys & mapped_all
    return mapped, kept, keys - mapped - kept


def by_megatron_name(table: Iterable[ParamMapping]) -> dict[str, ParamMapping]:
    return {m.megatron: m for m in table}


def component_owner(table: Iterable[ParamMapping]) -> dict[str, ParamMapping]:
    """Component key -> its mapping (to find e.g. which parameter ``...linear_qkv.weight.q`` belongs to)."""
    return {c: m for m in table for c in m.components}


# ---------------------------------------------------------------------- training checkpoint layout
def checkpoint_entries(table: Mapping[str, ParamMapping], name: str, local: torch.Tensor, *, tp_group: Any,
                       tp_rank: int, tp_size: int) -> dict[str, Any] | None:
    """This rank's checkpoint entries for parameter ``name`` (or a tensor laid out like it).

    Each TP rank contributes *its* rows of each component (:meth:`ParamMapping.local_components`) as
    a DTensor ``Shard(dim)`` (:func:`nvlcore.checkpoint.shard_tensor`), so nothing is gathered and a
    checkpoint saved at one TP size loads at any other; a component every rank holds whole is stored
    as a plain tensor. ``None`` when ``name`` is not in the table (adapters: the trainer's generic
    layout applies).
    """
    m = table.get(name)
    if m is None:
        return None
    from nvlcore.checkpoint import shard_tensor

    out: dict[str, Any] = {}
    for key, part, dim, size in m.local_components(local, tp_size, tp_rank):
        part = part if part.is_contiguous() else part.contiguous()
        if dim is None or tp_size == 1:
            out[key] = part
        else:
            out[key] = shard_tensor(part, dim, tp_group, global_size=size)
    return out


def assemble_from_entries(table: Mapping[str, ParamMapping], name: str, entries: Mapping[str, torch.Tensor],
                          target: torch.Tensor, *, tp_rank: int, tp_size: int) -> bool:
    """Write this rank's loaded parts (local tensors keyed as :func:`checkpoint_entries` made them) into
    ``target``; False when ``name`` is not in the table."""
    import torch

    m = table.get(name)
    if m is None:
        return False
    with torch.no_grad():
        m.assemble_local(entries, target, tp_size, tp_rank)
    return True


# -------------------------------------------------------------------------------- linear layers
@runtime_checkable
class NormFusedLinear(Protocol):
    """A linear layer that normalises its own input with its ``layer_norm_weight`` (Megatron's
    ``TELayerNormColumnParallelLinear``). Adapter methods feed their adapter the normalised input,
    which such a layer returns from ``normalize``."""

    layer_norm_weight: Any

    def normalize(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class LinearLayout:
    """What the mapping table says about one linear layer of the model (for adapter methods).

    :param norm_fused: the layer holds a ``layer_norm_weight`` in the table and normalises its input
        (it is a :class:`NormFusedLinear`).
    :param row_parts: a fused column-parallel layer's rows as ``((part, full rows), ...)`` (each
        part split over TP, the rank's parts concatenated), or ``()`` for plain rows.
    """

    norm_fused: bool = False
    row_parts: tuple[tuple[str, int], ...] = ()


def linear_layouts(table: Iterable[ParamMapping]) -> dict[str, LinearLayout]:
    """Module name -> :class:`LinearLayout` for every ``<module>.weight`` of the table."""
    table = list(table)
    names = {m.megatron for m in table}
    out: dict[str, LinearLayout] = {}
    for m in table:
        if not m.megatron.endswith(".weight"):
            continue
        module = m.megatron[: -len(".weight")]
        out[module] = LinearLayout(norm_fused=f"{module}.layer_norm_weight" in names, row_parts=m.row_parts)
    return out
