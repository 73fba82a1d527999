"""nvl plugin: the ``make_medpix_dataset`` (alias ``medpix``) dataset maker.

Medical visual question answering from ``mmoukouba/MedPix-VQA``. ``datasets`` is imported only
when the maker is used.
"""

from __future__ import annotations

from typing import Any

from nvlcore.hookspecs import hookimpl


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register("make_medpix_dataset", "nvl_data_medpix.maker:make_medpix_dataset", aliases=("medpix",))
