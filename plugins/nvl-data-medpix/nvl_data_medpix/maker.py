"""``make_medpix_dataset``: mmoukouba/MedPix-VQA (splits train and validation).

Row schema (as on the Hub): ``image_id`` (an **Image** feature, despite its name), ``mode``,
``case_id``, ``question``, ``answer``. Conversation: user = [image(``image_id``), text(``question``)],
assistant = ``answer``. Rows with a missing or unreadable image or an empty question or answer
are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from nvlcore.data.makers import HFConversationMaker, ImageSourceKwargs, image_problem, text_of


@attrs.define
class MedPixKwargs(ImageSourceKwargs):
    """``dataset.maker_kwargs`` of ``make_medpix_dataset`` (only the common ones)."""


class MedPixDataset(HFConversationMaker):
    """The ``make_medpix_dataset`` maker: ``MedPixDataset(split="train", **maker_kwargs)``."""

    name: ClassVar[str] = "make_medpix_dataset"
    hub_id: ClassVar[str] = "mmoukouba/MedPix-VQA"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation")
    Kwargs: ClassVar[type] = MedPixKwargs
    scan_columns: ClassVar[tuple[str, ...]] = ("image_id", "question", "answer")
    #: ``nvl eval``'s metrics: exact match, token F1, ROUGE-L
    metrics: ClassVar[str] = "nvl_data_medpix.metrics:MedPixMetrics"

    def row_problem(self, row: Mapping[str, Any]) -> str | None:
        if text_of(row.get("question")) is None:
            return "empty question"
        if text_of(row.get("answer")) is None:
            return "empty answer"
        return image_problem(row.get("image_id"), verify=self.kwargs.verify_images)

    def convert(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "conversation": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": row["image_id"]},
                                {"type": "text", "text": text_of(row["question"])}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": text_of(row["answer"])}]},
            ]
        }


#: The original workflow's name for this maker.
make_medpix_dataset = MedPixDataset
