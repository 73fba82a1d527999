"""This model's options of ``nvl generate`` and ``nvl serve``: how a video is sampled and pruned.

``--num-frames`` / ``--fps`` choose the frames the processor samples (``video_num_frames`` /
``video_fps``), ``--video-pruning-rate`` the EVS rate (the config's ``video_pruning_rate``; 0 turns it
off, as the original script never prunes). The core passes them to the bridge's
``generator_for_model`` (:meth:`CommandOptions.generator_options`). Imported when ``nvl generate``
parses its arguments: click and the core's option types only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from nvlcore.cli.plugin_options import CommandOptions


class VideoOptions(CommandOptions):
    """``--num-frames``, ``--fps`` (alias ``--video-fps``) and ``--video-pruning-rate`` of ``nvl generate`` and
    ``nvl serve`` (there they apply to every request's videos)."""

    commands = ("generate", "serve")

    def aliases(self, command: str) -> Mapping[str, str]:
        return {"--video-fps": "--fps"}

    def params(self, command: str) -> list[click.Parameter]:
        return [
            click.Option(["--num-frames"], default=None, type=click.IntRange(min=1),
                         help="Video: frames sampled uniformly over the clip (default: the processor's, 10 like the "
                              "original script)."),
            click.Option(["--fps"], default=None, type=click.FloatRange(min=0.0, min_open=True),
                         help="Video: sample this many frames per second instead of a fixed count (capped by the "
                              "processor's maximum)."),
            click.Option(["--video-pruning-rate"], default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
                         help="Video: fraction of video tokens EVS prunes before the language model (default: the "
                              "model config's video_pruning_rate; 0 turns EVS off, as the original script never "
                              "prunes)."),
        ]

    def generator_options(self, command: str, values: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """``processor_options`` and ``video_pruning_rate`` for :func:`nvl_nemotron_vl.generate.generator_for_model`."""
        num_frames, fps, rate = values.get("num_frames"), values.get("fps"), values.get("video_pruning_rate")
        if command == "generate" and params.get("video_path") is None and (
                num_frames is not None or fps is not None or rate is not None):
            raise click.UsageError("--num-frames, --fps and --video-pruning-rate apply to a video: also give "
                                   "--video-path")
        if num_frames is not None and fps is not None:
            raise click.UsageError("give --num-frames (a fixed count) or --fps (frames per second), not both")
        out: dict[str, Any] = {}
        processor_options = {k: v for k, v in (("video_num_frames", num_frames), ("video_fps", fps)) if v is not None}
        if processor_options:
            out["processor_options"] = processor_options
        if rate is not None:
            out["video_pruning_rate"] = rate
        return out
