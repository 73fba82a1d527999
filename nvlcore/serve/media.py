"""Images and videos of a chat request: data URLs, ``file://`` URLs and local paths.

``image_url`` parts become PIL images (a data URL, decoded here so a damaged one is a 400 before the
request queues) or paths; ``video_url`` parts become paths (a data URL is written to a temporary file
the model's processor decodes, removed once the prompt is prepared). A local path or ``file://`` URL
is read only under ``--allowed-local-media-path`` (vLLM's option of the same name): a server must not
read any file its clients name. ``http(s)`` URLs are refused: the server fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from nvlcore.serve.protocol import RequestError

VIDEO_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov",
                  "video/x-msvideo": ".avi", "video/mpeg": ".mpeg"}


class MediaResolver:
    """Turns ``image_url`` / ``video_url`` content parts into conversation items.

    :param allowed_local_media_path: the directory local paths and ``file://`` URLs must lie under;
        None refuses them.
    """

    def __init__(self, allowed_local_media_path: str | os.PathLike[str] | None = None) -> None:
        self.allowed = Path(allowed_local_media_path).resolve() if allowed_local_media_path else None

    def part(self, part: Mapping[str, Any], at: str, cleanup: list[str]) -> dict[str, Any]:
        """The schema item for one content part (``at``: its place in the request, for errors)."""
        kind = part["type"]
        inner = part.get(kind)
        if isinstance(inner, str):  # some clients send the URL directly
            inner = {"url": inner}
        if set(part) - {"type", kind} or not isinstance(inner, Mapping) or not isinstance(inner.get("url"), str):
            raise RequestError(f"{at} must be {{'type': '{kind}', '{kind}': {{'url': str}}}}", param=at)
        detail = inner.get("detail")
        if set(inner) - {"url", "detail"} or (detail not in (None, "auto")) or (detail and kind != "image_url"):
            raise RequestError(f"{at}.{kind}: only 'url' (and image detail 'auto') are supported", param=at,
                               code="unsupported_parameter")
        url = inner["url"]
        if kind == "image_url":
            return {"type": "image", "image": self._image(url, at)}
        return {"type": "video", "path": self._video(url, at, cleanup)}

    def _image(self, url: str, at: str) -> Any:
        from PIL import Image

        if url.startswith("data:"):
            data = _data_url(url, at, "image/")
            import io

            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    return im.copy()
            except Exception as exc:
                raise RequestError(f"{at}: the data URL is not an image nvl can read ({type(exc).__name__})",
                                   param=at, code="invalid_image") from None
        path = self._local(url, at)
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as exc:
            raise RequestError(f"{at}: {path} is not an image nvl can read ({type(exc).__name__})", param=at,
                               code="invalid_image") from None
        return str(path)

    def _video(self, url: str, at: str, cleanup: list[str]) -> str:
        if not url.startswith("data:"):
            return str(self._local(url, at))
        mime = url[5:].split(";", 1)[0].split(",", 1)[0]
        data = _data_url(url, at, "video/")
        fd, name = tempfile.mkstemp(prefix="nvl-serve-", suffix=VIDEO_SUFFIXES.get(mime, ".mp4"))
        cleanup.append(name)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return name

    def _local(self, url: str, at: str) -> Path:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise RequestError(f"{at}: nvl serve fetches no URLs; send the file as a data URL (data:...;base64,...)",
                               param=at, code="unsupported_url")
        if parsed.scheme == "file":
            text = unquote(parsed.path)
        elif parsed.scheme and len(parsed.scheme) > 1:  # (a one-letter scheme is a Windows drive)
            raise RequestError(f"{at}: unsupported URL scheme {parsed.scheme!r}; use a data URL or a local path",
                               param=at, code="unsupported_url")
        else:
            text = url
        if self.allowed is None:
            raise RequestError(f"{at}: local files are refused; start nvl serve with --allowed-local-media-path DIR "
                               "or send a data URL", param=at, code="local_media_not_allowed")
        path = Path(text).expanduser().resolve()
        if not path.is_relative_to(self.allowed):
            raise RequestError(f"{at}: {text} is outside --allowed-local-media-path {self.allowed}", param=at,
                               code="local_media_not_allowed")
        if not path.is_file():
            raise RequestError(f"{at}: no such file {text}", param=at, code="file_not_found")
        return path


def _data_url(url: str, at: str, prefix: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64") or not head[5:].startswith(prefix):
        raise RequestError(f"{at}: a data URL must look like data:{prefix}...;base64,<data>", param=at)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{at}: the data URL's base64 payload does not decode", param=at) from None
