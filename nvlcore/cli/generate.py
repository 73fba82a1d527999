"""``nvl generate``: answer one prompt (text, images or a video) with a model from an HF directory or
a Megatron-style checkpoint, streaming the text and reporting prefill / decode speed.

The command is model-agnostic: it reads ``config.json`` of ``--hf-model-path``, picks the model
bridge registered for its ``architectures``, loads the model through the core's one inference path
(:mod:`nvlcore.inference`) and decodes with the generator the bridge wraps around it. Options of
one model (a video model's frame sampling) are its plugin's (``nvl_register_command_options``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from nvlcore.cli.options import model_options
from nvlcore.cli.plugin_options import PluginOptionsCommand
from nvlcore.cli.spelling import declare_aliases


def resolve_bridge(hf_dir: Path, bridge_name: str | None = None, manager: Any = None) -> Any:
    """The model bridge for an HF model directory (:func:`nvlcore.bridge.resolve_bridge`); errors as
    one-line :class:`click.ClickException` naming the file or the architecture at fault."""
    from nvlcore.bridge import BridgeError
    from nvlcore.bridge import resolve_bridge as resolve

    try:
        return resolve(hf_dir, bridge_name, manager=manager)
    except BridgeError as exc:
        raise click.ClickException(str(exc)) from None


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size under torchrun (0, 1 otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared_random_seed() -> int:
    """A fresh seed drawn on rank 0 and broadcast to all ranks."""
    import torch
    import torch.distributed as dist

    seed = torch.randint(0, 2**62, (1,)) if dist.get_rank() == 0 else torch.zeros(1, dtype=torch.long)
    if dist.get_backend() == "nccl":
        seed = seed.cuda()
    dist.broadcast(seed, src=0)
    return int(seed.item())


def sampling_params(params: dict[str, Any], world: int) -> Any:
    """``--temperature/--top-p/--top-k/--seed`` as :class:`~nvlcore.generation.SamplingParams`; a sampled run
    over several ranks without ``--seed`` gets one seed drawn on rank 0 (every rank must draw the same tokens)."""
    from nvlcore.generation import SamplingParams

    seed = params["seed"]
    if params["temperature"] > 0 and seed is None and world > 1:
        seed = _shared_random_seed()
    return SamplingParams(temperature=params["temperature"], top_p=params["top_p"], top_k=params["top_k"], seed=seed)


def _split_images(value: str | None) -> list[Path]:
    if not value:
        return []
    paths = [Path(p.strip()).expanduser() for p in value.split(",") if p.strip()]
    for p in paths:
        if not p.is_file():
            raise click.BadParameter(f"{p} is not a file", param_hint="--image-path")
    return paths


def _check_images(paths: list[Path]) -> None:
    """Every image decodes (before the model loads): a damaged one is one line naming it."""
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise click.ClickException(
                f"--image-path {p} is not an image nvl can read ({type(exc).__name__}: {first})") from None


@declare_aliases(aliases={"--image-paths": "--image-path"}, nargs=("--image-paths",))
@click.command("generate", cls=PluginOptionsCommand)
@model_options(
    required=True,
    help="HF model: config, tokenizer, processor settings (and the weights when no Megatron path is given).",
)
@click.option(
    "--megatron-model-path", "--megatron-path", "megatron_model_path",
    type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="Megatron-style checkpoint (base dir or iter_N dir) whose weights to use.",
)
@click.option(
    "--adapter-checkpoint", "adapter_checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="A PEFT run's checkpoint (`peft.method` set): its adapters are applied, unmerged, on top of the base weights "
         "(--megatron-model-path, else the run's recorded base, else the HF weights).",
)
@click.option("--image-path", default=None,
              help="Image file; several comma-separated (prompted as Image-1: ... Image-2: ...).")
@click.option("--video-path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Video file.")
@click.option("--prompt", default="Describe this image.", show_default=True)
@click.option("--prompt-file", type=click.File("r", encoding="utf-8", lazy=False), default=None,
              help="Read the prompt from this file ('-': standard input), for prompts too long for a command line.")
@click.option("--system-prompt", default="/no_think", show_default=True, help="'' for none.")
@click.option("--max-new-tokens", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--seed", default=None, type=int, help="Seed of the sampling generator.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1), help="Tensor-parallel size.")
@click.option("--pp", "--ep", "--etp", "_other_parallel", type=click.IntRange(1, 1), multiple=True, hidden=True,
              help="Accepted for the original script's command lines; only 1 is supported.")
@click.option("--use-llava-model", "--trust-remote-code", "_compat_flags", is_flag=True, hidden=True,
              help="Accepted for the original documentation's command lines; nvl needs neither.")
@click.option("--pp-layout", "_pp_layout", default=None, hidden=True,
              help="Accepted; pipeline parallelism is not used.")
@click.option("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available).")
@click.option(
    "--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
    help="Weights dtype (default: bfloat16 on GPU, float32 on CPU).",
)
@click.option("--bridge", "bridge_name", default=None, help="Model bridge name (default: from config.json).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--quiet", "-q", is_flag=True,
              help="No loading or speed lines on stderr (also a global option: nvl --quiet).")
@click.pass_context
def generate_cmd(ctx: click.Context, **params: Any) -> None:
    """Generate a reply to one prompt, with optional images or a video.

    Greedy unless --temperature is given; stops at the model's end-of-turn token. Text streams to
    stdout; prefill and decode tokens/s go to stderr. Model plugins may add options (a video model its
    frame sampling).
    """
    from nvlcore.flags import global_flag

    command = ctx.command
    assert isinstance(command, PluginOptionsCommand)
    plugin_values = command.split_values(params, ctx)
    params["quiet"] = params["quiet"] or global_flag("quiet")
    params["prompt"] = _read_prompt(ctx, params)
    images = _split_images(params["image_path"])
    if images and params["video_path"] is not None:
        raise click.UsageError("give --image-path or --video-path, not both")
    if params["temperature"] == 0.0 and (params["top_p"] != 1.0 or params["top_k"] != 0):
        raise click.UsageError("--top-p/--top-k only apply when sampling: also give --temperature > 0")
    generator_options: dict[str, Any] = {}
    for obj, values in plugin_values:
        generator_options.update(obj.generator_options("generate", values, params))
    _check_images(images)

    import warnings

    # megatron-core says this on import on every machine without Transformer Engine; not actionable here.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from nvlcore.generation import build_conversation
    from nvlcore.parallel import owned_process_groups

    conversation = build_conversation(params["prompt"], images=images, video=params["video_path"],
                                      system_prompt=params["system_prompt"] or None)
    bridge = resolve_bridge(params["hf_model_path"], params["bridge_name"])
    if params["video_path"] is not None:
        _check_video(bridge, conversation, params["video_path"])
    with owned_process_groups():
        generator = _load(bridge, params, generator_options)
        _answer(generator, conversation, params)


def _read_prompt(ctx: click.Context, params: dict[str, Any]) -> str:
    """``--prompt``, or the text of ``--prompt-file`` (one trailing newline dropped, as ``$(cat FILE)`` would)."""
    from click.core import ParameterSource

    fh = params.pop("prompt_file")
    if fh is None:
        return str(params["prompt"])
    if ctx.get_parameter_source("prompt") not in (ParameterSource.DEFAULT, None):
        raise click.UsageError("give --prompt or --prompt-file, not both")
    text = fh.read().rstrip("\n")
    if not text.strip():
        raise click.BadParameter(f"{fh.name} is empty", param_hint="--prompt-file")
    return text


def _check_video(bridge: Any, conversation: Any, video: Path) -> None:
    """The model's processor reads the video (before the weights load): an unreadable one is one line naming it."""
    try:
        processor = bridge.processor()
    except NotImplementedError:  # a generation-only bridge: its generator reads the video
        return
    try:
        processor(conversation, add_generation_prompt=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise click.ClickException(f"--video-path {video}: the model's processor cannot read it: {first}") from None


def _load(bridge: Any, params: dict[str, Any], generator_options: dict[str, Any]) -> Any:
    """The generator for the command's weights (:func:`nvlcore.inference.load_generator`); errors in one line."""
    from nvlcore.cli import current_plugin_manager
    from nvlcore.flags import global_flag
    from nvlcore.inference import default_device_and_dtype, load_generator

    def say(line: str) -> None:
        if not params["quiet"]:
            click.echo(f"nvl generate: {line}", err=True)

    dtype_name = params["dtype"]
    device, dtype = default_device_and_dtype(params["device"], _torch_dtype(dtype_name) if dtype_name else None)
    megatron, adapter = params["megatron_model_path"], params["adapter_checkpoint"]
    say(f"loading {params['hf_model_path']}" + (f" with weights from {megatron}" if megatron else "")
        + (f" and the adapters of {adapter}" if adapter else "") + f" ({dtype}, {device}, tp={params['tp']})")
    try:
        return load_generator(bridge, megatron_model_path=megatron, adapter_checkpoint=adapter,
                              tensor_parallel_size=params["tp"], device=device, dtype=dtype,
                              manager=current_plugin_manager(), say=say, generator_options=generator_options)
    except (OSError, ValueError, NotImplementedError, KeyError) as exc:  # damaged weights or checkpoint: one line
        if global_flag("debug"):  # nvl --debug generate ...: the full traceback
            raise
        raise click.ClickException(str(exc).strip("'\"")) from None


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _answer(generator: Any, conversation: Any, params: dict[str, Any]) -> None:
    """Generate, stream (rank 0) and report the speed."""
    from nvlcore.generation import GenerationOutput

    rank, world = _rank_and_world()
    sampling = sampling_params(params, world)
    outputs: list[GenerationOutput] = []
    try:
        results = generator.generate([conversation], max_new_tokens=params["max_new_tokens"], sampling=sampling,
                                     stream=None if params["as_json"] or rank != 0 else sys.stdout,
                                     on_output=outputs.append)
    except (OSError, ValueError) as exc:  # an image or video that does not decode, a prompt past the context
        text = str(exc).strip()
        raise click.ClickException(text.splitlines()[0] if text else type(exc).__name__) from None
    if rank != 0:
        return
    res, out = results[0], outputs[0]
    if params["as_json"]:
        click.echo(json.dumps(res.as_json()))
    if params["quiet"]:
        return
    click.echo(
        f"prefill: {out.prompt_tokens} tokens in {out.prefill_seconds:.3f} s "
        f"({out.prefill_tokens_per_s:.1f} tokens/s); "
        f"decode: {out.decode_tokens} tokens in {out.decode_seconds:.3f} s ({out.decode_tokens_per_s:.1f} tokens/s); "
        f"stopped by {'end-of-turn' if res.finish_reason == 'stop' else 'max-new-tokens'}",
        err=True,
    )
