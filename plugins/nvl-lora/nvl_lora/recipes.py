"""The original workflow's two LoRA flags, resolved to a :class:`LoRAConfig` and freeze flags.

=============================  ==================================  =================  ===========  ============
flags                          adapters on                          freeze LM          freeze ViT   freeze proj.
=============================  ==================================  =================  ===========  ============
``--lora-on-language-model``   LM qkv/proj/fc1/fc2                  yes                no           no
``--lora-on-vision-model``     ViT qkv/proj/fc1/fc2, projector      no                 yes          yes
                               fc1/fc2
both                           LM, ViT and projector                yes                yes          yes
=============================  ==================================  =================  ===========  ============

Megatron-Bridge's rule: the PEFT recipe (this table) decides what is frozen. ``model.freeze_*=True``
freezes a tower in addition; ``model.freeze_*=False`` (both shipped YAML files set it) never unfreezes
a tower the table froze. Only an explicit ``peft.freeze_*`` override changes the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from nvl_lora.config import DEFAULT_TARGET_MODULES, LoRAConfig

FREEZE_KEYS = ("freeze_language_model", "freeze_vision_model", "freeze_vision_projection")

LANGUAGE_TARGETS: tuple[str, ...] = tuple(f"*language_model*.{m}" for m in DEFAULT_TARGET_MODULES)
VISION_TARGETS: tuple[str, ...] = tuple(f"*vision_model*.{m}" for m in DEFAULT_TARGET_MODULES) + (
    "*vision_projection*.linear_fc1",
    "*vision_projection*.linear_fc2",
)


def lora_settings(
    on_language: bool,
    on_vision: bool,
    model_freeze: Mapping[str, bool | None] | None = None,
    peft_overrides: Mapping[str, Any] | None = None,
) -> tuple[LoRAConfig, dict[str, bool]]:
    """Resolve ``--lora-on-language-model`` / ``--lora-on-vision-model`` as Megatron-Bridge does.

    :param on_language: ``--lora-on-language-model`` was given.
    :param on_vision: ``--lora-on-vision-model`` was given.
    :param model_freeze: the ``model.freeze_*`` values. ``True`` freezes that tower in addition to
        the table (the model provider freezes it before PEFT runs); ``False``/``None`` change nothing:
        they never unfreeze a tower the table froze.
    :param peft_overrides: ``peft.*`` settings the user gave explicitly (``dim``, ``alpha``, ``dropout``,
        ``target_modules``, ``freeze_*``...); ``target_modules`` replaces the flag's targets and a
        ``freeze_*`` replaces the table's value for that tower.
    :returns: the LoRA config (whose ``freeze_*`` flags are the resolved ones) and the resolved
        ``{"freeze_language_model": ..., "freeze_vision_model": ..., "freeze_vision_projection": ...}``:
        a tower is frozen when the PEFT setting or ``model.freeze_*`` freezes it.
    :raises ValueError: if neither flag is given, or ``model_freeze`` has an unknown key.
    """
    if not (on_language or on_vision):
        raise ValueError("lora_settings needs --lora-on-language-model and/or --lora-on-vision-model")
    if on_language and on_vision:
        targets = DEFAULT_TARGET_MODULES
        freeze = dict.fromkeys(FREEZE_KEYS, True)
    elif on_language:
        targets = LANGUAGE_TARGETS
        freeze = {"freeze_language_model": True, "freeze_vision_model": False, "freeze_vision_projection": False}
    else:
        targets = VISION_TARGETS
        freeze = {"freeze_language_model": False, "freeze_vision_model": True, "freeze_vision_projection": True}
    overrides = dict(peft_overrides or {})
    for key in FREEZE_KEYS:
        if overrides.get(key) is not None:
            freeze[key] = bool(overrides.pop(key))
        overrides.pop(key, None)
    for key, value in (model_freeze or {}).items():
        if key not in FREEZE_KEYS:
            raise ValueError(f"unknown freeze flag model.{key}; known: {', '.join('model.' + k for k in FREEZE_KEYS)}")
        if value:
            freeze[key] = True
    overrides.setdefault("target_modules", targets)
    cfg = LoRAConfig.from_dict(overrides)
    # The base LM/ViT/projector freezing is what the table says; parameters outside those three
    # submodules (none in Nemotron VL) follow the language model's flag.
    cfg = attrs.evolve(cfg, **freeze, freeze_other=freeze["freeze_language_model"])
    return cfg, freeze


def describe_settings(cfg: LoRAConfig) -> str:
    """One line for the trainer's start-up banner."""
    fr = ", ".join(f"{k.removeprefix('freeze_')}={'frozen' if v else 'trained'}" for k, v in cfg.freeze_flags.items())
    return f"LoRA r={cfg.dim} alpha={cfg.alpha:g} dropout={cfg.dropout:g} targets={list(cfg.target_modules)}; {fr}"
