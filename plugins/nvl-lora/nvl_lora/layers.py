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
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from nvlcore.mapping import LinearLayout

    from nvl_lora.config import LoRAConfig

#: The method a norm-fused linear exposes to return its normalised input (:class:`nvlcore.mapping.NormFusedLinear`).
NORM_METHOD = "normalize"

ADAPTER_ATTR = "adapter"
_HOOK_ATTR = "_nvl_lora_hook"


class _Weight(nn.Module):
    """Holds one adapter matrix as ``.weight`` (not an ``nn.Linear``, so target matching never adapts
    an adapter).

    With ``components`` the rows are held as one parameter per component (``weight.z``, ``weight.x``,
    ...; each this rank's rows of that component) and :meth:`matrix` concatenates them in the base's
    local row order. A fused layer whose TP-local rows are ``[z_r | x_r | B_r | C_r | dt_r]`` (Mamba
    ``in_proj``) needs this so that every stored tensor is a plain TP split of a logical one.
    """

    def __init__(self, weight: torch.Tensor, components: "list[tuple[str, int]] | None" = None) -> None:
        super().__init__()
        self.components = [c for c, _ in components] if components else None
        if components:
            parts = weight.split([n for _, n in components], dim=0)
            self.weight = nn.ParameterDict({c: nn.Parameter(t.contiguous()) for (c, _), t in zip(components, parts)})
        else:
            self.weight = nn.Parameter(weight)

    def matrix(self) -> torch.Tensor:
        if self.components is None:
            return self.weight
        return torch.cat([self.weight[c] for c in self.components], dim=0)

    def params(self) -> "list[tuple[str, nn.Parameter]]":
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


def row_components_of(module: nn.Module, layout: "LinearLayout | None") -> list[tuple[str, int]] | None:
    """Logical row parts of a fused column-parallel layer, ``[(part, full_rows), ...]``, or ``None``.

    Declared by the model bridge's mapping table (:attr:`nvlcore.mapping.LinearLayout.row_parts`: a
    ``parts`` mapping such as Mamba's ``in_proj`` rows ``[z | x | B | C | dt]``). A model used
    without a bridge may declare them on the module as ``row_parts`` (same pairs).
    """
    parts = layout.row_parts if layout is not None else getattr(module, "row_parts", None)
    return [(str(c), int(n)) for c, n in parts] if parts else None


def norm_fn_of(module: nn.Module, name: str, layout: "LinearLayout | None") -> Callable[[torch.Tensor], torch.Tensor] | None:
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


class LoRAAdapter(nn.Module):
    """``(alpha/r) * B @ A`` for one base layer, split like the base (see the module docstring).

    :param kind: the base's layout: ``"column"``, ``"row"`` or ``"plain"``.
    :param in_features: the base's logical (full) input size.
    :param out_features: the base's logical (full) output size.
    :param lora_a: the full logical A ``[rank, in_features]`` (sliced here for a row base).
    :param lora_b: the full logical B ``[out_features, rank]`` (sliced here for a column base).
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
    ) -> None:
        super().__init__()
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
        self.linear_in = _Weight(a.to(dtype=dtype, device=device).contiguous())
        self.linear_out = _Weight(b.to(dtype=dtype, device=device).contiguous(), local_components)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._mark_tp_attributes()

    def _mark_tp_attributes(self) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        for name, p, dim in self.split_params():
            if dim is not None:
                set_tensor_model_parallel_attributes(p, True, dim, 1)

    def split_params(self) -> "list[tuple[str, nn.Parameter, int | None]]":
        """``(name relative to the adapter, parameter, TP split dim or None if replicated)``.

        Names: ``linear_in.weight``, ``linear_out.weight`` (or ``linear_out.weight.<component>``).
        """
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

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, in={self.in_features}, out={self.out_features}, r={self.rank}, "
            f"alpha={self.alpha:g}, tp={self.tp_size}"
        )


class DoRAAdapter(LoRAAdapter):
    """DoRA (weight-decomposed LoRA, Liu et al. 2024): LoRA's ``B @ A`` plus a magnitude per output row.

    The adapted layer computes ``y = m / ||W + s·B·A||_row ⊙ (W x + s·B·A x) + bias`` where the row norm
    is detached (no gradient flows through it, as in the paper §4.3, the ``peft`` library and
    Megatron-Bridge). At initialisation ``m = ||W + s·B·A||_row`` (= ``||W||`` with B = 0), so a fresh
    adapter leaves the layer unchanged. Merging gives ``W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A)``.

    ``magnitude`` (``adapter.magnitude.weight``, held as ``[out, 1]`` so that it takes the weight
    mapping's row layout exactly like B) is split like the base's output rows for a column-parallel
    base, per component for a fused one (Mamba ``in_proj``), and replicated for a row-parallel base.
    The row norm of a column-parallel base is local (each rank has whole rows); a row-parallel base
    splits each row over the TP ranks, so the squared norms are summed with an all-reduce over the
    TP group. In eval mode the local squared norms are cached until a weight changes (generation
    computes ``B·A`` once).
    """

    def __init__(self, *, magnitude: torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.kind == "column" and self.gather_output and self.tp_size > 1:
            raise NotImplementedError("DoRA on a column-parallel layer that gathers its output is not supported")
        if isinstance(self.dropout, nn.Dropout):
            raise ValueError("DoRA with dropout is not supported (the recipe uses peft.dropout=0.0); set peft.dropout=0")
        rows = self.linear_out.matrix().shape[0]
        ref = self.linear_out.matrix()
        init = magnitude if magnitude is not None else torch.ones(rows)
        local = None
        if self.linear_out.components is not None:
            local = [(c, self.linear_out.weight[c].shape[0]) for c in self.linear_out.components]
        self.magnitude = _Weight(init.reshape(rows, 1).to(dtype=ref.dtype, device=ref.device).contiguous(), local)
        if self.kind == "column" and self.tp_size > 1:
            from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

            for _, p in self.magnitude.params():
                set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.__dict__["_norm_cache"] = None

    def split_params(self) -> "list[tuple[str, nn.Parameter, int | None]]":
        """LoRA's tensors, then ``magnitude.weight`` (or ``magnitude.weight.<component>``)."""
        m_dim = 0 if self.kind == "column" else None
        if "magnitude" not in self._modules:  # during LoRAAdapter.__init__
            return super().split_params()
        return super().split_params() + [(f"magnitude.{n}", p, m_dim) for n, p in self.magnitude.params()]

    def full_shape(self, rel_name: str) -> tuple[int, int]:
        if rel_name.startswith("magnitude"):
            comp = rel_name.split(".")[-1] if rel_name.count(".") == 2 else None
            if comp is not None and self.row_components:
                return (dict(self.row_components)[comp], 1)
            return (self.out_features, 1)
        return super().full_shape(rel_name)

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s·B·A||`` per local output row, fp32, detached (all-reduced over TP for a row base).

        The local squared row sums are cached in eval mode (keyed on the tensors' versions); the
        all-reduce of a row-parallel base runs on every call, so every rank makes the same
        collectives whatever its cache holds.
        """
        params = [weight, *(p for _, p, _ in LoRAAdapter.split_params(self))]
        key = None
        squared = None
        if not self.training:
            try:
                key = tuple((p.data_ptr(), p._version) for p in params)
            except RuntimeError:  # inference tensors have no version counter: do not cache
                key = None
            cached = self.__dict__.get("_norm_cache")
            if key is not None and cached is not None and cached[0] == key:
                squared = cached[1]
        if squared is None:
            # .to(dtype), not .float(): a quantised base (QLoRA's NF4Tensor) dequantises only through .to
            combined = weight.to(torch.float32) + self.delta_weight().to(weight.device)
            squared = combined.square().sum(dim=1)
            self.__dict__["_norm_cache"] = (key, squared) if key is not None else None
        if self.kind == "row" and self.tp_size > 1:
            squared = squared.clone()
            torch.distributed.all_reduce(squared, group=self.tp_group)
        return squared.sqrt()

    def magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s·B·A||_row`` (fp32), the factor on each output row; differentiable in ``m``."""
        return self.magnitude.matrix()[:, 0].float() / self.weight_norm(weight)

    def train(self, mode: bool = True) -> "DoRAAdapter":
        self.__dict__["_norm_cache"] = None
        return super().train(mode)

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()


def _dora_output(module: nn.Module, adapter: DoRAAdapter, output: Any, delta: torch.Tensor) -> Any:
    """``m/||V|| ⊙ (W x + s·B·A x) + bias`` from the base's output (which may or may not include the bias)."""
    scale = adapter.magnitude_scale(module.weight)
    if isinstance(output, tuple):
        y, bias = output[0], output[1]
        if bias is None:  # the bias (if any) was added inside
            bias = getattr(module, "bias", None)
            out = _scaled(y, delta, scale, bias)
        else:  # skip_bias_add: the bias comes back separately and stays so
            out = _scaled(y, delta, scale, None)
        return (out, *output[1:])
    return _scaled(output, delta, scale, getattr(module, "bias", None))


def _scaled(y: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    base = y.float() if bias is None else y.float() - bias.float()
    out = scale * (base + delta.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(y.dtype)


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
    delta = adapter(x)
    if isinstance(adapter, DoRAAdapter):
        return _dora_output(module, adapter, output, delta)
    if isinstance(output, tuple):
        return (output[0] + delta.to(output[0].dtype), *output[1:])
    return output + delta.to(output.dtype)


def is_adapted(module: nn.Module) -> bool:
    return isinstance(getattr(module, ADAPTER_ATTR, None), LoRAAdapter)


def add_adapter(
    module: nn.Module, name: str, cfg: "LoRAConfig", layout: "LinearLayout | None" = None, *, dora: bool = False
) -> LoRAAdapter:
    """Attach a fresh adapter to the linear ``module`` (called ``name`` in its model; ``layout``: what
    the model bridge's mapping table says about it, see :func:`row_components_of` and
    :func:`norm_fn_of`); ``dora``: a :class:`DoRAAdapter` whose magnitude starts at the row norms of
    the adapted weight."""
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
    adapter = (DoRAAdapter if dora else LoRAAdapter)(
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
    )
    if dora:
        assert isinstance(adapter, DoRAAdapter)
        with torch.no_grad():
            init = adapter.weight_norm(weight)
            for (_, p), part in zip(adapter.magnitude.params(), _split_like(init, adapter.magnitude)):
                p.copy_(part.reshape(p.shape).to(p.dtype))
    norm = norm_fn_of(module, name, layout)
    module.add_module(ADAPTER_ATTR, adapter)
    # Stored in __dict__ (a bound method, not a submodule), read by the hook.
    module.__dict__["_nvl_lora_norm"] = norm
    if norm is not None:
        _keep_normalised(module, norm)
    module.__dict__[_HOOK_ATTR] = module.register_forward_hook(_lora_forward_hook, with_kwargs=True)
    return adapter


def _split_like(rows: torch.Tensor, holder: _Weight) -> list[torch.Tensor]:
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
    """Fold ``scale * B @ A`` into the base's local weight (fp32, cast back) and remove the adapter.

    Both factors are local to the rank for either split (a column base has B's rows and the full A;
    a row base has A's columns and the full B), so no communication is needed.
    """
    adapter = getattr(module, ADAPTER_ATTR)
    w = module.weight
    delta = adapter.delta_weight().to(w.device)
    if delta.shape != w.shape:
        raise RuntimeError(f"adapter delta {tuple(delta.shape)} does not match base weight {tuple(w.shape)}")
    if isinstance(adapter, DoRAAdapter):  # a row-parallel base all-reduces its row norms: every rank merges
        scale = adapter.magnitude_scale(w).detach()
        w.copy_((scale[:, None] * (w.float() + delta)).to(w.dtype))
    else:
        w.copy_((w.float() + delta).to(w.dtype))
    remove_adapter(module)
