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
    """A ready :class:`nvlcore.generation.Generator` for an HF directory of this model;
    ``options`` as :func:`nvl_nemotron_vl.generate.build_generator` (the bridge's ``generator()`` is
    the contract's subset of them)."""
    from .bridge import NemotronVLBridge
    from .generate import build_generator

    return build_generator(NemotronVLBridge.from_hf_dir(hf_model_path), **options)


@hookimpl
def nvl_register_model_bridges(register: Any) -> None:
    register(BRIDGE_NAME, "nvl_nemotron_vl.bridge:NemotronVLBridge", aliases=("nemotron_vl",))


@hookimpl
def nvl_register_commands(cli: Any) -> None:
    from .cli import toy_model
    from .quickstart import quickstart

    cli.add_command(toy_model)
    cli.add_command(quickstart)
