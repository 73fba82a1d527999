"""``make_raven_dataset``: HuggingFaceM4/the_cauldron, subset ``raven`` (train split only).

Row schema (as on the Hub): ``images`` (a list of images) and ``texts`` (a list of
``{"user", "assistant", "source"}``). As in Megatron-Bridge, only ``texts[0]`` is used and the
user turn holds **all images first**, then the user text; the assistant turn is the answer. Rows
with no images, no texts, a ``texts[0]`` that is not a mapping or lacks a user/assistant text, or
an unreadable image are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from nvlcore.data.makers import HFConversationMaker, ImageSourceKwargs, image_problem, text_of


@attrs.define
class RavenKwargs(ImageSourceKwargs):
    """``dataset.maker_kwargs`` of ``make_raven_dataset``.

    :param subset: the_cauldron configuration to read.
    """

    subset: str = attrs.field(default="raven", kw_only=True)


class RavenDataset(HFConversationMaker):
    """The ``make_raven_dataset`` maker: ``RavenDataset(split="train", **maker_kwargs)``."""

    name: ClassVar[str] = "make_raven_dataset"
    hub_id: ClassVar[str] = "HuggingFaceM4/the_cauldron"
    splits: ClassVar[tuple[str, ...]] = ("train",)
    split_hint: ClassVar[str] = (
        "the_cauldron ships no validation or test split; set validation.eval_iters=0 (and do not ask for a test split)"
    )
    Kwargs: ClassVar[type] = RavenKwargs
    scan_columns: ClassVar[tuple[str, ...]] = ("images", "texts")
    #: ``nvl eval``'s metric: accuracy of the chosen option
    metrics: ClassVar[str] = "nvl_data_raven.metrics:RavenMetrics"

    def source_name(self) -> str:
        return f"{self.hub_id} (subset raven)"

    def load(self) -> Any:
        return self.load_split(self.kwargs.subset)

    def row_problem(self, row: Mapping[str, Any]) -> str | None:
        images, texts = row.get("images"), row.get("texts")
        if not images:
            return "no images"
        if not texts:
            return "no texts"
        first = texts[0]
        if not isinstance(first, Mapping):
            return "texts[0] is not a mapping"
        if text_of(first.get("user")) is None or text_of(first.get("assistant")) is None:
            return "missing user or assistant text"
        for image in images:
            problem = image_problem(image, verify=self.kwargs.verify_images)
            if problem:
                return problem
        return None

    def convert(self, row: Mapping[str, Any]) -> dict[str, Any]:
        first = row["texts"][0]
        return {
            "conversation": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image} for image in row["images"]]
                    + [{"type": "text", "text": text_of(first["user"])}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": text_of(first["assistant"])}]},
            ]
        }


#: The original workflow's name for this maker.
make_raven_dataset = RavenDataset
