"""FP8 training under Megatron-Bridge's ``mixed_precision`` recipe names, through torchao's float8 training.

A recipe such as ``bf16_with_fp8_current_scaling_mixed`` keeps bf16 autocast for everything and runs the
matmuls of the chosen linear layers in FP8 (forward and both backward matmuls), with torchao's
dynamic scaling (``Float8LinearConfig.from_recipe_name``: ``tensorwise`` is Transformer Engine's
per-tensor *current* scaling). Which linears run FP8:

* every linear layer (``torch.nn.Linear`` or Megatron-Core's column/row parallel linear) that the
  model bridge's :meth:`~nvlcore.bridge.ModelBridge.fp8_module_filter` accepts,
* except those in the first and last decoder layers (Megatron-Bridge's ``first_last_layers_bf16`` with
  ``num_layers_at_start_in_bf16`` / ``num_layers_at_end_in_bf16``, read from
  :meth:`~nvlcore.bridge.ModelBridge.decoder_layers`),
* except a weight whose two dimensions are not multiples of 16 (FP8 GEMMs need that),
* never a PEFT method's adapter (adapters stay bf16) nor a weight a PEFT method packed (NF4).

A converted layer keeps its class, its parameters and their names (checkpoints, the weight mapping,
hooks and adapters are untouched): only its matmul changes. torchao's ``Float8Linear``, made by
``convert_to_float8_training`` from a weightless ``nn.Linear``, is the matmul engine; the layer's own
weight is handed to it at each call. A frozen weight (a PEFT run's base) goes through a variant that
computes no weight gradient and keeps no input for one.

FP8 GEMMs need CUDA compute capability 8.9 or newer (Ada, Hopper, Blackwell): :func:`check_fp8_device`
refuses anything else in one line before the model is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch
    from torch import nn


@attrs.frozen
class FP8Recipe:
    """One of Megatron-Bridge's FP8 ``mixed_precision`` recipes as nvl runs it.

    :param name: the recipe's name (``mixed_precision`` value).
    :param scaling: torchao's ``Float8LinearRecipeName`` value (``tensorwise``: per-tensor current scaling).
    :param bf16_layers_at_start: the first decoder layers kept in bf16 (``num_layers_at_start_in_bf16``).
    :param bf16_layers_at_end: the last decoder layers kept in bf16 (``num_layers_at_end_in_bf16``).
    """

    name: str
    scaling: str
    bf16_layers_at_start: int
    bf16_layers_at_end: int


#: ``mixed_precision`` value -> the FP8 recipe nvl runs for it (Megatron-Bridge's settings).
FP8_RECIPES: dict[str, FP8Recipe] = {
    "bf16_with_fp8_current_scaling_mixed": FP8Recipe("bf16_with_fp8_current_scaling_mixed", "tensorwise", 1, 1),
}

#: The smallest CUDA compute capability with FP8 tensor-core GEMMs (Ada).
MIN_CAPABILITY = (8, 9)


def fp8_recipe(precision: str | None) -> FP8Recipe | None:
    """The FP8 recipe of a ``mixed_precision`` value, None for a recipe without FP8."""
    return FP8_RECIPES.get(precision or "")


def is_bf16_precision(precision: str | None) -> bool:
    """Whether ``mixed_precision`` computes in bf16 (``bf16_mixed`` and the bf16 FP8 recipes)."""
    return precision == "bf16_mixed" or fp8_recipe(precision) is not None


def check_fp8_device(recipe: FP8Recipe, device: torch.device) -> None:
    """Refuse, in one line naming ``mixed_precision``, a device without FP8 GEMMs or a missing torchao."""
    import torch

    if device.type != "cuda":
        raise ValueError(f"mixed_precision={recipe.name} needs a CUDA GPU of compute capability 8.9 or newer "
                         f"(FP8 GEMMs); this run is on {device.type}: use bf16_mixed")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise ValueError(f"mixed_precision={recipe.name} needs compute capability 8.9 or newer (FP8 GEMMs: Ada, "
                         f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: "
                         "use bf16_mixed")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"mixed_precision={recipe.name} runs on torchao's float8 training, which does not import "
                         f"({exc}); install torchao, or use bf16_mixed") from exc


@attrs.define
class FP8Selection:
    """Which linear layers run FP8 (:func:`select_fp8_linears`) and why the others keep bf16."""

    #: module name -> module, in the model's order
    chosen: dict[str, Any] = attrs.field(factory=dict)
    #: module name -> why it stays bf16
    kept: dict[str, str] = attrs.field(factory=dict)

    def describe(self) -> str:
        """One line for the run's log: counts, and the reasons for the bf16 ones."""
        reasons: dict[str, int] = {}
        for why in self.kept.values():
            reasons[why] = reasons.get(why, 0) + 1
        kept = "; ".join(f"{n} {why}" for why, n in reasons.items())
        return f"{len(self.chosen)} linear layer(s) in FP8" + (f", kept bf16: {kept}" if kept else "")


def select_fp8_linears(model: nn.Module, recipe: FP8Recipe, *, module_filter: Callable[[str, nn.Module], bool],
                       decoder_layers: list[nn.Module], skip_parameters: Iterable[str] = ()) -> FP8Selection:
    """The linear layers of ``model`` that run FP8 under ``recipe`` (see the module docstring).

    :param module_filter: the bridge's :meth:`~nvlcore.bridge.ModelBridge.fp8_module_filter`.
    :param decoder_layers: the decoder layers in forward order (the first and last ones stay bf16).
    :param skip_parameters: parameter names that are a PEFT method's adapters (never FP8).
    """
    from nvlcore.bridge import linear_kinds
    from nvlcore.training.optim import is_packed

    kinds = linear_kinds()
    n_start, n_end = recipe.bf16_layers_at_start, recipe.bf16_layers_at_end
    edge = list(decoder_layers[:n_start]) + (list(decoder_layers[-n_end:]) if n_end else [])
    in_edge = {id(m) for layer in edge for m in layer.modules()}
    adapters = set(skip_parameters)
    sel = FP8Selection()
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        weight = module.weight
        if f"{name}.weight" in adapters:
            continue  # an adapter: bf16, not counted among the base's linears
        if not module_filter(name, module):
            sel.kept[name] = "left out by the model bridge"
        elif id(module) in in_edge:
            sel.kept[name] = f"in the first {n_start} / last {n_end} decoder layer(s) (first_last_layers_bf16)"
        elif weight is None or weight.dim() != 2 or weight.shape[0] % 16 or weight.shape[1] % 16:
            sel.kept[name] = "with a dimension not a multiple of 16"
        elif is_packed(weight):
            sel.kept[name] = "packed by the PEFT method"
        else:
            sel.chosen[name] = module
    return sel


def float8_config(recipe: FP8Recipe) -> Any:
    """torchao's ``Float8LinearConfig`` for ``recipe``."""
    from torchao.float8 import Float8LinearConfig

    return Float8LinearConfig.from_recipe_name(recipe.scaling)


def _engine(config: Any) -> Any:
    """A torchao ``Float8Linear`` without a weight of its own (one is handed to it per call)."""
    import torch
    from torch import nn
    from torchao.float8 import convert_to_float8_training

    with torch.device("meta"):
        proxy = nn.Sequential(nn.Linear(16, 16, bias=False))
    convert_to_float8_training(proxy, config=config)
    engine = proxy[0]
    engine._parameters["weight"] = None
    return engine


def _run(engine: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # the engine's forward reads self.weight: hand it this layer's weight (no copy, no registration)
    engine._parameters["weight"] = weight
    try:
        return engine.forward(x)
    finally:
        engine._parameters["weight"] = None


def _frozen_fp8_function() -> Any:
    import torch

    class FrozenFP8Matmul(torch.autograd.Function):
        """``x @ w.T`` with FP8 GEMMs for a weight that gets no gradient: backward is one FP8 GEMM for the
        input's gradient, and only the weight is kept for it."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, fwd: Any, bwd: Any) -> torch.Tensor:
            ctx.save_for_backward(weight)
            ctx.bwd = bwd
            return _run(fwd, x, weight)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
            (weight,) = ctx.saved_tensors
            # dL/dx = grad @ w: the engine computes input @ weight.T, so it is handed w.T
            return _run(ctx.bwd, grad, weight.t()), None, None, None

    return FrozenFP8Matmul


class FP8Matmul:
    """One layer's FP8 matmul ``x @ w.T`` (torchao float8): a trainable weight through torchao's own
    autograd (three FP8 GEMMs), a frozen one through :func:`_frozen_fp8_function` (two)."""

    def __init__(self, config: Any) -> None:
        self.fwd = _engine(config)
        # the input-gradient GEMM of a frozen weight: the incoming gradient is cast as torchao casts
        # grad_output (e5m2 for tensorwise) and the weight as for grad_input; this engine's own backward
        # never runs, but torchao checks that each operand is cast alike in all its GEMMs
        go, w = config.cast_config_grad_output, config.cast_config_weight_for_grad_input
        self.bwd = _engine(dataclasses.replace(
            config, cast_config_input=go, cast_config_input_for_grad_weight=go, cast_config_weight=w,
            cast_config_weight_for_grad_input=w, gemm_config_output=config.gemm_config_grad_input))
        self.frozen = _frozen_fp8_function()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.requires_grad:
            return _run(self.fwd, x, weight)
        return self.frozen.apply(x, weight, self.fwd, self.bwd)


def _megatron_impl(matmul: FP8Matmul) -> Callable[..., torch.Tensor]:
    """Megatron-Core's ``_forward_impl`` contract over an FP8 matmul: with ``allreduce_dgrad`` (a column-parallel
    layer's replicated input) the input's gradient is all-reduced over ``tp_group``, as Megatron's own does."""

    def impl(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
             allreduce_dgrad: bool = False, sequence_parallel: bool = False, tp_group: Any = None,
             **_: Any) -> torch.Tensor:
        if sequence_parallel:
            raise NotImplementedError("FP8 linears with sequence parallelism are not supported")
        if allreduce_dgrad:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        out = matmul(input, weight)
        return out if bias is None else out + bias.to(out.dtype)

    return impl


def _linear_forward(module: nn.Linear, matmul: FP8Matmul) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = matmul(x, module.weight)
        return out if module.bias is None else out + module.bias.to(out.dtype)

    return forward


#: The attribute a converted layer carries (its :class:`FP8Matmul`), so tests and reports can tell.
FP8_ATTR = "fp8_matmul"


def convert_linears_to_fp8(selection: FP8Selection | Mapping[str, Any], recipe: FP8Recipe) -> list[str]:
    """Make each chosen layer's matmul FP8, in place (class, parameters and hooks kept); returns their names."""
    from torch import nn

    chosen = selection.chosen if isinstance(selection, FP8Selection) else dict(selection)
    config = float8_config(recipe)
    for module in chosen.values():
        matmul = FP8Matmul(config)
        setattr(module, FP8_ATTR, matmul)
        if isinstance(module, nn.Linear):
            module.forward = _linear_forward(module, matmul)  # the instance's forward; forward hooks still run
        else:
            module._forward_impl = _megatron_impl(matmul)  # Megatron's linears call it for the matmul
    return list(chosen)


def apply_fp8(model: nn.Module, recipe: FP8Recipe, bridge: Any, *, adapter_names: Iterable[str] = ()) -> FP8Selection:
    """Select (:func:`select_fp8_linears` with the bridge's filter and decoder layers) and convert.

    :raises ValueError: the bridge does not list its decoder layers, so the first and last cannot be kept bf16.
    """
    if bridge.num_decoder_layers() is None:
        raise ValueError(f"mixed_precision={recipe.name} keeps the first and last decoder layers in bf16 "
                         f"(first_last_layers_bf16): model bridge {bridge.name!r} does not list its decoder layers "
                         "(ModelBridge.decoder_layers); use bf16_mixed")
    sel = select_fp8_linears(model, recipe, module_filter=bridge.fp8_module_filter,
                             decoder_layers=bridge.decoder_layers(model), skip_parameters=adapter_names)
    convert_linears_to_fp8(sel, recipe)
    return sel
