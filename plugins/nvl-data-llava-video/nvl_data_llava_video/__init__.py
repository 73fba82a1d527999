"""nvl plugin: the ``make_llava_video_178k_dataset`` (alias ``llava_video_178k``) dataset maker.

Video question answering from ``lmms-lab/LLaVA-Video-178K``; the videos themselves are
downloaded and extracted by the user under ``video_root_path`` (see docs/datasets.md).
``datasets`` is imported only when the maker is used.
"""

from __future__ import annotations

from typing import Any

from nvlcore.hookspecs import hookimpl


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register(
        "make_llava_video_178k_dataset",
        "nvl_data_llava_video.maker:make_llava_video_178k_dataset",
        aliases=("llava_video_178k",),
    )
