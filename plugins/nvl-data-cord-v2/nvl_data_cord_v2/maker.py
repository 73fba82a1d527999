"""``make_cord_v2_dataset``: naver-clova-ix/cord-v2 (splits train, validation, test).

Row schema (as on the Hub): ``image`` (an Image feature) and ``ground_truth`` (a JSON **string**
holding ``gt_parse``, a dict, or ``gt_parses``, a list of them). The target text is
:func:`json2token` of the first parse (Megatron-Bridge HEAD; its older makers picked one at
random, which made epochs differ). Conversation: user = [image, text(``prompt``)], assistant = the
target. Rows whose JSON does not parse, that have no parse, an empty target, or a missing or
unreadable image are skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from nvlcore.data.makers import HFConversationMaker, ImageSourceKwargs, image_problem


def json2token(obj: Any, sort_json_key: bool = True) -> str:
    """A receipt parse as text: dicts become ``<s_key>...</s_key>`` (keys in reverse alphabetical
    order when ``sort_json_key``), a dict that is exactly ``{"text_sequence": v}`` becomes ``v``,
    lists are joined with ``<sep/>``, anything else is ``str()``.

    >>> json2token({"total": {"total_price": "45,500"}, "menu": [{"nm": "A", "price": "1"}]})
    '<s_total><s_total_price>45,500</s_total_price></s_total><s_menu><s_price>1</s_price><s_nm>A</s_nm></s_menu>'
    """
    if isinstance(obj, dict):
        if len(obj) == 1 and "text_sequence" in obj:
            return str(obj["text_sequence"])
        keys = sorted(obj, reverse=True) if sort_json_key else list(obj)
        return "".join(f"<s_{k}>{json2token(obj[k], sort_json_key)}</s_{k}>" for k in keys)
    if isinstance(obj, list):
        return "<sep/>".join(json2token(item, sort_json_key) for item in obj)
    return str(obj)


def target_text(ground_truth: Any) -> str:
    """The target of a ``ground_truth`` JSON string; raises ``ValueError`` saying what is wrong."""
    if not isinstance(ground_truth, str):
        raise ValueError("ground_truth is not a string")
    try:
        gt = json.loads(ground_truth)
    except json.JSONDecodeError as exc:
        raise ValueError("ground_truth is not valid JSON") from exc
    if not isinstance(gt, dict):
        raise ValueError("ground_truth is not a JSON object")
    if "gt_parses" in gt:
        parses = gt["gt_parses"]
        if not isinstance(parses, list) or not parses:
            raise ValueError("ground_truth.gt_parses is not a non-empty list")
        parse = parses[0]
    elif "gt_parse" in gt:
        parse = gt["gt_parse"]
    else:
        raise ValueError("ground_truth has no gt_parse or gt_parses")
    text = json2token(parse, sort_json_key=True)
    if not text.strip():
        raise ValueError("ground_truth gives an empty target")
    return text


@attrs.define
class CordV2Kwargs(ImageSourceKwargs):
    """``dataset.maker_kwargs`` of ``make_cord_v2_dataset``.

    :param prompt: the user's text after the image.
    """

    prompt: str = attrs.field(default="Describe this image.", kw_only=True)


class CordV2Dataset(HFConversationMaker):
    """The ``make_cord_v2_dataset`` maker: ``CordV2Dataset(split="train", **maker_kwargs)``."""

    name: ClassVar[str] = "make_cord_v2_dataset"
    hub_id: ClassVar[str] = "naver-clova-ix/cord-v2"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    Kwargs: ClassVar[type] = CordV2Kwargs
    scan_columns: ClassVar[tuple[str, ...]] = ("image", "ground_truth")
    #: ``nvl eval``'s metrics: Donut's tree-edit-distance accuracy and field F1
    metrics: ClassVar[str] = "nvl_data_cord_v2.metrics:CordMetrics"

    def row_problem(self, row: Mapping[str, Any]) -> str | None:
        try:
            target_text(row.get("ground_truth"))
        except ValueError as exc:
            return str(exc)
        return image_problem(row.get("image"), verify=self.kwargs.verify_images)

    def convert(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "conversation": [
                {"role": "user",
                 "content": [{"type": "image", "image": row["image"]}, {"type": "text", "text": self.kwargs.prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": target_text(row["ground_truth"])}]},
            ]
        }


#: The original workflow's name for this maker.
make_cord_v2_dataset = CordV2Dataset
