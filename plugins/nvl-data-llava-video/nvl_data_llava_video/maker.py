"""``make_llava_video_178k_dataset``: lmms-lab/LLaVA-Video-178K (split ``open_ended``; ``train`` aliases it;
``multi_choice`` holds the multiple-choice questions, for ``nvl eval``).

Row schema (as on the Hub, JSON files per subset): ``id``, ``data_source``, ``video`` (a path
relative to the extracted video archives, e.g. ``NextQA/NExTVideo/0000/2440175990.mp4``) and
``conversations`` = ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]``.

Conversion (Megatron-Bridge): every human turn becomes a user turn and every gpt turn an
assistant turn, in order (multi-turn kept); the first user turn starts with
``{"type": "video", "path": <video_root_path>/<video>}``; ``<image>`` and ``<video>`` placeholders
are removed from the text, which is then stripped; empty turns are dropped (the first human turn
is kept for its video). Rows are skipped and counted when the video path is missing, escapes
``video_root_path`` (``../`` or an absolute path elsewhere: refused, never opened), or names no
file, when a turn has an unknown speaker, or when no answer is left.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs

from nvlcore.data.makers import CommonKwargs, HFConversationMaker, as_list

_PLACEHOLDERS = ("<image>", "<video>")
_ROLES = {"human": "user", "gpt": "assistant"}


def _clean(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    for placeholder in _PLACEHOLDERS:
        value = value.replace(placeholder, "")
    return value.strip()


def _subsets(value: Any) -> list[str]:
    subsets = as_list(value)
    if not subsets or not all(isinstance(s, str) and s for s in subsets):
        raise ValueError(f"subsets must be a subset name or a non-empty list of them, got {value!r}")
    return subsets


@attrs.define
class LlavaVideoKwargs(CommonKwargs):
    """``dataset.maker_kwargs`` of ``make_llava_video_178k_dataset``.

    :param video_root_path: directory where the subset's video archives were extracted
        (required); each row's ``video`` is resolved under it.
    :param subsets: LLaVA-Video-178K configuration(s) to read, concatenated in order.
    """

    video_root_path: str = attrs.field(kw_only=True)
    subsets: list[str] = attrs.field(factory=lambda: ["0_30_s_nextqa"], converter=_subsets, kw_only=True)


class LlavaVideo178kDataset(HFConversationMaker):
    """The ``make_llava_video_178k_dataset`` maker: ``LlavaVideo178kDataset(split="train", video_root_path=...)``."""

    name: ClassVar[str] = "make_llava_video_178k_dataset"
    hub_id: ClassVar[str] = "lmms-lab/LLaVA-Video-178K"
    splits: ClassVar[tuple[str, ...]] = ("train", "open_ended", "multi_choice")
    split_aliases: ClassVar[Mapping[str, str]] = {"train": "open_ended"}
    split_hint: ClassVar[str] = (
        "'train' is the source's 'open_ended' split ('multi_choice' holds the multiple-choice questions) and "
        "there is no validation or test split; "
        "set validation.eval_iters=0 (and do not ask for a test split)"
    )
    Kwargs: ClassVar[type] = LlavaVideoKwargs
    scan_columns: ClassVar[tuple[str, ...]] = ("video", "conversations")
    #: ``nvl eval``'s metrics: multiple-choice accuracy; token F1 and ROUGE-L on open-ended answers
    metrics: ClassVar[str] = "nvl_data_llava_video.metrics:LlavaVideoMetrics"

    def __init__(self, *, split: str = "train", **maker_kwargs: Any) -> None:
        if not maker_kwargs.get("video_root_path"):
            raise TypeError(
                f"{self.name}: dataset.maker_kwargs.video_root_path is required: the directory where the "
                "LLaVA-Video-178K videos were downloaded and extracted (see docs/datasets.md)"
            )
        root = Path(maker_kwargs["video_root_path"])
        if not root.is_dir():
            raise FileNotFoundError(f"{self.name}: dataset.maker_kwargs.video_root_path {str(root)!r} is not a "
                                    "directory")
        self.video_root = root.resolve()
        super().__init__(split=split, **maker_kwargs)

    def source_name(self) -> str:
        return f"{self.hub_id} (split open_ended)"

    def load(self) -> Any:
        import datasets

        parts = [self.load_split(subset) for subset in self.kwargs.subsets]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def video_path(self, relative: Any) -> Path | None:
        """The video file under ``video_root_path``, or ``None`` if the path escapes it."""
        path = (self.video_root / str(relative)).resolve()
        return path if path.is_relative_to(self.video_root) else None

    def row_problem(self, row: Mapping[str, Any]) -> str | None:
        video = row.get("video")
        if not isinstance(video, str) or not video.strip():
            return "no video"
        path = self.video_path(video)
        if path is None:
            return "video path escapes video_root_path"
        if not path.is_file():
            return "missing video file"
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            return "no conversation"
        if not all(isinstance(t, Mapping) and t.get("from") in _ROLES for t in turns):
            return "unknown speaker in conversation"
        if not any(t["from"] == "human" for t in turns):
            return "no human turn"
        if not any(t["from"] == "gpt" and _clean(t.get("value")) for t in turns):
            return "no answer"
        return None

    def convert(self, row: Mapping[str, Any]) -> dict[str, Any]:
        path = self.video_path(row["video"])
        if path is None:  # row_problem refused it already; never open such a path
            raise ValueError(f"video path {row['video']!r} escapes video_root_path")
        conversation: list[dict[str, Any]] = []
        video_placed = False
        for turn in row["conversations"]:
            role = _ROLES[turn["from"]]
            text = _clean(turn.get("value"))
            content: list[dict[str, Any]] = []
            if role == "user" and not video_placed:
                content.append({"type": "video", "path": str(path)})
                video_placed = True
            if text:
                content.append({"type": "text", "text": text})
            if content:
                conversation.append({"role": role, "content": content})
        return {"conversation": conversation}


#: The original workflow's name for this maker.
make_llava_video_178k_dataset = LlavaVideo178kDataset
