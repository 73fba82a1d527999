"""The ``lora`` PEFT method: freeze, insert adapters, list the trainable state, merge.

Freezing follows Megatron-Bridge's ``VLMLoRA``: only the groups its ``freeze_<group>`` flags select
are frozen (the groups are the model bridge's :attr:`~nvlcore.bridge.ModelBridge.freeze_groups`;
``freeze_other`` covers any other parameter), so "LoRA on the language model, vision tower fully
trained" is one configuration. Adapters are always trainable.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from nvl_lora.config import LoRAConfig
from nvl_lora.layers import ADAPTER_ATTR, LoRAAdapter, LoRAVariant, add_adapter, base_kind, is_adapted, merge_adapter
from nvl_lora.matching import first_match, pattern_matches

log = logging.getLogger("nvl_lora")

class NoTargetMatchedError(ValueError):
    """No module of the model matched any LoRA target pattern."""


@attrs.define
class LoRAReport:
    """What :func:`apply_lora` did.

    :param adapted: full names of the adapted modules, in model order.
    :param matches: pattern -> number of modules it selected (first matching pattern counts).
    :param unmatched: patterns that selected nothing.
    :param frozen_groups: submodule (or ``"other"``) -> whether its base parameters were frozen.
    """

    adapted: list[str]
    matches: dict[str, int]
    unmatched: list[str]
    frozen_groups: dict[str, bool]


def _freeze_flags(cfg: LoRAConfig) -> dict[str, bool]:
    """The config's ``freeze_<group>`` flags as ``{group: value}`` (``freeze_other`` aside)."""
    return {f.name[len("freeze_"):]: bool(getattr(cfg, f.name)) for f in attrs.fields(type(cfg))
            if f.name.startswith("freeze_") and f.name != "freeze_other"}


def _is_adapter_param(name: str) -> bool:
    return f".{ADAPTER_ATTR}." in f".{name}"


def freeze_base(model: nn.Module, cfg: LoRAConfig, bridge: Any = None) -> dict[str, bool]:
    """Set ``requires_grad=False`` on the base parameters the config's flags select.

    The groups are the bridge's (:meth:`nvlcore.bridge.ModelBridge.freeze`: one freezing rule for the
    core's ``model.freeze_*`` and this method's ``peft.freeze_*``); without a bridge, ``freeze_<group>``
    names the top-level submodule ``<group>``. Never sets ``requires_grad=True``: what the model
    builder froze (``model.freeze_*``) stays frozen.
    """
    flags = _freeze_flags(cfg)
    if bridge is not None:
        # A tower the model does not have has nothing to freeze (the defaults name all three); its
        # flag is not an error here, unlike an explicit model.freeze_<group>=True.
        flags = {g: v for g, v in flags.items() if g in bridge.freeze_groups}
        return bridge.freeze(model, flags, other=cfg.freeze_other, skip=_is_adapter_param, key="peft")
    from nvlcore.bridge import freeze_parameters

    return freeze_parameters(model, {g: g for g in flags}, flags, other=cfg.freeze_other, skip=_is_adapter_param)


def find_targets(model: nn.Module, cfg: LoRAConfig) -> tuple[list[tuple[str, nn.Module]], dict[str, int]]:
    """Linear modules the config selects, and how many each pattern selected."""
    targets = cfg.target_modules or ("*",)
    counts = {p: 0 for p in targets}
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or f".{ADAPTER_ATTR}." in f".{name}." or base_kind(module) is None or is_adapted(module):
            continue
        pattern = first_match(targets, name)
        if pattern is None:
            continue
        if any(pattern_matches(x, name) for x in cfg.exclude_modules):
            continue
        counts[pattern] += 1
        found.append((name, module))
    return found, counts


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, variant: LoRAVariant | None = None,
               bridge: Any = None) -> LoRAReport:
    """Freeze what ``cfg`` freezes and attach an adapter to every selected linear layer (``variant``: what
    the adapted layers compute, e.g. :data:`nvl_lora.dora.DORA`; default plain LoRA).

    ``bridge``: the model's :class:`~nvlcore.bridge.ModelBridge`; it names the freeze groups and says
    how each linear is laid out (:meth:`~nvlcore.bridge.ModelBridge.linear_layouts`: norm-fused, fused
    row parts). Without one, the modules' own declarations apply (see :func:`nvl_lora.layers.add_adapter`).

    Patterns that select nothing give a warning naming them; if nothing at all is selected it is an
    error that lists some of the model's linear layers so the user can correct the patterns.
    """
    found, counts = find_targets(model, cfg)
    unmatched = [p for p, n in counts.items() if n == 0]
    if not found:
        linears = [n for n, m in model.named_modules() if n and base_kind(m) is not None]
        sample = ", ".join(linears[:12]) + (" ..." if len(linears) > 12 else "")
        raise NoTargetMatchedError(
            f"peft.target_modules {list(cfg.target_modules)} matched no linear layer of the model. "
            f"Its linear layers include: {sample or '(none)'}. A pattern matches a short name "
            "('linear_qkv') or a full name with '*' wildcards ('*language_model*.linear_qkv')."
        )
    if unmatched:
        msg = f"LoRA target pattern(s) {unmatched} matched no module (the others matched {len(found)})"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    frozen = freeze_base(model, cfg, bridge)
    layouts = bridge.linear_layouts() if bridge is not None else {}
    for name, module in found:
        layout = layouts.get(name)
        if bridge is not None and layout is None:
            raise ValueError(f"{name}: a linear layer outside model bridge {bridge.name!r}'s mapping table; "
                             "exclude it (peft.exclude_modules) or add its weight to the table")
        add_adapter(module, name, cfg, layout, variant=variant)
    return LoRAReport([n for n, _ in found], counts, unmatched, frozen)


def adapters(model: nn.Module) -> dict[str, LoRAAdapter]:
    """Adapted module name -> its adapter."""
    return {n: getattr(m, ADAPTER_ATTR) for n, m in model.named_modules() if n and is_adapted(m)}


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and remove it; returns the merged module names."""
    names = []
    for name, module in list(model.named_modules()):
        if name and is_adapted(module):
            merge_adapter(module)
            names.append(name)
    return names


def _tp_size_of(p: torch.Tensor) -> int:
    if not getattr(p, "tensor_model_parallel", False):
        return 1
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_world_size()
    except Exception:  # pragma: no cover - no megatron state: nothing is split
        pass
    return 1


@attrs.frozen
class ParameterCount:
    """Logical (full-model, TP-independent) parameter counts."""

    trainable: int
    total: int
    adapter: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def describe(self) -> str:
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.fraction:.3f}%); "
            f"LoRA adapters: {self.adapter:,}"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count parameters as the full model has them, whatever the TP size.

    A parameter Megatron marks ``tensor_model_parallel`` counts ``numel * tp_size`` (every layer of
    ``megatron.core.tensor_parallel`` and every split adapter is marked); others count once.
    """
    trainable = total = adapter = 0
    for name, p in model.named_parameters():
        n = p.numel() * _tp_size_of(p)
        total += n
        if p.requires_grad:
            trainable += n
        if f".{ADAPTER_ATTR}." in f".{name}":
            adapter += n
    return ParameterCount(trainable, total, adapter)


class LoRAMethod:
    """The registered ``lora`` PEFT method (:class:`nvlcore.contracts.PeftMethod`).

    ``LoRAMethod(config)`` or ``LoRAMethod(**peft_section)``; :meth:`apply` freezes and wraps,
    :meth:`adapter_parameters` names what it added, :meth:`load_trainable_state_dict` loads logical
    adapter tensors, :meth:`merge` folds the adapters into the base weights.
    """

    name = "lora"
    #: The ``peft.*`` fields this method understands (the core config validates against it).
    Config = LoRAConfig
    #: What the adapted layers compute (:class:`nvl_lora.layers.LoRAVariant`); ``None``: plain LoRA.
    variant: LoRAVariant | None = None

    def __init__(self, config: LoRAConfig | Mapping[str, Any] | None = None, **settings: Any) -> None:
        if isinstance(config, LoRAConfig):
            if settings:
                config = attrs.evolve(config, **settings)
            self.config = config
        else:
            merged = dict(config or {})
            merged.update(settings)
            self.config = self.Config.from_dict(merged)
        self.report: LoRAReport | None = None
        #: Notes for the run's line about how the frozen base is stored (:meth:`store_frozen_base`).
        self.storage_notes: list[str] = []

    def apply(self, model: nn.Module, *, bridge: Any = None, **options: Any) -> nn.Module:
        """Freeze and attach adapters; ``bridge``: the model's bridge (freeze groups, linear layouts);
        ``options`` (the ``peft`` section's fields) replace the settings given at construction."""
        if options:
            merged = {**self.config.to_dict(),
                      **{k: v for k, v in options.items() if v is not None or k == "lora_dtype"}}
            self.config = self.Config.from_dict(merged)
        self.report = apply_lora(model, self.config, variant=self.variant, bridge=bridge)
        return model

    @property
    def quantizes_frozen_base(self) -> bool:
        """Whether :meth:`store_frozen_base` quantizes the base (``nvl finetune`` then builds and loads the
        model in host memory by default: ``model.use_cpu_initialization``)."""
        return self.config.base_dtype == "nf4"

    def store_frozen_base(self, model: nn.Module, *, bridge: Any = None, compute_dtype: torch.dtype | None = None,
                          device: Any = None) -> None:
        """``peft.base_dtype=nf4``: store the frozen linear weights in NF4 on ``device`` (:mod:`nvl_lora.qlora`;
        a model in host memory moves there one weight at a time); called by ``nvl finetune`` after
        :meth:`apply` (see :class:`nvlcore.contracts.PeftMethod`). Fills :attr:`storage_notes`. Nothing to do
        for the default ``base_dtype``."""
        if self.config.base_dtype != "nf4":
            return
        from nvl_lora import qlora

        qlora.check_device(device if device is not None else "cpu")
        self.storage_notes = qlora.quantize_frozen_linears(
            model, compute_dtype=compute_dtype, device=device,
            module_filter=None if bridge is None else bridge.quantize_module_filter).notes()

    @staticmethod
    def workflow_settings(
        on_language: bool,
        on_vision: bool,
        model_freeze: Mapping[str, bool | None] | None = None,
        peft_overrides: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, bool]]:
        """``--lora-on-language-model`` / ``--lora-on-vision-model`` as plain config values:
        ``(peft section, {"freeze_language_model": ..., ...} for the peft section)``.

        See :func:`nvl_lora.recipes.lora_settings`; :class:`nvl_lora.options.LoRAFlags` (the flags this
        plugin adds to ``nvl finetune``) calls it on the selected method.
        """
        from nvl_lora.recipes import lora_settings

        cfg, freeze = lora_settings(on_language, on_vision, model_freeze, peft_overrides)
        return cfg.to_dict(), freeze

    def adapter_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Every adapter's A, B (and a variant's tensors, e.g. DoRA's magnitude), by full parameter name."""
        return {f"{n}.{ADAPTER_ATTR}.{rel}": p for n, ad in adapters(model).items() for rel, p, _ in ad.split_params()}

    def load_trainable_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load logical adapter tensors into this rank's shards; returns the adapter keys loaded."""
        from nvl_lora.state import load_adapter_state

        return load_adapter_state(model, state)

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapter into its base weight (the variant's merge, e.g. DoRA's) and remove it."""
        merge_lora(model)
        return model

    def run_config(self) -> dict[str, Any]:
        return self.config.to_dict()


def adapter_param_names(names: Iterable[str]) -> list[str]:
    """The adapter parameter names among ``names``."""
    return [n for n in names if f".{ADAPTER_ATTR}.linear_" in n or f".{ADAPTER_ATTR}.magnitude." in n]
