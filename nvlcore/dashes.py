"""Arguments that start with a dash-like character that is not ``-`` (an em dash from a word processor:
``—-hf-model-path``): how to recognise one and the one-line message that says what to type.

Shared by the CLI's spelling layer (:mod:`nvlcore.cli.spelling`) and the override parser
(:mod:`nvlcore.config.overrides`), so it sits on the bottom floor. Standard library only.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable

#: Characters that look like a hyphen-minus in documentation and chat: hyphen, non-breaking hyphen,
#: figure dash, en dash, em dash, horizontal bar, minus sign, small/full-width hyphen-minus, ...
DASH_LIKE = frozenset("\u2010\u2011\u2012\u2013\u2014\u2015\u2043\u2212\u2796\ufe58\ufe63\uff0d\u00ad")


_OPTIONISH = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*(=.*)?$", re.S)


def starts_with_dash_like(token: str) -> bool:
    """True if ``token`` begins with a dash-like character other than ``-`` and the rest reads like an
    option or an override (``—-hf-model-path``, ``–train.lr=1``); text such as a prompt that
    starts with a dash (``— what is this?``) is not one."""
    if not token or token[0] not in DASH_LIKE:
        return False
    return bool(_OPTIONISH.match(token.lstrip("".join(DASH_LIKE) + "-")))


def _dash_name(ch: str) -> str:
    try:
        return f"{unicodedata.name(ch).lower()} (U+{ord(ch):04X})"
    except ValueError:  # pragma: no cover - every DASH_LIKE character has a name
        return f"U+{ord(ch):04X}"


def dash_suggestion(token: str, known: Iterable[str] = ()) -> str:
    """What the user meant by ``token``: the leading dashes (any kind) replaced by ``--`` (or ``-``
    for a single short letter), the closest known option if ``known`` is given and the name is not one
    of them, or the bare override (``key=value``) when it contains ``=`` after a dotted key."""
    body = token.lstrip("".join(DASH_LIKE) + "-")
    key = body.split("=", 1)[0]
    if "=" in body and "." in key:
        return body  # an override typed with a dash in front
    known = sorted(set(known))
    candidate = ("-" if len(key) == 1 else "--") + body
    name = candidate.split("=", 1)[0]
    if known and name.replace("_", "-") not in known:
        close = difflib.get_close_matches(name.replace("_", "-"), known, n=1, cutoff=0.6)
        if close:
            return close[0] + candidate[len(name) :]
    return candidate


def dash_error(token: str, known: Iterable[str] = ()) -> str:
    """The one-line message for an argument that starts with a dash-like character."""
    return (
        f"{token!r} starts with {_dash_name(token[0])}, not the ASCII hyphen '-' (text copied from a "
        f"document or chat often has one): did you mean {dash_suggestion(token, known)}?"
    )
