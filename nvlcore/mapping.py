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
  ``.x`` ... for a ``parts`` parameter). A checkpoint of components loads at any TP size.
* **TP-local parameters**: what rank ``r`` of ``tp`` holds in ``model.named_parameters()``.

==============  ===========================================================  ===============================
kind            HF  <->  components                                          components -> TP-local
==============  ===========================================================  ===============================
``identity``    same tensor                                                  chunk ``tp_dim`` (or whole)
``vocab``       same tensor (``[vocab, ...]``)                               pad rows to a multiple of tp
                                                                             with zeros, chunk dim 0
``qkv``         three HF tensors (``q``, ``k``, ``v``) one to one, or one    per KV group ``[q(its heads),
                fused tensor of rows ``[Q; K; V]``; ``sizes`` =              k, v]``; each rank gets whole
                ``(heads, kv_heads, head_dim)``                              groups
``parts``       one HF tensor of rows ``[p0 | p1 | ...]`` (``sizes``: the    ``[p0_r | p1_r | ...]``: each
                rows of each part, ``parts``: their names), or one HF        part chunked over TP
                tensor per part
==============  ===========================================================  ===============================

All transforms are pure tensor reshapes/concatenations (they also run on ``meta`` tensors, which
``nvl convert`` uses to plan without reading data), and each inverse is exact.

:class:`LinearLayout` is what the table says about a linear layer for adapter methods: whether it
normalises its own input (its ``layer_norm_weight`` is in the table; such a layer exposes
``normalize(x)``, see :class:`NormFusedLinear`) and the named row parts of a fused layer.

Importing this module is cheap (torch is imported inside functions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

#: Every transform kind a :class:`ParamMapping` may have.
KINDS = ("identity", "vocab", "qkv", "parts")

#: Checkpoint key prefix of HF tensors with no training parameter (carried losslessly through ``nvl convert``).
CARRY_PREFIX = "hf_only."


@dataclass(frozen=True)
class ParamMapping:
    """How one training parameter relates to HF keys and to its checkpoint components.

    :param megatron: the training parameter's name (as in ``model.named_parameters()``).
    :param hf: its HF keys.
    :param kind: one of :data:`KINDS` (see the module docstring).
    :param tp_dim: the dimension tensor parallelism splits (``identity``); 0 for ``vocab``, ``qkv``
        and ``parts``; ``None``: replicated.
    :param sizes: ``qkv``: ``(heads, kv_heads, head_dim)``; ``parts``: the full row count of each part
        in order; ``vocab``: ``(vocab_size,)``.
    :param tp_units: counts TP must divide for the split to be meaningful (a part split may not cut a
        group in half even when the row count happens to divide), as ``(config field, value)``; the
        error names the field.
    :param parts: ``parts``: the name of each part (component key suffixes); ``qkv``: defaults to
        ``("q", "k", "v")``.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str = "identity"
    tp_dim: int | None = None
    sizes: tuple[int, ...] = ()
    tp_units: tuple[tuple[str, int], ...] = ()
    parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.megatron}: unknown mapping kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind == "qkv" and len(self.sizes) != 3:
            raise ValueError(f"{self.megatron}: a qkv mapping needs sizes=(heads, kv_heads, head_dim)")
        if self.kind == "parts" and (not self.parts or len(self.parts) != len(self.sizes)):
            raise ValueError(f"{self.megatron}: a parts mapping needs one name in parts per row count in sizes")
        n = len(self.components)
        if self.kind in ("qkv", "parts") and len(self.hf) not in (1, n):
            raise ValueError(f"{self.megatron}: {len(self.hf)} HF keys for {n} component(s); give 1 (fused) or {n}")

    # -------------------------------------------------------------------------------- names
    @property
    def components(self) -> tuple[str, ...]:
        """Checkpoint keys of this parameter's logical parts."""
        if self.kind == "qkv":
            names = self.parts or ("q", "k", "v")
        elif self.kind == "parts":
            names = self.parts
        else:
            return (self.megatron,)
        return tuple(f"{self.megatron}.{p}" for p in names)

    def _fused_rows(self) -> list[int]:
        if self.kind == "qkv":
            heads, kv, d = self.sizes
            return [heads * d, kv * d, kv * d]
        return list(self.sizes)

    # ------------------------------------------------------------------------ HF <-> components
    def _one_to_one(self) -> bool:
        # identity/vocab: the first HF key is the tensor (an adapter's A mirrors its base's several keys)
        return self.kind in ("identity", "vocab") or len(self.hf) == len(self.components)

    def hf_to_components(self, hf: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        ts = [_need(hf, k, self.megatron) for k in self.hf]
        if self._one_to_one():
            return dict(zip(self.components, ts))
        (t,) = ts
        rows = self._fused_rows()
        if t.shape[0] != sum(rows):
            raise ValueError(f"{self.hf[0]}: {t.shape[0]} rows, expected {sum(rows)} ({self.kind} parts {rows})")
        return dict(zip(self.components, t.split(rows, dim=0)))

    def components_to_hf(self, comps: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        import torch

        ts = [_need(comps, k, self.megatron) for k in self.components]
        if self._one_to_one():
            return dict(zip(self.hf, ts))
        return {self.hf[0]: torch.cat(ts, dim=0)}

    # ------------------------------------------------------------------ components <-> TP-local
    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ``ValueError`` naming what ``tp_size`` does not divide (the declared units, KV groups, parts)."""
        for field, n in self.tp_units:
            _div(n, tp_size, f"{self.megatron}: {field}")
        if self.kind == "qkv":
            _div(self.sizes[1], tp_size, f"{self.megatron}: KV groups")
        elif self.kind == "parts":
            for name, n in zip(self.parts, self.sizes):
                _div(n, tp_size, f"{self.megatron}: part {name}")

    def components_to_local(self, comps: Mapping[str, "torch.Tensor"], tp_size: int, tp_rank: int) -> "torch.Tensor":
        import torch

        for field, n in self.tp_units:
            _div(n, tp_size, f"{self.megatron}: {field}")
        ts = [_need(comps, k, self.megatron) for k in self.components]
        if self.kind == "identity":
            (t,) = ts
            return t if self.tp_dim is None else _chunk(t, self.tp_dim, tp_size, self.megatron)[tp_rank]
        if self.kind == "vocab":
            (t,) = ts
            pad = (-t.shape[0]) % tp_size
            if pad:
                t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))], dim=0)
            return t.chunk(tp_size, dim=0)[tp_rank]
        if self.kind == "qkv":
            heads, kv, d = self.sizes
            q, k, v = ts
            g = _div(kv, tp_size, f"{self.megatron}: KV groups")
            sl = slice(tp_rank * g, (tp_rank + 1) * g)
            q = q.reshape(kv, (heads // kv) * d, *q.shape[1:])[sl]
            k = k.reshape(kv, d, *k.shape[1:])[sl]
            v = v.reshape(kv, d, *v.shape[1:])[sl]
            return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])
        # parts: each part split over ranks, the rank's parts concatenated
        return torch.cat([_chunk(t, 0, tp_size, self.megatron)[tp_rank] for t in ts], dim=0)

    def local_to_components(self, shards: Sequence["torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """Inverse of :meth:`components_to_local`, from the local tensors of all ranks in rank order."""
        import torch

        tp_size = len(shards)
        if self.kind == "identity":
            full = shards[0] if self.tp_dim is None else torch.cat(list(shards), dim=self.tp_dim)
            return {self.megatron: full}
        if self.kind == "vocab":
            (vocab,) = self.sizes
            return {self.megatron: torch.cat(list(shards), dim=0)[:vocab]}
        if self.kind == "qkv":
            heads, kv, d = self.sizes
            rep = heads // kv
            qs, ks, vs = [], [], []
            for s in shards:
                s = s.reshape(kv // tp_size, (rep + 2) * d, *s.shape[1:])
                q, k, v = s.split([rep * d, d, d], dim=1)
                qs.append(q.reshape(-1, *s.shape[2:]))
                ks.append(k.reshape(-1, *s.shape[2:]))
                vs.append(v.reshape(-1, *s.shape[2:]))
            return dict(zip(self.components, (torch.cat(qs), torch.cat(ks), torch.cat(vs))))
        local_sizes = [_div(n, tp_size, f"{self.megatron} part") for n in self.sizes]
        parts = [s.split(local_sizes, dim=0) for s in shards]
        return {name: torch.cat([p[i] for p in parts], dim=0) for i, name in enumerate(self.components)}


def _need(d: Mapping[str, "torch.Tensor"], key: str, owner: str) -> "torch.Tensor":
    try:
        return d[key]
    except KeyError:
        raise KeyError(f"{key!r} is needed for {owner!r} but is missing") from None


def _div(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}: {n} is not divisible by tensor_model_parallel_size={tp}")
    return n // tp


def _chunk(t: "torch.Tensor", dim: int, tp: int, what: str) -> Any:
    _div(t.shape[dim], tp, f"{what} dim {dim}")
    return t.chunk(tp, dim=dim)


# ------------------------------------------------------------------------------ whole-table API
def hf_to_components(table: Iterable[ParamMapping], hf: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """HF tensors -> components (all mappings; raises naming the first missing HF key)."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.hf_to_components(hf))
    return out


def components_to_hf(table: Iterable[ParamMapping], comps: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Components -> HF tensors (carried extras are not included; copy them from the source)."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.components_to_hf(comps))
    return out


def components_to_local(
    table: Iterable[ParamMapping], comps: Mapping[str, "torch.Tensor"], tp_size: int, tp_rank: int
) -> dict[str, "torch.Tensor"]:
    """Components -> the TP-local parameters of rank ``tp_rank`` (keyed like ``named_parameters()``)."""
    return {m.megatron: m.components_to_local(comps, tp_size, tp_rank) for m in table}


def local_to_components(
    table: Iterable[ParamMapping], shards_by_rank: Sequence[Mapping[str, "torch.Tensor"]]
) -> dict[str, "torch.Tensor"]:
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
def _split_local(m: ParamMapping, local: "torch.Tensor", tp_size: int) -> list[tuple[str, "torch.Tensor", int | None, int | None]]:
    """``(component key, this rank's part, shard dim or None, logical size along it)`` for one parameter."""
    if m.kind == "identity":
        if m.tp_dim is None or tp_size == 1:
            return [(m.megatron, local, None, None)]
        return [(m.megatron, local, m.tp_dim, local.shape[m.tp_dim] * tp_size)]
    if m.kind == "vocab":
        (vocab,) = m.sizes[:1]
        return [(m.megatron, local, 0, vocab)]
    if m.kind == "qkv":
        heads, kv, d = m.sizes[:3]
        rep = heads // kv
        groups = kv // tp_size
        s = local.reshape(groups, (rep + 2) * d, *local.shape[1:])
        q, k, v = s.split([rep * d, d, d], dim=1)
        parts = [q.reshape(-1, *local.shape[1:]), k.reshape(-1, *local.shape[1:]), v.reshape(-1, *local.shape[1:])]
        full = [heads * d, kv * d, kv * d]
        return [(c, t, 0, n) for c, t, n in zip(m.components, parts, full)]
    sizes = list(m.sizes)
    local_sizes = [n // tp_size for n in sizes]
    return [(c, t, 0, n) for c, t, n in zip(m.components, local.split(local_sizes, dim=0), sizes)]


def _vocab_rows(vocab: int, tp_size: int, tp_rank: int) -> int:
    """Real (unpadded) rows of this rank's vocabulary shard: torch.chunk's split of ``vocab`` rows."""
    per = -(-vocab // tp_size)
    return max(0, min(per, vocab - tp_rank * per))


def checkpoint_entries(table: Mapping[str, ParamMapping], name: str, local: "torch.Tensor", *, tp_group: Any,
                       tp_rank: int, tp_size: int) -> dict[str, Any] | None:
    """This rank's checkpoint entries for parameter ``name`` (or a tensor laid out like it).

    Each TP rank contributes *its* rows of each component as a DTensor ``Shard(dim)``
    (:func:`nvlcore.checkpoint.shard_tensor`), so nothing is gathered and a checkpoint saved at one
    TP size loads at any other: replicated parameters whole, ``vocab`` the unpadded rows, ``qkv``
    three shards (each rank holds whole KV groups), ``parts`` one shard per part. ``None`` when
    ``name`` is not in the table (adapters: the trainer's generic layout applies).
    """
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
        part = part if part.is_contiguous() else part.contiguous()
        if dim is None or tp_size == 1:
            out[key] = part
        else:
            out[key] = shard_tensor(part, dim, tp_group, global_size=size)
    return out


def assemble_from_entries(table: Mapping[str, ParamMapping], name: str, entries: Mapping[str, "torch.Tensor"],
                          target: "torch.Tensor", *, tp_rank: int, tp_size: int) -> bool:
    """Write this rank's loaded parts (local tensors keyed as :func:`checkpoint_entries` made them) into
    ``target``; False when ``name`` is not in the table."""
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
        elif m.kind == "qkv":
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


# -------------------------------------------------------------------------------- linear layers
@runtime_checkable
class NormFusedLinear(Protocol):
    """A linear layer that normalises its own input with its ``layer_norm_weight`` (Megatron's
    ``TELayerNormColumnParallelLinear``). Adapter methods feed their adapter the normalised input,
    which such a layer returns from ``normalize``."""

    layer_norm_weight: Any

    def normalize(self, x: "torch.Tensor") -> "torch.Tensor": ...


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
        parts = tuple(zip(m.parts, m.sizes)) if m.kind == "parts" else ()
        out[module] = LinearLayout(norm_fused=f"{module}.layer_norm_weight" in names, row_parts=parts)
    return out
