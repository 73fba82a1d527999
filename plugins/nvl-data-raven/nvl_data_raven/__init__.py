"""nvl plugin: the ``make_raven_dataset`` (alias ``raven``) dataset maker.

Raven progressive matrices from ``HuggingFaceM4/the_cauldron`` (subset ``raven``): several images
per example, the multi-image case. ``datasets`` is imported only when the maker is used.
"""

from __future__ import annotations

from typing import Any

from nvlcore.hookspecs import hookimpl


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register("make_raven_dataset", "nvl_data_raven.maker:make_raven_dataset", aliases=("raven",))
