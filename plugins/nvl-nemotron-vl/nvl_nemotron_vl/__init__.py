"""nvl plugin: the model bridge for NVIDIA Nemotron Nano V2 VL.

Nothing heavy is imported here: the bridge is registered as a lazy ``"module:Attr"`` target and its
commands import torch only when they run.
"""

from __future__ import annotations

from typing import Any

from nvlcore import hookimpl

BRIDGE_NAME = "nemotron_nano_v2_vl"
ARCHITECTURES = ("NemotronH_Nano_VL_V2",)


def load_generator(hf_model_path: Any, **options: Any) -> Any:
    """A ready :class:`nvlcore.generation.Generator` for an HF directory of this model; ``options`` as
    :func:`nvl_nemotron_vl.generate.load_generator` (the core's model loading plus this model's
    generation options)."""
    from .generate import load_generator as load

    return load(hf_model_path, **options)


@hookimpl
def nvl_register_model_bridges(register: Any) -> None:
    register(BRIDGE_NAME, "nvl_nemotron_vl.bridge:NemotronVLBridge", aliases=("nemotron_vl",))


@hookimpl
def nvl_register_command_options(register: Any) -> None:
    # --num-frames / --fps / --video-pruning-rate on nvl generate
    register("nemotron-vl-video", "nvl_nemotron_vl.options:VideoOptions")


@hookimpl
def nvl_register_commands(cli: Any) -> None:
    from .cli import toy_model
    from .quickstart import quickstart

    cli.add_command(toy_model)
    cli.add_command(quickstart)
