"""The client side: a dataset split answered by any OpenAI-compatible server (``nvl eval --endpoint``).

Conversations in the project's schema become chat messages part for part (text parts as they are,
images and videos as data URLs, so the server needs no access to this machine's files), so a server
rendering them with the model's chat template sees the prompt in-process evaluation renders. The
answers become the same :class:`~nvlcore.eval.runner.EvalRecord` objects in-process generation gives,
scored by the same code. ``openai`` (the ``serve`` extra) is imported when a split is answered.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nvlcore.eval.runner import EvalError, EvalRecord, EvalSample


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_url(image: Any) -> str:
    """A PIL image (as lossless PNG) or an image file (its own bytes) as a data URL."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        return _data_url(path.read_bytes(), mime if mime.startswith("image/") else "image/png")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return _data_url(buf.getvalue(), "image/png")


def _part(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    kind = item.get("type")
    if kind == "text":
        return {"type": "text", "text": item.get("text", "")}
    if kind == "image" and item.get("image") is not None:
        return {"type": "image_url", "image_url": {"url": image_url(item["image"])}}
    if kind == "video" and item.get("path"):
        path = Path(item["path"])
        mime = mimetypes.guess_type(path.name)[0] or "video/mp4"
        return {"type": "video_url", "video_url": {"url": _data_url(path.read_bytes(), mime)}}
    raise EvalError(f"{where}: a {kind!r} item of this kind cannot be sent to an endpoint (images as PIL images or "
                    "files, videos as files)")


def conversation_to_messages(conversation: Mapping[str, Any], *, where: str = "sample") -> list[dict[str, Any]]:
    """OpenAI chat messages for a conversation of the project's schema, part for part."""
    messages = []
    for turn in conversation["conversation"]:
        content = turn.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else \
            [_part(item, where) for item in content or ()]
        messages.append({"role": turn["role"], "content": parts})
    return messages


def base_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1`` (a URL with a path is used as given)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EvalError(f"--endpoint {url}: give the server's URL, e.g. http://127.0.0.1:8000/v1")
    return url.rstrip("/") + "/v1" if parsed.path in ("", "/") else url.rstrip("/")


def open_endpoint(url: str, model: str | None = None) -> tuple[Any, str]:
    """An ``openai.OpenAI`` client for ``url`` and the model to ask (``model``, else the server's first).

    The API key is ``OPENAI_API_KEY`` when set (servers started without one accept anything).
    """
    try:
        import openai
    except ImportError:
        raise EvalError("--endpoint needs the openai package: pip install 'nvlcore[serve]'") from None
    client = openai.OpenAI(base_url=base_url(url), api_key=os.environ.get("OPENAI_API_KEY") or "nvl", max_retries=0)
    if model:
        return client, model
    try:
        served = [m.id for m in client.models.list()]
    except openai.APIError as exc:
        raise EvalError(f"--endpoint {url}: cannot list its models ({_api_message(exc)})") from None
    if not served:
        raise EvalError(f"--endpoint {url} serves no model; name one with --endpoint-model")
    return client, served[0]


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", None) or exc).splitlines()[0]


def _ask(client: Any, model: str, sample: EvalSample, options: Mapping[str, Any]) -> tuple[str, int, str]:
    import openai

    messages = conversation_to_messages(sample.prompt, where=f"sample {sample.id}")
    try:
        res = client.chat.completions.create(model=model, messages=messages, **options)
    except openai.APIError as exc:
        raise EvalError(f"sample {sample.id}: the endpoint answered with an error: {_api_message(exc)}") from None
    choice = res.choices[0]
    tokens = res.usage.completion_tokens if res.usage is not None else 0
    return choice.message.content or "", int(tokens), str(choice.finish_reason or "")


def endpoint_predictions(
    client: Any,
    model: str,
    samples: Sequence[EvalSample],
    *,
    max_new_tokens: int,
    sampling: Any = None,
    concurrency: int = 8,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[EvalRecord], dict[str, float]]:
    """Answer every sample through the endpoint, ``concurrency`` requests in flight (the server batches
    them); the records and timings :func:`nvlcore.eval.runner.generate_predictions` would return."""
    from concurrent.futures import ThreadPoolExecutor

    options: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": 0.0}
    if sampling is not None and not sampling.greedy:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.seed is not None:
            options["seed"] = sampling.seed
        if sampling.top_k:
            options["extra_body"] = {"top_k": sampling.top_k}  # vLLM's and nvl serve's extension
    t0 = time.perf_counter()
    answers: list[tuple[str, int, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for done, answer in enumerate(pool.map(lambda s: _ask(client, model, s, options), samples), 1):
            answers.append(answer)
            if progress is not None and (done % max(1, concurrency) == 0 or done == len(samples)):
                dt = time.perf_counter() - t0
                progress(f"nvl eval: {done}/{len(samples)} samples, {done / dt:.2f} samples/s")
    records = [EvalRecord(id=s.id, prediction=text.strip(), reference=s.reference, question=s.question, row=s.row,
                          num_tokens=tokens, finish_reason=reason)
               for s, (text, tokens, reason) in zip(samples, answers, strict=True)]
    generated = float(sum(a[1] for a in answers))
    return records, {"seconds": time.perf_counter() - t0, "generated_tokens": generated}
