"""Helpers for tests of dataset makers and processors (importing this module is cheap).

Needs PyAV (``pip install av``, in nvlcore's ``test`` extra) for :func:`write_test_video`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["frame_level", "write_test_video"]


def frame_level(index: int) -> int:
    """The grey level :func:`write_test_video` paints frame ``index`` with (decoders can be checked against it)."""
    return (16 + 8 * index) % 240


def write_test_video(
    path: str | os.PathLike[str], *, num_frames: int = 30, fps: int = 10, width: int = 64, height: int = 48,
    codec: str = "mpeg4",
) -> Path:
    """Write an mp4 whose frame ``i`` is a flat grey image of level :func:`frame_level` ``(i)``.

    Flat frames survive lossy coding almost exactly, so a test can tell which frames a decoder
    returned from their mean pixel value.
    """
    import av
    import numpy as np

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            array = np.full((height, width, 3), frame_level(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out
