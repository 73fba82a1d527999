"""Video frame sampling and decoding (decord), as the Megatron-Bridge / HF helpers do it.

Sampling (model-format.md §4.3): with a target ``fps > 0`` the number of frames is
``max(1, int(duration * fps))`` capped by ``max_frames``; otherwise a fixed ``num_frames``
(default 10, the Bridge's collate). If that is at least the clip's frame count every frame is
taken; one frame means frame 0; otherwise ``unique(round(linspace(0, total - 1, n)))``. A frame's
timestamp is ``index / average_fps`` seconds.

Each sampled frame becomes one tile: resized to ``image_size x image_size`` (aspect ratio not
kept, no thumbnail), bicubic, then normalised like an image tile. Unlike the Bridge's helper the
frames are not round-tripped through JPEG.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["VideoDecodeError", "decode_video_frames", "resize_frames", "sample_frame_indices"]


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded; the message names the file."""


def sample_frame_indices(
    total_frames: int, average_fps: float, *, num_frames: int = 10, fps: float | None = None,
    max_frames: int | None = None
) -> list[int]:
    """Indices of the frames to take from a clip of ``total_frames`` frames at ``average_fps``.

    :param num_frames: frames to take when ``fps`` is not set (uniformly spaced over the clip).
    :param fps: take this many frames per second of video instead (``None`` or 0: use ``num_frames``).
    :param max_frames: cap on the frame count in ``fps`` mode (``None``: no cap).
    """
    import numpy as np

    if total_frames <= 0:
        raise ValueError("the video has no frames")
    if fps is not None and fps > 0:
        if average_fps <= 0:
            raise ValueError(f"cannot sample at {fps} fps: the video reports an average fps of {average_fps}")
        desired = max(1, int(total_frames / average_fps * fps))
        if max_frames is not None and max_frames > 0:
            desired = min(desired, max_frames)
    else:
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        desired = num_frames
    if desired >= total_frames:
        return list(range(total_frames))
    if desired == 1:
        return [0]
    return [int(i) for i in np.unique(np.round(np.linspace(0, total_frames - 1, desired)).astype(np.int64))]


@contextlib.contextmanager
def _ffmpeg_quiet() -> Iterator[None]:
    """Silence file descriptor 2 while decord opens a file (ffmpeg and decord log there from C)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
    finally:
        os.close(saved)


def decode_video_frames(
    path: str | os.PathLike[str],
    *,
    num_frames: int = 10,
    fps: float | None = None,
    max_frames: int | None = None,
    num_threads: int = 1,
) -> tuple[list[Image.Image], list[float]]:
    """Decode the sampled frames of ``path`` with decord.

    :param num_threads: decoder threads (1 suits DataLoader workers, which already run in parallel).
    :returns: the frames as RGB PIL images and their timestamps in seconds.
    :raises VideoDecodeError: naming the file when it is missing or decord cannot read it.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise VideoDecodeError(f"video file not found: {p}")
    try:
        import decord
    except ImportError as exc:  # pragma: no cover - decord is a declared dependency of the video extra
        raise VideoDecodeError(
            f"decoding {p} needs decord: pip install 'nvl-nemotron-vl[video]' (or pip install decord)"
        ) from exc
    try:
        with _ffmpeg_quiet():  # a file that is not a video: our one line, not ffmpeg's and decord's logs
            reader = decord.VideoReader(str(p), num_threads=num_threads)
        total = len(reader)
        average_fps = float(reader.get_avg_fps())
        indices = sample_frame_indices(total, average_fps, num_frames=num_frames, fps=fps, max_frames=max_frames)
        array = reader.get_batch(indices).asnumpy()
    except VideoDecodeError:
        raise
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        raise VideoDecodeError(f"cannot decode video {p}: {type(exc).__name__}: {exc}") from exc
    frames = [Image.fromarray(a) for a in array]
    timestamps = [i / average_fps if average_fps > 0 else 0.0 for i in indices]
    return frames, timestamps


def resize_frames(frames: Sequence[Image.Image], image_size: int) -> list[Image.Image]:
    """One tile per frame: RGB, resized to ``image_size`` square with bicubic sampling."""
    from PIL import Image

    return [f.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC) for f in frames]
