"""The original workflow's LoRA flags, added to ``nvl finetune`` and ``nvl config show``.

``--lora-on-language-model`` / ``--lora-on-vision-model`` pick the model bridge's PEFT recipe
(``recipe(peft=True)``), select ``peft.method=lora`` unless the recipe or the command line names a
method, and resolve to ``peft.target_modules`` and ``peft.freeze_*`` by the table of
:mod:`nvl_lora.recipes`. ``--lora-checkpoint`` stays a hidden spelling of the core's
``--adapter-checkpoint`` (``nvl generate``, ``nvl eval``, ``nvl export``).

This module imports click and the core's config types only: it is imported whenever ``nvl finetune``
parses its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from nvl_lora.recipes import FREEZE_KEYS  # the peft.freeze_* flags the table sets
from nvlcore.cli.plugin_options import CommandOptions, ConfigRequest

FLAGS = ("lora_on_language_model", "lora_on_vision_model")


def user_peft_freeze(given: Mapping[str, Any], config_files: Sequence[str]) -> set[str]:
    """``peft.freeze_*`` keys the user set explicitly: on the command line or in a ``--config-file``.

    Megatron-Bridge's rule: under PEFT the recipe decides what is frozen, and only an explicit
    ``peft.freeze_*`` override changes it. A ``model.freeze_*: False`` (both shipped YAML files have
    them) never unfreezes a tower the PEFT recipe froze; ``model.freeze_*: True`` freezes a tower in
    addition (the trainer applies both: a base parameter trains only if neither freezes it).
    """
    import yaml

    out: set[str] = set()
    for config_file in config_files:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # the config loader reports an unreadable file with its own message
        peft = data.get("peft") if isinstance(data, dict) else None
        if isinstance(peft, dict):
            out |= {k for k in FREEZE_KEYS if k in peft}
    out |= {k for k in FREEZE_KEYS if f"peft.{k}" in given}
    return out


class LoRAFlags(CommandOptions):
    """``--lora-on-language-model`` / ``--lora-on-vision-model`` (Megatron-Bridge's table)."""

    commands = ("finetune", "config show")

    def params(self, command: str) -> list[click.Parameter]:
        where = "With --hf-model-path: finetune's " if command == "config show" else ""
        return [
            click.Option(["--lora-on-language-model"], is_flag=True,
                         help=f"{where}LoRA on the language model (PEFT recipe; nvl-lora)."),
            click.Option(["--lora-on-vision-model"], is_flag=True,
                         help=f"{where}LoRA on the vision encoder and projector (PEFT recipe; nvl-lora)."),
        ]

    def recipe_options(self, command: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """The bridge's PEFT recipe variant, with adapters on the towers the flags name."""
        groups = [f.removeprefix("lora_on_") for f in FLAGS if values.get(f)]
        return {"peft": True, "adapted_groups": groups} if groups else {}

    def overrides(self, command: str, values: Mapping[str, Any], request: ConfigRequest) -> list[Any]:
        """The method (``lora`` unless the recipe or the command line names one), then the table's
        targets and freeze flags; an explicit ``peft.freeze_*`` or ``peft.target_modules`` of the user
        is kept and ``model.freeze_*`` does not enter the PEFT settings."""
        from nvlcore.config import Override

        language, vision = bool(values.get(FLAGS[0])), bool(values.get(FLAGS[1]))
        if not (language or vision):
            return []
        given, base_peft = request.given, dict(request.base.get("peft") or {})
        out: list[Any] = []
        if not base_peft.get("method") and "peft.method" not in given:
            out.append(Override("peft.method", "lora"))
        method_name = given.get("peft.method") or base_peft.get("method") or "lora"
        try:
            method = request.manager.registry("peft_method").get(method_name)
        except Exception:  # the config loader reports an unknown method with its own message
            return out
        from nvl_lora.method import LoRAMethod

        if not (isinstance(method, type) and issubclass(method, LoRAMethod)):
            raise click.UsageError(
                f"--lora-on-language-model / --lora-on-vision-model apply LoRA's table, but peft.method="
                f"{method_name!r} is not a LoRA method of nvl-lora (lora, dora); drop the flags and set that "
                "method's peft.* keys, or choose peft.method=lora"
            )
        peft, freeze = method.workflow_settings(language, vision)
        explicit = user_peft_freeze(given, request.config_files)
        out += [Override(f"peft.{k}", freeze[k]) for k in FREEZE_KEYS if k not in explicit]
        if "peft.target_modules" not in given:
            out.append(Override("peft.target_modules", list(peft["target_modules"])))
        return out


class LoRACheckpointSpelling(CommandOptions):
    """``--lora-checkpoint``, the name the core's ``--adapter-checkpoint`` (``nvl export``: ``--checkpoint``) had
    before the core stopped naming PEFT methods; accepted as a hidden spelling."""

    commands = ("generate", "eval", "export")

    def aliases(self, command: str) -> dict[str, str]:
        return {"--lora-checkpoint": "--checkpoint" if command == "export" else "--adapter-checkpoint"}
