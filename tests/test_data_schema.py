"""The conversation schema and its error messages."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from nvlcore.data.schema import ConversationError, validate_conversation

W = "row 17 of make_raven_dataset/train"


def ok_example():
    return {"conversation": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (4, 4))},
            {"type": "image", "image": "/data/a.png"},
            {"type": "video", "path": "/data/clip.mp4"},
            {"type": "video", "video": [Image.new("RGB", (4, 4))] * 2, "timestamps": [0.0, 0.5]},
            {"type": "text", "text": "What?", "extra_hint": 1},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "That."}]},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "This."},
    ]}


def test_valid_example_is_returned_unchanged() -> None:
    ex = ok_example()
    assert validate_conversation(ex, where=W) is ex


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (lambda ex: ex.pop("conversation"), "conversation", "missing"),
        (lambda ex: ex.update(conversation=[]), "conversation", "is empty"),
        (lambda ex: ex.update(conversation="hi"), "conversation", "expected a list of turns"),
        (lambda ex: ex["conversation"][1].update(role="human"), "conversation[1].role",
         "must be one of system, user, assistant; got 'human'"),
        (lambda ex: ex["conversation"][2].update(role="system"), "conversation[2].role",
         "a system turn may only be the first turn"),
        (lambda ex: ex["conversation"][2].pop("content"), "conversation[2].content", "missing"),
        (lambda ex: ex["conversation"][1]["content"][0].pop("image"), "conversation[1].content[0].image",
         "needs 'image'"),
        (lambda ex: ex["conversation"][1]["content"][0].update(image=3), "conversation[1].content[0].image",
         "got int 3"),
        (lambda ex: ex["conversation"][1]["content"][2].pop("path"), "conversation[1].content[2]", "needs 'path'"),
        (lambda ex: ex["conversation"][1]["content"][3].update(timestamps=[0.0]),
         "conversation[1].content[3].timestamps", "expected 2 numbers"),
        (lambda ex: ex["conversation"][1]["content"][4].update(text=None), "conversation[1].content[4].text",
         "string 'text'"),
        (lambda ex: ex["conversation"][1]["content"][4].update(type="audio"), "conversation[1].content[4].type",
         "got 'audio'"),
        (lambda ex: ex["conversation"][2]["content"].append({"type": "image", "image": "x.png"}),
         "conversation[2].content[1].type", "only allowed in user turns, not in a assistant turn"),
    ],
)
def test_errors_name_the_row_and_the_field(mutate, field, problem) -> None:
    ex = ok_example()
    mutate(ex)
    with pytest.raises(ConversationError, match="^" + re.escape(f"{W}: {field}: ") + ".*" + re.escape(problem)):
        validate_conversation(ex, where=W)


def test_non_mapping_example() -> None:
    with pytest.raises(ConversationError, match=r"^row 1: example: expected a mapping"):
        validate_conversation([1, 2], where="row 1")
