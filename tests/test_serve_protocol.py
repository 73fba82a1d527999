"""``nvl serve``'s request checks and media, without a model: what is accepted, what is refused and
with which param; the endpoint client's messages read back by the server are the conversation it sent."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nvlcore.serve.client import base_url, conversation_to_messages
from nvlcore.serve.media import MediaResolver
from nvlcore.serve.protocol import RequestError, parse_chat_request

HI = [{"role": "user", "content": "Hi"}]


def parse(body, allowed=None):
    return parse_chat_request(body, MediaResolver(allowed).part)


def test_fields_acted_on_and_neutral_values() -> None:
    req = parse({"model": "m", "messages": [{"role": "developer", "content": "/no_think"}, *HI], "n": 1,
                 "logprobs": False, "presence_penalty": 0, "max_completion_tokens": 7, "max_tokens": 99,
                 "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 3, "stream": True,
                 "stream_options": {"include_usage": True}})
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (7, 0.5, 0.9, 0, 3)
    assert req.stream and req.include_usage and req.stop == ()
    assert parse({"messages": HI, "stop": "\n"}).stop == ("\n",)
    assert req.conversation["conversation"] == [{"role": "system", "content": [{"type": "text", "text": "/no_think"}]},
                                                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


@pytest.mark.parametrize("body, param", [
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HI, "stop": [""]}, "stop"),
    ({"messages": HI, "n": 3}, "n"),
    ({"messages": HI, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": HI, "temperature": True}, "temperature"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "top_k": 5}, "top_k"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, *HI]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png",
                                                                                      "detail": "high"}}]}]},
     "messages[0].content[0]"),
])
def test_refused_with_the_param_at_fault(body, param) -> None:
    with pytest.raises(RequestError) as info:
        parse(body)
    assert info.value.param == param and info.value.status == 400
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_local_files_only_under_the_allowed_directory(tmp_path) -> None:
    inside = tmp_path / "ok" / "a.png"
    inside.parent.mkdir()
    Image.new("RGB", (8, 8)).save(inside)
    part = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{inside}"}}]}]
    with pytest.raises(RequestError, match="--allowed-local-media-path"):
        parse({"messages": part})
    assert parse({"messages": part}, inside.parent).conversation["conversation"][0]["content"][0] == \
        {"type": "image", "image": str(inside)}
    escape = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{inside.parent}/../x.png"}}]}]
    with pytest.raises(RequestError, match="outside"):
        parse({"messages": escape}, inside.parent)


def test_client_messages_read_back_as_the_conversation(tmp_path) -> None:
    """Part for part: text as sent, a PIL image and an image file as pixel-equal images, a video as a file
    with the same bytes (removed by the server's cleanup)."""
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    png = tmp_path / "b.png"
    pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(png)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really a video, but bytes are bytes")
    conv = {"conversation": [
        {"role": "system", "content": [{"type": "text", "text": "/no_think"}]},
        {"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": "\nImage-2: "},
                                     {"type": "image", "image": str(png)}, {"type": "video", "path": str(video)},
                                     {"type": "text", "text": "Compare."}]}]}
    req = parse({"messages": conversation_to_messages(conv)})
    got = req.conversation["conversation"]
    assert got[0] == conv["conversation"][0] and [p["type"] for p in got[1]["content"]] == \
        ["image", "text", "image", "video", "text"]
    assert np.array_equal(np.asarray(got[1]["content"][0]["image"]), np.asarray(pil))
    assert np.array_equal(np.asarray(got[1]["content"][2]["image"]), np.asarray(Image.open(png)))
    sent = got[1]["content"][3]["path"]
    assert open(sent, "rb").read() == video.read_bytes() and req.cleanup == [sent]


def test_stop_strings_cut_and_hold_back() -> None:
    from nvlcore.serve.engine import first_stop, held_back

    assert first_stop("one two. three", ("three", ".")) == 7 and first_stop("abc", ("x",)) is None
    assert held_back("the end</", ("</s>",)) == 2 and held_back("the end<", ("</s>", "<|")) == 1
    assert held_back("done", ("</s>",)) == 0 and held_back("a", ("abc",)) == 1


def test_endpoint_urls() -> None:
    assert base_url("http://host:8000") == "http://host:8000/v1"
    assert base_url("http://host:8000/v1/") == "http://host:8000/v1"
    with pytest.raises(ValueError, match="--endpoint"):
        base_url("host:8000")
