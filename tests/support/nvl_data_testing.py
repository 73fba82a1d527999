"""Helpers for tests of dataset makers and processors (importing this module is cheap).

Needs PyAV (``pip install av``, in nvlcore's ``test`` extra) for :func:`write_test_video`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["frame_level", "write_hub_dataset", "write_test_video"]


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


def write_hub_dataset(
    root: str | os.PathLike[str],
    files: dict[str, Any],
    configs: dict[str, dict[str, str]],
) -> Path:
    """Lay out a local dataset directory the way a Hub dataset repository is laid out.

    :param root: the directory to create.
    :param files: relative path -> a ``datasets.Dataset`` (written as parquet, its features kept in
        the file's metadata, as ``push_to_hub`` writes them) or a list of row dicts (written as a
        JSON array, as LLaVA-Video-178K ships its annotations).
    :param configs: config name -> {split: data-file glob}, written as the README.md ``configs``
        front matter that ``datasets.load_dataset(root, name, split=...)`` reads.
    """
    import json

    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, list):
            target.write_text(json.dumps(data))
        else:
            data.to_parquet(str(target))
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    lines += ["---", "", "A dataset laid out like its Hub repository, for tests.", ""]
    (out / "README.md").write_text("\n".join(lines))
    return out
