"""What ``--hf-model`` / ``--hf-model-path`` / ``--hf-model-id`` name: a local directory or a Hugging Face
Hub id (the option itself, shared by every command that takes a model, is
:func:`nvlcore.cli.options.model_options`).

A value that is an existing directory is used as it is. Otherwise a value shaped like a Hub id
(``owner/model-name``) is resolved with ``huggingface_hub.snapshot_download``:
the local Hub cache first (``HF_HOME`` / ``HF_HUB_CACHE`` pick it), a download otherwise, and only the
cache with ``HF_HUB_OFFLINE=1``. ``--revision`` (a branch, tag or commit) pins the snapshot.
``huggingface_hub`` is imported only when a Hub id is resolved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: ``owner/name`` as the Hub spells repository ids (letters, digits, ``-``, ``_``, ``.``).
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HFConfigError(ValueError):
    """An HF model directory's ``config.json`` is missing or not a JSON object; the message names the file."""


class HubResolutionError(ValueError):
    """A value is neither a directory nor a Hub id the cache or the Hub can provide."""


def looks_like_hub_id(value: str) -> bool:
    return bool(HUB_ID_RE.match(value)) and ".." not in value and not value.endswith((".", "-"))


def resolve_hf_model(value: str | Path, *, revision: str | None = None, option: str = "--hf-model-path") -> Path:
    """A local directory for ``value``: the directory itself, or the Hub snapshot of the id.

    :param revision: branch, tag or commit of a Hub id (ignored, with an error, for a directory).
    :param option: the option name, for messages.
    :raises HubResolutionError: with one line saying what to type.
    """
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision:
            raise HubResolutionError(f"{option} {text} is a local directory; --revision applies to a Hub id only")
        return path
    if path.exists():
        raise HubResolutionError(f"{option} {text} is a file; give the model directory (with config.json) or a Hub id")
    if not looks_like_hub_id(text):
        raise HubResolutionError(
            f"{option} {text}: no such directory, and not a Hugging Face Hub id (owner/name; `nvl plugins list` "
            "shows the installed model plugins, whose docs name their models' ids)"
        )
    try:
        import huggingface_hub as hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise HubResolutionError(f"{option} {text}: resolving a Hub id needs huggingface_hub ({exc})") from None
    offline = _offline()
    try:
        local = hub.snapshot_download(text, revision=revision)
    except hub.errors.LocalEntryNotFoundError:
        where = f" at revision {revision!r}" if revision else ""
        if offline:
            raise HubResolutionError(
                f"{option} {text}: no such directory, and as a Hub id not in the Hugging Face cache{where} "
                f"({_cache_dir()}) while HF_HUB_OFFLINE is set; "
                f"download it first (`huggingface-cli download {text}`{' --revision ' + revision if revision else ''}) "
                "or unset HF_HUB_OFFLINE"
            ) from None
        raise HubResolutionError(
            f"{option} {text}: no such directory, and as a Hub id not in the Hugging Face cache{where} "
            f"({_cache_dir()}) and the Hub cannot be reached; check the path or the network"
        ) from None
    except (hub.errors.RepositoryNotFoundError, hub.errors.GatedRepoError) as exc:
        raise HubResolutionError(
            f"{option} {text}: no such directory, and the Hub refuses it as a repository id ({type(exc).__name__}); "
            "check the path or the id, and log in "
            "(`huggingface-cli login` or HF_TOKEN) for a gated or private model"
        ) from None
    except hub.errors.RevisionNotFoundError:
        raise HubResolutionError(f"{option} {text}: revision {revision!r} does not exist") from None
    except (HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubResolutionError(f"{option} {text}: cannot fetch from the Hugging Face Hub: {first}") from None
    return Path(local)


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return "the Hugging Face cache"


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """An HF directory's ``config.json`` as a dict, read as data (no remote code); errors name the file.

    The bridges (:func:`nvlcore.bridge.read_hf_config`) and the converter read it through this one reader.
    """
    import json

    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFConfigError(f"{Path(hf_dir)} has no config.json: an HF model directory (config.json, weights, "
                            "tokenizer) is needed")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: not a JSON object")
    return data
