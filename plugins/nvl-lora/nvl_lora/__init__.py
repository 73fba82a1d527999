"""nvl plugin: LoRA and DoRA.

Registers the PEFT methods ``lora`` and ``dora`` and the exporter ``hf-peft`` as lazy ``"module:Attr"`` targets,
adds the ``nvl peft`` command group and the ``--lora-on-*`` options of ``nvl finetune`` / ``nvl config show``. Nothing
heavy (torch, megatron) is imported here, so ``nvl --help`` stays fast; see ``docs/lora.md``.
"""

from __future__ import annotations

from typing import Any

from nvlcore import hookimpl

PEFT_METHOD_NAME = "lora"
DORA_METHOD_NAME = "dora"
EXPORTER_NAME = "hf-peft"


@hookimpl
def nvl_register_peft_methods(register: Any) -> None:
    register(PEFT_METHOD_NAME, "nvl_lora.method:LoRAMethod", aliases=("LoRA", "VLMLoRA"))
    # Megatron-Bridge's peft_scheme="dora" / its DoRA class
    register(DORA_METHOD_NAME, "nvl_lora.dora:DoRAMethod", aliases=("DoRA",))


@hookimpl
def nvl_register_exporters(register: Any) -> None:
    register(EXPORTER_NAME, "nvl_lora.hf_peft:HFPeftExporter", aliases=("peft",))


@hookimpl
def nvl_register_command_options(register: Any) -> None:
    # --lora-on-language-model / --lora-on-vision-model on nvl finetune and nvl config show
    register("lora-flags", "nvl_lora.options:LoRAFlags")
    # --lora-checkpoint: the old spelling of --adapter-checkpoint (nvl generate / eval / export)
    register("lora-checkpoint-spelling", "nvl_lora.options:LoRACheckpointSpelling")


@hookimpl
def nvl_register_commands(cli: Any) -> None:
    from nvl_lora.cli import peft_group

    cli.add_command(peft_group)
