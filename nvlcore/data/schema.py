"""The conversation schema: the seam between dataset makers and model processors.

A dataset maker turns rows of its source into examples of this shape; a bridge's processor turns
them into tensors. Neither knows about the other::

    {"conversation": [
        {"role": "system", "content": [{"type": "text", "text": "You are ..."}]},      # optional, first
        {"role": "user", "content": [
            {"type": "image", "image": <PIL.Image.Image | path>},
            {"type": "video", "path": "/abs/clip.mp4"},                               # or "video": [frames]
            {"type": "text", "text": "..."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "..."}]},
        ...]}

Rules checked by :func:`validate_conversation`:

* ``conversation`` is a non-empty list of turns; each turn is a mapping with ``role`` and ``content``;
* ``role`` is ``system``, ``user`` or ``assistant``; a ``system`` turn may only come first;
* ``content`` is a list of items (a plain string is accepted as shorthand for one text item);
* an item is a mapping with ``type``:

  - ``text``: ``text`` is a string;
  - ``image``: ``image`` is a ``PIL.Image.Image`` or a file path (``str`` / ``os.PathLike``);
  - ``video``: ``path`` is a file path, or ``video`` is a non-empty list of decoded frames
    (``PIL.Image.Image``), optionally with ``timestamps`` (seconds, one per frame);

* images and videos appear only in ``user`` turns; ``system`` and ``assistant`` turns hold text.

Items may carry extra keys (a maker's hints); processors ignore what they do not understand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ConversationError", "ROLES", "ITEM_TYPES", "validate_conversation", "iter_items"]

#: One example in this schema: ``{"conversation": [{"role": ..., "content": [...]}, ...]}`` (the one
#: definition; :mod:`nvlcore.contracts` and :mod:`nvlcore.generation` import it from here).
Conversation = dict[str, Any]

ROLES: tuple[str, ...] = ("system", "user", "assistant")
ITEM_TYPES: tuple[str, ...] = ("text", "image", "video")


class ConversationError(ValueError):
    """An example does not follow the conversation schema; the message names the row and the field."""


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))


def _is_pil(value: Any) -> bool:
    # Checked by duck typing so that importing this module never imports PIL.
    mod = type(value).__module__
    return mod.startswith("PIL.") and hasattr(value, "size") and hasattr(value, "convert")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def iter_items(turn: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A validated turn's content as a list of items (a string becomes one text item)."""
    content = turn["content"]
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def validate_conversation(obj: Any, where: str = "example") -> Any:
    """Check ``obj`` against the conversation schema and return it unchanged.

    :param obj: the example, ``{"conversation": [...]}``.
    :param where: where it came from, used as the start of every error message
        (e.g. ``"row 17 of make_raven_dataset/train"``).
    :raises ConversationError: naming ``where`` and the offending field, e.g.
        ``row 17 of make_raven_dataset/train: conversation[0].content[2]: a text item needs a
        string 'text' field; got keys ['type']``.
    """

    def fail(field: str, problem: str) -> ConversationError:
        return ConversationError(f"{where}: {field}: {problem}")

    if not isinstance(obj, Mapping):
        raise fail("example", f"expected a mapping with a 'conversation' list, got {type(obj).__name__}")
    if "conversation" not in obj:
        raise fail("conversation", f"missing; the example has keys {sorted(obj)}")
    turns = obj["conversation"]
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
        raise fail("conversation", f"expected a list of turns, got {type(turns).__name__}")
    if len(turns) == 0:
        raise fail("conversation", "is empty; give at least one turn")
    for t, turn in enumerate(turns):
        tf = f"conversation[{t}]"
        if not isinstance(turn, Mapping):
            raise fail(tf, f"expected a mapping with 'role' and 'content', got {type(turn).__name__}")
        role = turn.get("role")
        if role not in ROLES:
            raise fail(f"{tf}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        if role == "system" and t != 0:
            raise fail(f"{tf}.role", "a system turn may only be the first turn")
        if "content" not in turn:
            raise fail(f"{tf}.content", f"missing; the turn has keys {sorted(turn)}")
        content = turn["content"]
        if isinstance(content, str):
            continue
        if isinstance(content, bytes) or not isinstance(content, Sequence):
            raise fail(f"{tf}.content", f"expected a list of items or a string, got {type(content).__name__}")
        for i, item in enumerate(content):
            f = f"{tf}.content[{i}]"
            if not isinstance(item, Mapping):
                raise fail(f, f"expected a mapping with a 'type', got {type(item).__name__}")
            kind = item.get("type")
            if kind not in ITEM_TYPES:
                raise fail(f"{f}.type", f"must be one of {', '.join(ITEM_TYPES)}; got {kind!r}")
            if kind != "text" and role != "user":
                raise fail(f"{f}.type", f"{kind} items are only allowed in user turns, not in a {role} turn")
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    got = _describe(item["text"]) if "text" in item else f"keys {sorted(item)}"
                    raise fail(f"{f}.text", f"a text item needs a string 'text' field; got {got}")
            elif kind == "image":
                image = item.get("image")
                if image is None or not (_is_pil(image) or _is_path(image)):
                    got = _describe(image) if "image" in item else f"keys {sorted(item)}"
                    raise fail(f"{f}.image", f"an image item needs 'image': a PIL image or a file path; got {got}")
            else:  # video
                if "path" in item:
                    if not _is_path(item["path"]):
                        raise fail(f"{f}.path",
                                   f"a video path must be a non-empty string; got {_describe(item['path'])}")
                elif "video" in item:
                    frames = item["video"]
                    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence) or not frames:
                        raise fail(f"{f}.video", "decoded frames must be a non-empty list of PIL images")
                    for k, frame in enumerate(frames):
                        if not _is_pil(frame):
                            raise fail(f"{f}.video[{k}]", f"expected a PIL image, got {_describe(frame)}")
                    stamps = item.get("timestamps")
                    if stamps is not None and (
                        not isinstance(stamps, Sequence) or len(stamps) != len(frames)
                        or not all(isinstance(s, (int, float)) for s in stamps)
                    ):
                        raise fail(f"{f}.timestamps", f"expected {len(frames)} numbers (seconds), one per frame")
                else:
                    raise fail(f, "a video item needs 'path' (a file) or 'video' (decoded frames); got keys "
                               f"{sorted(item)}")
    return obj
