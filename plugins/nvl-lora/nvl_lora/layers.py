"""LoRA adapters on plain and tensor-parallel linear layers.

An adapted layer computes ``y = base(x) + (alpha/r) * B(A(dropout(x_n)))`` where ``x_n`` is the
layer's input, or for a norm-fused linear (a parallel linear that also holds ``layer_norm_weight``
and normalises its own input) the normalised input, as Megatron-Bridge's adapters on
``TELayerNormColumnParallelLinear`` consume the LayerNorm output.

The base module is not replaced: the adapter becomes its child ``adapter`` (``adapter.linear_in``
holds A ``[r, in]``, ``adapter.linear_out`` holds B ``[out, r]``) and a forward hook adds the adapter's
output. Parameter names of the base stay as they were (``...linear_qkv.weight``), so base checkpoints
and the weight mapping keep working, and adapter parameters are ``...linear_qkv.adapter.linear_in.weight``
and ``...linear_qkv.adapter.linear_out.weight``.

Tensor parallelism: each adapter follows its base layer's split so that the adapter's output at any
TP size equals the TP=1 adapter's.

* ``ColumnParallelLinear`` base (output rows split): A is replicated (full input -> r); B is split by
  rows like the base weight (r -> out/tp). The rank-r activation goes through Megatron's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) so A receives the
  full gradient on every rank.
* ``RowParallelLinear`` base (input columns split): A is split by columns like the base weight
  (in/tp -> r) and its partial products are summed with ``reduce_from_tensor_model_parallel_region``;
  B is replicated (r -> out).
* ``torch.nn.Linear``: plain, unsplit.

Replicated adapter tensors receive identical gradients on every TP rank (their inputs and output
gradients are replicated), so they stay equal without extra communication; split ones carry
Megatron's ``tensor_model_parallel``/``partition_dim`` attributes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from nvl_lora.config import LoRAConfig
    from nvlcore.mapping import LinearLayout

#: The method a norm-fused linear exposes to return its normalised input (:class:`nvlcore.mapping.NormFusedLinear`).
NORM_METHOD = "normalize"

ADAPTER_ATTR = "adapter"
_HOOK_ATTR = "_nvl_lora_hook"


class Weight(nn.Module):
    """Holds one adapter matrix as ``.weight`` (not an ``nn.Linear``, so target matching never adapts
    an adapter).

    With ``components`` the rows are held as one parameter per component (``weight.z``, ``weight.x``,
    ...; each this rank's rows of that component) and :meth:`matrix` concatenates them in the base's
    local row order. A fused layer whose TP-local rows are ``[z_r | x_r | B_r | C_r | dt_r]`` (Mamba
    ``in_proj``) needs this so that every stored tensor is a plain TP split of a logical one.
    """

    def __init__(self, weight: torch.Tensor, components: list[tuple[str, int]] | None = None) -> None:
        super().__init__()
        self.components = [c for c, _ in components] if components else None
        if components:
            parts = weight.split([n for _, n in components], dim=0)
            self.weight = nn.ParameterDict({c: nn.Parameter(t.contiguous()) for (c, _),
                                            t in zip(components, parts, strict=True)})
        else:
            self.weight = nn.Parameter(weight)

    def matrix(self) -> torch.Tensor:
        if self.components is None:
            return self.weight
        return torch.cat([self.weight[c] for c in self.components], dim=0)

    def params(self) -> list[tuple[str, nn.Parameter]]:
        """``(name relative to this module, parameter)`` in order."""
        if self.components is None:
            return [("weight", self.weight)]
        return [(f"weight.{c}", self.weight[c]) for c in self.components]


def _megatron_mappings() -> Any:
    from megatron.core.tensor_parallel import mappings

    return mappings


def _tp_info(module: nn.Module) -> tuple[Any, int, int]:
    group = getattr(module, "tp_group", None)
    if group is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return group, 1, 0
    return group, torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


def base_kind(module: nn.Module) -> str | None:
    """``"column"``, ``"row"``, ``"plain"`` for a layer LoRA can adapt, else ``None``."""
    try:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:  # pragma: no cover - megatron is a dependency; plain layers still work
        ColumnParallelLinear = RowParallelLinear = ()  # type: ignore[assignment,misc]
    if ColumnParallelLinear and isinstance(module, ColumnParallelLinear):
        return "column"
    if RowParallelLinear and isinstance(module, RowParallelLinear):
        return "row"
    if isinstance(module, nn.Linear):
        return "plain"
    return None


def row_components_of(module: nn.Module, layout: LinearLayout | None) -> list[tuple[str, int]] | None:
    """Logical row parts of a fused column-parallel layer, ``[(part, full_rows), ...]``, or ``None``.

    Declared by the model bridge's mapping table (:attr:`nvlcore.mapping.LinearLayout.row_parts`: a
    ``parts`` mapping such as Mamba's ``in_proj`` rows ``[z | x | B | C | dt]``). A model used
    without a bridge may declare them on the module as ``row_parts`` (same pairs).
    """
    parts = layout.row_parts if layout is not None else getattr(module, "row_parts", None)
    return [(str(c), int(n)) for c, n in parts] if parts else None


def norm_fn_of(module: nn.Module, name: str,
               layout: LinearLayout | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The callable giving a norm-fused linear's normalised input (its ``normalize``), ``None`` for a plain linear.

    Norm-fused: the bridge's layout says so (its ``layer_norm_weight`` is in the mapping table), or,
    without a bridge, the module holds a ``layer_norm_weight``.
    """
    fused = layout.norm_fused if layout is not None else getattr(module, "layer_norm_weight", None) is not None
    if not fused:
        return None
    fn = getattr(module, NORM_METHOD, None)
    if callable(fn) and not isinstance(fn, nn.Parameter):
        return fn
    raise TypeError(
        f"{name} ({type(module).__name__}) normalises its input with layer_norm_weight, so its adapter must see "
        f"the normalised input, but it has no {NORM_METHOD}(x) method returning it "
        "(nvlcore.mapping.NormFusedLinear); give the norm-fused linear that method"
    )


def _seeded_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def init_lora_a(rank: int, in_features: int, method: str, gen: torch.Generator) -> torch.Tensor:
    """A ``[rank, in_features]`` in fp32 on CPU, drawn from ``gen``."""
    if method == "xavier":  # torch.nn.init.xavier_uniform_: fan_in=in, fan_out=rank
        bound = math.sqrt(6.0 / (in_features + rank))
    elif method == "kaiming":  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft: bound = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(in_features)
    else:
        raise ValueError(f"unknown lora_A_init_method {method!r}")
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound


class LoRAVariant:
    """How an adapter's low-rank path joins its base layer; plain LoRA adds ``s·B·A x`` to the output.

    The counterpart of peft's ``LoraVariant``: a variant (DoRA: :class:`nvl_lora.dora.DoRAVariant`) changes
    what the adapted layer computes and how it merges, while :class:`LoRAAdapter` keeps A, B, their TP
    splits and the forward of ``s·B·A x``. A variant is stateless; what it learns lives on the adapter
    (created in :meth:`init`, listed by :meth:`params`), so state dicts, TP gathering and checkpoints see
    one module. Every method receives the adapter; the layer's forward hook and :func:`merge_adapter`
    call :meth:`output` and :meth:`merged_weight`.
    """

    #: Shown in the adapter's repr and in messages.
    name = "lora"

    def check(self, adapter: LoRAAdapter) -> None:
        """Refuse adapter settings the variant cannot honour (called at the end of the adapter's ``__init__``)."""

    def init(self, adapter: LoRAAdapter, weight: torch.Tensor) -> None:
        """Create the variant's parameters on ``adapter`` from the base layer's local ``weight`` (after A and B)."""

    def params(self, adapter: LoRAAdapter) -> list[tuple[str, nn.Parameter, int | None]]:
        """The variant's parameters as :meth:`LoRAAdapter.split_params` lists them (name, tensor, TP split dim)."""
        return []

    def full_shape(self, adapter: LoRAAdapter, rel_name: str) -> tuple[int, int] | None:
        """The logical shape of one of :meth:`params` (``None``: not the variant's)."""
        return None

    def output(self, module: nn.Module, adapter: LoRAAdapter, output: Any, delta: torch.Tensor) -> Any:
        """The adapted layer's output from the base's ``output`` and the adapter's ``delta = s·B·A x``."""
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    def merged_weight(self, adapter: LoRAAdapter, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base's local weight with the adapter folded in, fp32 (``delta``: ``s·B·A``, fp32)."""
        return weight.float() + delta

    def train(self, adapter: LoRAAdapter, mode: bool) -> None:
        """Called when the adapter changes mode (a variant that caches in eval mode drops its cache)."""


#: Plain LoRA (the default variant).
LORA = LoRAVariant()


class LoRAAdapter(nn.Module):
    """``(alpha/r) * B @ A`` for one base layer, split like the base (see the module docstring).

    :param kind: the base's layout: ``"column"``, ``"row"`` or ``"plain"``.
    :param in_features: the base's logical (full) input size.
    :param out_features: the base's logical (full) output size.
    :param lora_a: the full logical A ``[rank, in_features]`` (sliced here for a row base).
    :param lora_b: the full logical B ``[out_features, rank]`` (sliced here for a column base).
    :param variant: what the adapted layer computes with ``s·B·A`` (default :data:`LORA`: adds it).
    """

    def __init__(
        self,
        *,
        kind: str,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        tp_group: Any = None,
        tp_size: int = 1,
        tp_rank: int = 0,
        input_is_parallel: bool = True,
        gather_output: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        row_components: list[tuple[str, int]] | None = None,
        variant: LoRAVariant | None = None,
    ) -> None:
        super().__init__()
        self.variant = variant or LORA
        self.kind = kind
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = float(alpha) / rank
        self.tp_group = tp_group
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.input_is_parallel = input_is_parallel
        self.gather_output = gather_output
        a, b = lora_a, lora_b
        if row_components is not None and kind != "column":
            raise ValueError("row components apply to a column-parallel (or plain) base only")
        if row_components is not None and sum(n for _, n in row_components) != out_features:
            raise ValueError(f"row components {row_components} do not sum to the {out_features} output rows")
        local_components = None
        if kind == "row" and tp_size > 1:
            a = a.chunk(tp_size, dim=1)[tp_rank]
        if kind == "column" and row_components is not None:
            bad = [c for c, n in row_components if n % tp_size]
            if bad:
                raise ValueError(f"row components {bad} do not split over TP={tp_size}")
            parts = b.split([n for _, n in row_components], dim=0)
            b = torch.cat([t.chunk(tp_size, dim=0)[tp_rank] for t in parts], dim=0)
            local_components = [(c, n // tp_size) for c, n in row_components]
        elif kind == "column" and tp_size > 1:
            b = b.chunk(tp_size, dim=0)[tp_rank]
        self.row_components = row_components
        self.linear_in = Weight(a.to(dtype=dtype, device=device).contiguous())
        self.linear_out = Weight(b.to(dtype=dtype, device=device).contiguous(), local_components)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._mark_tp_attributes()
        self.variant.check(self)

    def _mark_tp_attributes(self) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        for _, p, dim in self.lora_params():  # the variant marks its own in LoRAVariant.init
            if dim is not None:
                set_tensor_model_parallel_attributes(p, True, dim, 1)

    def split_params(self) -> list[tuple[str, nn.Parameter, int | None]]:
        """``(name relative to the adapter, parameter, TP split dim or None if replicated)``.

        Names: ``linear_in.weight``, ``linear_out.weight`` (or ``linear_out.weight.<component>``), then the
        variant's (:meth:`LoRAVariant.params`).
        """
        return self.lora_params() + self.variant.params(self)

    def lora_params(self) -> list[tuple[str, nn.Parameter, int | None]]:
        """A and B alone, as :meth:`split_params` lists them."""
        a_dim = 1 if self.kind == "row" else None
        b_dim = 0 if self.kind == "column" else None
        out = [(f"linear_in.{n}", p, a_dim) for n, p in self.linear_in.params()]
        out += [(f"linear_out.{n}", p, b_dim) for n, p in self.linear_out.params()]
        return out

    @property
    def split_dims(self) -> dict[str, int | None]:
        """Which dimension of each adapter tensor is split over TP (``None``: replicated)."""
        return {n: d for n, _, d in self.split_params()}

    def full_shape(self, rel_name: str) -> tuple[int, int]:
        """The logical shape of one adapter tensor (``rel_name`` as in :meth:`split_params`)."""
        own = self.variant.full_shape(self, rel_name)
        if own is not None:
            return own
        if rel_name.startswith("linear_in"):
            return (self.rank, self.in_features)
        comp = rel_name.split(".")[-1] if rel_name.count(".") == 2 else None
        if comp is not None and self.row_components:
            return (dict(self.row_components)[comp], self.rank)
        return (self.out_features, self.rank)

    def delta_weight(self) -> torch.Tensor:
        """This rank's ``scale * B @ A`` in fp32, shaped like the base's local weight."""
        return self.scale * (self.linear_out.matrix().float() @ self.linear_in.matrix().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.linear_in.matrix(), self.linear_out.matrix()
        x = self.dropout(x)
        if self.kind == "row" and self.tp_size > 1:
            mp = _megatron_mappings()
            if not self.input_is_parallel:
                x = mp.scatter_to_tensor_model_parallel_region(x, group=self.tp_group)
            h = mp.reduce_from_tensor_model_parallel_region(F.linear(_as_input(x, a), a), group=self.tp_group)
        else:
            h = F.linear(_as_input(x, a), a)
        h = h * self.scale
        if self.kind == "column" and self.tp_size > 1:
            mp = _megatron_mappings()
            h = mp.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            y = F.linear(h, b)
            if self.gather_output:
                y = mp.gather_from_tensor_model_parallel_region(y, group=self.tp_group)
            return y
        return F.linear(h, b)

    def train(self, mode: bool = True) -> LoRAAdapter:
        self.variant.train(self, mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return ("" if self.variant is LORA else f"{self.variant.name}, ") + (
            f"kind={self.kind}, in={self.in_features}, out={self.out_features}, r={self.rank}, "
            f"alpha={self.alpha:g}, tp={self.tp_size}"
        )


def _as_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` ready for ``F.linear(x, weight)``: in the weight's dtype, except under autocast, where the
    matmul runs in the autocast dtype anyway; casting a bf16 activation up to the fp32 adapter there
    would cost two full-size copies each way (and a saved copy) for a result that is the same bit for bit."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def _lora_forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if args:
        x = args[0]
    else:
        x = next((kwargs[k] for k in ("input_", "input", "x", "hidden_states") if k in kwargs), None)
        if x is None:
            raise TypeError(f"LoRA on {type(module).__name__}: cannot find the input among {list(kwargs)}")
    norm = module.__dict__.get("_nvl_lora_norm")
    if norm is not None:
        # the normalised input the base just computed (see _keep_normalised), else compute it
        cached = module.__dict__.pop("_nvl_lora_xn", None)
        x = cached if cached is not None else norm(x)
    adapter = getattr(module, ADAPTER_ATTR)
    return adapter.variant.output(module, adapter, output, adapter(x))


def is_adapted(module: nn.Module) -> bool:
    return isinstance(getattr(module, ADAPTER_ATTR, None), LoRAAdapter)


def add_adapter(
    module: nn.Module, name: str, cfg: LoRAConfig, layout: LinearLayout | None = None, *,
    variant: LoRAVariant | None = None,
) -> LoRAAdapter:
    """Attach a fresh adapter to the linear ``module`` (called ``name`` in its model; ``layout``: what
    the model bridge's mapping table says about it, see :func:`row_components_of` and
    :func:`norm_fn_of`); ``variant``: what the layer computes with it (default plain LoRA), whose
    :meth:`LoRAVariant.init` then creates its own parameters from the base weight."""
    kind = base_kind(module)
    if kind is None:
        raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer LoRA can adapt")
    if is_adapted(module):
        raise ValueError(f"{name} already has a LoRA adapter")
    group, tp_size, tp_rank = _tp_info(module) if kind != "plain" else (None, 1, 0)
    if kind == "column":
        in_f, out_f = int(module.input_size), int(module.output_size)
        if getattr(module, "sequence_parallel", False) and tp_size > 1:
            raise NotImplementedError(f"{name}: LoRA with sequence parallelism is not supported")
    elif kind == "row":
        in_f, out_f = int(module.input_size), int(module.output_size)
        if getattr(module, "sequence_parallel", False) and tp_size > 1:
            raise NotImplementedError(f"{name}: LoRA with sequence parallelism is not supported")
    else:
        in_f, out_f = int(module.in_features), int(module.out_features)
    weight = module.weight
    a = init_lora_a(cfg.dim, in_f, cfg.lora_A_init_method, _seeded_generator(cfg.seed, name + ".A"))
    if cfg.lora_B_init_method == "zero":
        b = torch.zeros(out_f, cfg.dim)
    else:
        b = torch.randn(out_f, cfg.dim, generator=_seeded_generator(cfg.seed, name + ".B")) * 0.02
    adapter = LoRAAdapter(
        kind=kind,
        in_features=in_f,
        out_features=out_f,
        rank=cfg.dim,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        lora_a=a,
        lora_b=b,
        tp_group=group,
        tp_size=tp_size,
        tp_rank=tp_rank,
        input_is_parallel=bool(getattr(module, "input_is_parallel", True)),
        gather_output=bool(getattr(module, "gather_output", False)),
        dtype=cfg.torch_dtype or weight.dtype,
        device=weight.device,
        row_components=row_components_of(module, layout) if kind == "column" else None,
        variant=variant,
    )
    with torch.no_grad():
        adapter.variant.init(adapter, weight)
    norm = norm_fn_of(module, name, layout)
    module.add_module(ADAPTER_ATTR, adapter)
    # Stored in __dict__ (a bound method, not a submodule), read by the hook.
    module.__dict__["_nvl_lora_norm"] = norm
    if norm is not None:
        _keep_normalised(module, norm)
    module.__dict__[_HOOK_ATTR] = module.register_forward_hook(_lora_forward_hook, with_kwargs=True)
    return adapter


def split_like(rows: torch.Tensor, holder: Weight) -> list[torch.Tensor]:
    """Local per-row values in the order of ``holder``'s parameters (its components, or one)."""
    return list(rows.split([p.shape[0] for _, p in holder.params()]))


def _keep_normalised(module: nn.Module, norm: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make the base's own call of its norm method leave the result for the hook.

    A norm-fused linear normalises its input inside its forward; the adapter needs the same tensor.
    Shadowing the method on the instance lets the hook reuse it instead of normalising again, which
    would cost a second fp32 norm and keep a second copy of its activations for backward.
    """
    name = norm.__name__

    def normalise_and_keep(x: torch.Tensor) -> torch.Tensor:
        y = norm(x)
        module.__dict__["_nvl_lora_xn"] = y
        return y

    module.__dict__["_nvl_lora_norm_name"] = name
    setattr(module, name, normalise_and_keep)


def remove_adapter(module: nn.Module) -> LoRAAdapter:
    """Detach the adapter and its hook (the base is left as it is)."""
    adapter = getattr(module, ADAPTER_ATTR)
    handle = module.__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    shadowed = module.__dict__.pop("_nvl_lora_norm_name", None)
    if shadowed is not None:
        module.__dict__.pop(shadowed, None)
    module.__dict__.pop("_nvl_lora_xn", None)
    module.__dict__.pop("_nvl_lora_norm", None)
    delattr(module, ADAPTER_ATTR)
    return adapter


@torch.no_grad()
def merge_adapter(module: nn.Module) -> None:
    """Fold the adapter into the base's local weight (fp32, cast back; plain LoRA: ``+ scale * B @ A``, a
    variant: :meth:`LoRAVariant.merged_weight`) and remove the adapter.

    Both factors are local to the rank for either split (a column base has B's rows and the full A;
    a row base has A's columns and the full B), so no communication is needed.
    """
    adapter = getattr(module, ADAPTER_ATTR)
    w = module.weight
    delta = adapter.delta_weight().to(w.device)
    if delta.shape != w.shape:
        raise RuntimeError(f"adapter delta {tuple(delta.shape)} does not match base weight {tuple(w.shape)}")
    w.copy_(adapter.variant.merged_weight(adapter, w, delta).to(w.dtype))
    remove_adapter(module)
