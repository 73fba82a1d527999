"""The OpenAI chat-completions request as ``nvl serve`` accepts it, checked field by field.

A request names only fields this server acts on; any other field is refused with a 400 that names it
(a field accepted and ignored would be a silent lie). Fields whose only supported value is the
default (``n: 1``, ``logprobs: false``, ``presence_penalty: 0`` ...) are accepted at that value.
Messages become a conversation in the project's schema (:mod:`nvlcore.data.schema`) with the media
resolved by :mod:`nvlcore.serve.media`; the model's own processor renders it, as in ``nvl generate``.

Importing this module is cheap (no web stack, no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Fields accepted only at the value that means "off" (what the decoder does anyway).
NEUTRAL_FIELDS: dict[str, Any] = {
    "n": 1, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0,
    "echo": False, "parallel_tool_calls": None, "tool_choice": "none",
}
ACTED_ON = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
            "temperature", "top_p", "top_k", "seed", "stop")
MAX_STOPS = 4  # OpenAI's limit
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the server refuses: the OpenAI error body's ``message``, ``param`` and ``code``.

    :param status: the HTTP status (400 unless another fits: 404 for an unknown model).
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked chat-completions request.

    :param conversation: the messages in the project's conversation schema (media resolved).
    :param max_tokens: ``max_completion_tokens`` or ``max_tokens``; None: the server's default.
    :param cleanup: temporary files (videos sent as data URLs) to remove once the prompt is prepared.
    """

    model: str | None
    conversation: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cleanup: list[str] = field(default_factory=list)


def _number(body: Mapping[str, Any], key: str, kind: type, lo: float, hi: float | None = None,
            lo_open: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=key)
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise RequestError(f"'{key}' must be {bound}, got {value!r}", param=key)
    return kind(value)


def _check_fields(body: Mapping[str, Any]) -> None:
    for key, value in body.items():
        if key in ACTED_ON:
            continue
        if key in NEUTRAL_FIELDS:
            if value is None or value == NEUTRAL_FIELDS[key]:
                continue
            raise RequestError(f"'{key}'={value!r} is not supported by nvl serve (only {NEUTRAL_FIELDS[key]!r})",
                               param=key, code="unsupported_parameter")
        raise RequestError(f"'{key}' is not supported by nvl serve (it accepts {', '.join(ACTED_ON)})", param=key,
                           code="unsupported_parameter")


def parse_chat_request(body: Any, resolve_part: Callable[[Mapping[str, Any], str, list[str]], dict[str, Any]]
                       ) -> ChatRequest:
    """Check a decoded JSON body and turn it into a :class:`ChatRequest`.

    :param resolve_part: ``(content part, param path, cleanup list) -> schema item`` for ``image_url`` and
        ``video_url`` parts (:meth:`nvlcore.serve.media.MediaResolver.part`).
    :raises RequestError: naming the field at fault.
    """
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise RequestError("'model' must be a string", param="model")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
        raise RequestError("'stream_options' may only hold include_usage", param="stream_options")
    if options and not stream:
        raise RequestError("'stream_options' needs 'stream': true", param="stream_options")
    tokens = [_number(body, k, int, 1) for k in ("max_completion_tokens", "max_tokens")]
    req = ChatRequest(model=body.get("model"), conversation={}, stream=stream,
                      include_usage=bool(options.get("include_usage")),
                      max_tokens=tokens[0] if tokens[0] is not None else tokens[1],
                      temperature=_or(_number(body, "temperature", float, 0.0, 2.0), 0.0),
                      top_p=_or(_number(body, "top_p", float, 0.0, 1.0, lo_open=True), 1.0),
                      top_k=_or(_number(body, "top_k", int, -1), 0), seed=_number(body, "seed", int, -(2**63)))
    req.top_k = max(req.top_k, 0)  # vLLM's -1 and 0 both mean "off"
    req.stop = _stops(body.get("stop"))
    if req.temperature == 0.0 and (req.top_p != 1.0 or req.top_k):
        raise RequestError("'top_p'/'top_k' apply when sampling: also give 'temperature' > 0",
                           param="top_p" if req.top_p != 1.0 else "top_k")
    try:
        req.conversation = {"conversation": _messages(body.get("messages"), resolve_part, req.cleanup)}
    except BaseException:
        remove_files(req.cleanup)
        raise
    return req


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    return tuple(stops)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _messages(messages: Any, resolve_part: Callable[..., dict[str, Any]], cleanup: list[str]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", param="messages")
    turns = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        extra = sorted(set(msg) - {"role", "content", "name"})
        if extra:
            raise RequestError(f"{where}.{extra[0]} is not supported by nvl serve", param=f"{where}.{extra[0]}",
                               code="unsupported_parameter")
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name of the system role
            role = "system"
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        content = _content(msg.get("content"), where, role, resolve_part, cleanup)
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "user":
        raise RequestError("the last message must be the user's (the server answers it)", param="messages")
    return turns


def _content(content: Any, where: str, role: str, resolve_part: Callable[..., dict[str, Any]],
             cleanup: list[str]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise RequestError(f"{where}.content must be a string or a non-empty list of parts", param=f"{where}.content")
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise RequestError(f"{at} must be {{'type': 'text', 'text': str}}", param=at)
            out.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            if role != "user":
                raise RequestError(f"{at}: images and videos go in user messages", param=at)
            out.append(resolve_part(part, at, cleanup))
        else:
            raise RequestError(f"{at}.type must be text, image_url or video_url, got {kind!r}", param=f"{at}.type")
    return out


def remove_files(paths: list[str]) -> None:
    """Remove temporary files (quietly: one already gone is fine)."""
    import os

    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass
    paths.clear()
