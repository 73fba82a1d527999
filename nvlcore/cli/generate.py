"""``nvl generate``: answer one prompt (text, images or a video) with a model from an HF directory or
a Megatron-style checkpoint, streaming the text and reporting prefill / decode speed.

The command is model-agnostic: it reads ``config.json`` of ``--hf-model-path``, picks the model
bridge registered for its ``architectures`` and asks the bridge for a ready
:class:`nvlcore.generation.Generator` through :meth:`nvlcore.bridge.ModelBridge.generator`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from nvlcore.cli.plugin_options import PluginOptionsCommand
from nvlcore.cli.spelling import declare_aliases
from nvlcore.hub import hf_model_option, revision_option


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
            raise click.ClickException(f"--image-path {p} is not an image nvl can read ({type(exc).__name__}: {first})") from None


@declare_aliases(
    aliases={"--image-paths": "--image-path", "--video-fps": "--fps", "--hf-revision": "--revision"},
    nargs=("--image-paths",),
)
@click.command("generate", cls=PluginOptionsCommand)
@hf_model_option(
    "--hf-model-path", required=True,
    help="HF model: config, tokenizer, processor settings (and the weights when no Megatron path is given).",
)
@revision_option()
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
@click.option("--image-path", default=None, help="Image file; several comma-separated (prompted as Image-1: ... Image-2: ...).")
@click.option("--video-path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Video file.")
@click.option("--num-frames", default=None, type=click.IntRange(min=1),
              help="Video: frames sampled uniformly over the clip (default: the processor's, 10 like the original script).")
@click.option("--fps", default=None, type=click.FloatRange(min=0.0, min_open=True),
              help="Video: sample this many frames per second instead of a fixed count (capped by the processor's maximum).")
@click.option("--video-pruning-rate", default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Video: fraction of video tokens EVS prunes before the language model (default: the model "
                   "config's video_pruning_rate; 0 turns EVS off, as the original script never prunes).")
@click.option("--prompt", default="Describe this image.", show_default=True)
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
@click.option("--pp-layout", "_pp_layout", default=None, hidden=True, help="Accepted; pipeline parallelism is not used.")
@click.option("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available).")
@click.option(
    "--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
    help="Weights dtype (default: bfloat16 on GPU, float32 on CPU).",
)
@click.option("--bridge", "bridge_name", default=None, help="Model bridge name (default: from config.json).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--quiet", "-q", is_flag=True, help="No loading or speed lines on stderr (also a global option: nvl --quiet).")
def generate_cmd(
    hf_model_path: Path,
    revision: str | None,
    megatron_model_path: Path | None,
    adapter_checkpoint: Path | None,
    image_path: str | None,
    video_path: Path | None,
    num_frames: int | None,
    fps: float | None,
    video_pruning_rate: float | None,
    prompt: str,
    system_prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    tp: int,
    _other_parallel: tuple[int, ...],
    _compat_flags: Any,
    _pp_layout: str | None,
    device: str | None,
    dtype: str | None,
    bridge_name: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Generate a reply to one prompt, with optional images or a video.

    Greedy unless --temperature is given; stops at the model's end-of-turn token. Text streams to
    stdout; prefill and decode tokens/s go to stderr.
    """
    from nvlcore.cli import global_flag

    quiet = quiet or global_flag("quiet")
    images = _split_images(image_path)
    if images and video_path is not None:
        raise click.UsageError("give --image-path or --video-path, not both")
    if video_path is None and (num_frames is not None or fps is not None or video_pruning_rate is not None):
        raise click.UsageError("--num-frames, --fps and --video-pruning-rate apply to a video: also give --video-path")
    if num_frames is not None and fps is not None:
        raise click.UsageError("give --num-frames (a fixed count) or --fps (frames per second), not both")
    if temperature == 0.0 and (top_p != 1.0 or top_k != 0):
        raise click.UsageError("--top-p/--top-k only apply when sampling: also give --temperature > 0")
    _check_images(images)

    import warnings

    # megatron-core says this on import on every machine without Transformer Engine; not actionable here.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    import torch

    from nvlcore.cli import current_plugin_manager
    from nvlcore.generation import GenerationOutput, SamplingParams, build_conversation

    def say(line: str) -> None:
        if not quiet:
            click.echo(f"nvl generate: {line}", err=True)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    bridge = resolve_bridge(hf_model_path, bridge_name)
    say(
        f"loading {hf_model_path}"
        + (f" with weights from {megatron_model_path}" if megatron_model_path else "")
        + (f" and the adapters of {adapter_checkpoint}" if adapter_checkpoint else "")
        + f" ({torch_dtype}, {dev}, tp={tp})"
    )
    options: dict[str, Any] = {}
    processor_options: dict[str, Any] = {}
    if num_frames is not None:
        processor_options["video_num_frames"] = num_frames
    if fps is not None:
        processor_options["video_fps"] = fps
    if processor_options:
        options["processor_options"] = processor_options
    if video_pruning_rate is not None:
        options["video_pruning_rate"] = video_pruning_rate
    if adapter_checkpoint is not None:
        options.update(adapter_checkpoint=adapter_checkpoint, plugin_manager=current_plugin_manager(), say=say)
    try:
        generator = bridge.generator(
            megatron_model_path=megatron_model_path, tensor_parallel_size=tp, device=dev, dtype=torch_dtype, **options
        )
    except (OSError, ValueError, NotImplementedError, KeyError) as exc:  # damaged weights or checkpoint: one line naming it
        from nvlcore.cli import global_flag

        if global_flag("debug"):  # nvl --debug generate ...: the full traceback
            raise
        raise click.ClickException(str(exc).strip("'\"")) from None

    conversation = build_conversation(
        prompt, images=images, video=video_path, system_prompt=system_prompt or None
    )
    rank, world = _rank_and_world()
    if temperature > 0 and seed is None and world > 1:
        seed = _shared_random_seed()  # every tensor-parallel rank must draw the same tokens
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    outputs: list[GenerationOutput] = []
    try:
        results = generator.generate(
            [conversation],
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stream=None if as_json or rank != 0 else sys.stdout,
            on_output=outputs.append,
        )
    except (OSError, ValueError) as exc:  # an image or video that does not decode: the message names it
        raise click.ClickException(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    if rank != 0:
        return
    res, out = results[0], outputs[0]
    if as_json:
        click.echo(json.dumps(res.as_json()))
    if quiet:
        return
    click.echo(
        f"prefill: {out.prompt_tokens} tokens in {out.prefill_seconds:.3f} s ({out.prefill_tokens_per_s:.1f} tokens/s); "
        f"decode: {out.decode_tokens} tokens in {out.decode_seconds:.3f} s ({out.decode_tokens_per_s:.1f} tokens/s); "
        f"stopped by {'end-of-turn' if res.finish_reason == 'stop' else 'max-new-tokens'}",
        err=True,
    )
