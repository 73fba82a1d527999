"""nvl plugin: the model bridge for NVIDIA Nemotron Nano V2 VL.

Nothing heavy is imported here: the bridge is registered as a lazy ``"module:Attr"`` target and its
commands import torch only when they run.
"""

from __future__ import annotations

from typing import Any

from nvlcore import hookimpl

BRIDGE_NAME = "nemotron_nano_v2_vl"
ARCHITECTURES = ("NemotronH_Nano_VL_V2",)


def load_generator(
    hf_model_path: Any,
    *,
    cuda_graph: bool | None = None,
    compile: bool = False,
    processor_options: Any = None,
    video_pruning_rate: float | None = None,
    plugin_manager: Any = None,
    lora_checkpoint: Any = None,
    **options: Any,
) -> Any:
    """A ready :class:`~nvlcore.generation.Generator` for an HF directory of this model.

    :param cuda_graph, compile, processor_options, video_pruning_rate: see
        :func:`nvl_nemotron_vl.generate.generator_for_model`.
    :param plugin_manager: whose ``peft_method`` registry applies ``adapter_checkpoint``.
    :param lora_checkpoint: the former name of ``adapter_checkpoint`` (give one of them).
    :param options: :func:`nvlcore.inference.load_model`'s: ``megatron_model_path``,
        ``adapter_checkpoint`` (a PEFT run, unmerged unless ``merge_adapters=True``),
        ``tensor_parallel_size``, ``device``, ``dtype``, ``say``.
    """
    from nvlcore.inference import load_generator as load

    from .bridge import NemotronVLBridge

    if lora_checkpoint is not None:
        if options.get("adapter_checkpoint") is not None:
            raise TypeError("load_generator: give adapter_checkpoint or its former name lora_checkpoint, not both")
        options["adapter_checkpoint"] = lora_checkpoint
    generator_options = dict(cuda_graph=cuda_graph, compile=compile, processor_options=processor_options,
                             video_pruning_rate=video_pruning_rate)
    return load(NemotronVLBridge.from_hf_dir(hf_model_path), generator_options=generator_options,
                manager=plugin_manager, **options)


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
