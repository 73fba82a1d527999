"""nvl plugin: the ``make_cord_v2_dataset`` (alias ``cord_v2``) dataset maker.

Receipt OCR from ``naver-clova-ix/cord-v2``: the target is the receipt's parse as XML-like
tags. ``datasets`` is imported only when the maker is used.
"""

from __future__ import annotations

from typing import Any

from nvlcore.hookspecs import hookimpl


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register("make_cord_v2_dataset", "nvl_data_cord_v2.maker:make_cord_v2_dataset", aliases=("cord_v2",))
