"""Command-line overrides in every form the Megatron-Bridge workflow's documentation uses.

=======================================================  ===================================================
form                                                     meaning
=======================================================  ===================================================
``train.global_batch_size=8``                            set a value (value parsed as a YAML scalar)
``dataset.maker_name make_raven_dataset``                the same, key and value as two arguments
``dataset.maker_kwargs {"video_root_path":"/data/v"}``   a mapping value (JSON, YAML flow, or Hydra style)
``dataset.maker_kwargs={video_root_path:/data/v}``       what the shell leaves of ``{"video_root_path":$V}``
``'dataset.maker_kwargs={path:"/x"}'``                   quoted keys/values inside a flow mapping
``+key=value`` / ``++key=value``                         Hydra's add / force-add: the same as ``key=value``
                                                         (the schema decides which keys exist)
``~key``                                                 reset ``key`` to its default
=======================================================  ===================================================

Mapping values are merged into the existing mapping key by key (OmegaConf/Hydra merge semantics), so
``dataset.maker_kwargs={video_root_path:/v}`` keeps the ``subsets`` that a YAML file set.

Unquoted scalars follow YAML: ``8`` is an int, ``2e-5`` and ``1.5`` are floats, ``true``/``False`` are
bools, ``null``/``~`` is None, anything else is a string. Quote a value to keep it a string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import yaml

from nvlcore.config.structure import ConfigError
from nvlcore.dashes import DASH_LIKE, dash_error

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*$")
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


#: The value of a ``~key`` override: reset the key to its default.
DELETE: Any = _Delete()


class Override(NamedTuple):
    """One parsed override: a dotted key and its value (:data:`DELETE` for ``~key``)."""

    key: str
    value: Any


def parse_scalar(text: str) -> Any:
    """Parse an unquoted scalar as YAML does, with YAML 1.2 floats (``2e-5`` is a float, not a string)."""
    stripped = text.strip()
    if stripped == "":
        return ""
    if _FLOAT_RE.match(stripped) and not re.fullmatch(r"[-+]?\d+", stripped):
        return float(stripped)
    try:
        value = yaml.load(stripped, Loader=NvlYamlLoader)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        # not YAML, or YAML that names an impossible value (a date such as 2001-13-45): plain text
        return stripped
    if isinstance(value, (dict, list)):
        return stripped  # "a: b" or "- x" on the command line is text, not structure
    return value


class _FlowParser:
    """A small recursive-descent parser for flow values: ``{k: v, ...}``, ``[a, b]``, quoted strings.

    Unlike YAML it accepts ``{key:value}`` without a space after the colon (Hydra's grammar, and what
    the shell leaves of ``{"key":"value"}``) and values containing ``:`` such as paths and URLs.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> ConfigError:
        return ConfigError(f"cannot parse value {self.text!r}: {what} at position {self.pos}")

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> Any:
        self.ws()
        value = self.value(stops="")
        self.ws()
        if self.pos != len(self.text):
            raise self.error("unexpected text")
        return value

    def value(self, stops: str) -> Any:
        self.ws()
        c = self.peek()
        if c == "{":
            return self.mapping()
        if c == "[":
            return self.sequence()
        if c and c in "\"'":
            quoted = self.quoted()
            self.ws()
            if self.peek() and self.peek() not in stops:
                raise self.error("text after a quoted string")
            return quoted
        start = self.pos
        depth = 0
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in stops and depth == 0:
                break
            self.pos += 1
        return parse_scalar(self.text[start : self.pos])

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
                self.pos += 2
                continue
            if ch == quote:
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise self.error("unterminated string")

    def key(self) -> str:
        self.ws()
        if self.peek() and self.peek() in "\"'":
            name = self.quoted()
        else:
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] not in ":,}":
                self.pos += 1
            name = self.text[start : self.pos].strip()
        self.ws()
        if self.peek() != ":":
            raise self.error(f"expected ':' after key {name!r}")
        self.pos += 1
        if not name:
            raise self.error("empty key")
        return name

    def mapping(self) -> dict[str, Any]:
        self.pos += 1
        out: dict[str, Any] = {}
        self.ws()
        if self.peek() == "}":
            self.pos += 1
            return out
        while True:
            k = self.key()
            out[k] = self.value(stops=",}")
            self.ws()
            c = self.peek()
            self.pos += 1
            if c == "}":
                return out
            if c != ",":
                raise self.error("expected ',' or '}'")

    def sequence(self) -> list[Any]:
        self.pos += 1
        out: list[Any] = []
        self.ws()
        if self.peek() == "]":
            self.pos += 1
            return out
        while True:
            out.append(self.value(stops=",]"))
            self.ws()
            c = self.peek()
            self.pos += 1
            if c == "]":
                return out
            if c != ",":
                raise self.error("expected ',' or ']'")


def parse_value(text: str) -> Any:
    """Parse an override's value: a flow mapping/list, a quoted string, or a YAML scalar."""
    stripped = text.strip()
    if stripped[:1] in ("{", "[", '"', "'"):
        try:
            return _FlowParser(stripped).parse()
        except RecursionError:
            raise ConfigError(f"cannot parse value {stripped[:40]!r}...: nested too deeply") from None
    return parse_scalar(text)


def parse_overrides(argv: Sequence[str]) -> list[Override]:
    """Parse the command line's override arguments.

    :param argv: the arguments after the options, e.g. ``["train.global_batch_size=8",
        "dataset.maker_name", "make_raven_dataset"]``.
    :returns: one :class:`Override` ``(key, value)`` per override, in order.
    :raises ConfigError: for an argument that is neither ``KEY=VALUE`` nor ``KEY VALUE`` nor ``~KEY``.
    """
    out: list[Override] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token.startswith("~"):
            key = token[1:]
            if "=" in key:
                key = key.split("=", 1)[0]
            _check_key(key, token)
            out.append(Override(key, DELETE))
            continue
        if token[:1] in DASH_LIKE:
            raise ConfigError(dash_error(token))
        if token.startswith("-"):
            raise ConfigError(
                f"unknown option {token!r} (overrides look like KEY=VALUE or KEY VALUE; "
                "write a negative number as KEY=-1)"
            )
        body = token.lstrip("+") if token.startswith("+") and len(token) - len(token.lstrip("+")) <= 2 else token
        if "=" in body:
            key, _, raw = body.partition("=")
            _check_key(key, token)
            out.append(Override(key, parse_value(raw)))
            continue
        _check_key(body, token)
        if i >= len(argv):
            raise ConfigError(f"override {token!r} has no value: write {body}=VALUE or {body} VALUE", key=body)
        out.append(Override(body, parse_value(argv[i])))
        i += 1
    return out


def _check_key(key: str, token: str) -> None:
    if not _KEY_RE.match(key):
        raise ConfigError(
            f"cannot read override {token!r}: expected KEY=VALUE, KEY VALUE or ~KEY with a dotted KEY "
            "such as train.global_batch_size"
        )


class NvlYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``lr: 2e-5`` is a float (YAML 1.1 reads a string)."""


NvlYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)
