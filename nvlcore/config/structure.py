"""Build typed attrs objects from plain mappings: unknown keys, wrong types and bad choices fail with
the full dotted key and a suggestion.

Used for the core sections and for plugin schemas (a dataset maker's ``Kwargs``, a PEFT method's
``Config``), so both give the same errors.
"""

from __future__ import annotations

import collections.abc as cabc
import difflib
import pathlib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union

import attrs

from nvlcore.config.schema import MISSING

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|Inf|INF|\.inf)$|^(nan|NaN|\.nan)$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config value or key is wrong. ``key`` is the full dotted key at fault (when there is one)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def is_missing(value: Any) -> bool:
    """Whether ``value`` is the mandatory marker ``"???"``."""
    return isinstance(value, str) and value == MISSING


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to ``word`` (difflib), or None."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of an attrs class (string annotations included); unresolvable ones are Any."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a plugin schema with an annotation we cannot evaluate: do not block on it
        hints: dict[str, Any] = {}
        for f in attrs.fields(cls):
            hints[f.name] = f.type if not isinstance(f.type, str) and f.type is not None else Any
        return hints


def type_name(tp: Any) -> str:
    """A short human name of a type annotation (``int``, ``list[str]``, ``'a' | 'b'``, ``int | null``)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) if a is not None else "null" for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if attrs.has(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _NoMatch(Exception):
    pass


_SEQUENCE_ORIGINS = (list, tuple, set, frozenset, cabc.Sequence, cabc.MutableSequence, cabc.Set, cabc.MutableSet)
_MAPPING_ORIGINS = (dict, cabc.Mapping, cabc.MutableMapping)


def _scalar(value: Any, tp: type, strict: bool) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _NoMatch
    if tp is int:
        if isinstance(value, bool):
            raise _NoMatch
        if isinstance(value, int):
            return value
        if not strict:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+", value.strip()):
                return int(value)
        raise _NoMatch
    if tp is float:
        if isinstance(value, bool):
            raise _NoMatch
        if isinstance(value, float):
            return value
        if isinstance(value, int):
            return float(value)
        if not strict and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value.strip().replace(".inf", "inf").replace(".nan", "nan"))
        raise _NoMatch
    if tp is str:
        if isinstance(value, str):
            return value
        if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _NoMatch
    if tp is pathlib.Path or (isinstance(tp, type) and issubclass(tp, pathlib.PurePath)):
        if isinstance(value, pathlib.PurePath):
            return value
        if isinstance(value, str):
            return tp(value)
        raise _NoMatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _NoMatch
    return value  # an annotation we do not understand (a TypeVar, a Protocol...): accept


def coerce(value: Any, tp: Any, key: str, *, strict: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where YAML/CLI text allows it.

    ``"2e-5"`` becomes a float for a float field, ``8`` stays an int, ``"true"`` becomes a bool, a single
    string becomes a one-item list for a list field. The marker ``"???"`` passes for any type.

    :raises ConfigError: naming ``key``, the expected type and the value.
    """
    if is_missing(value):
        return value
    try:
        return _coerce(value, tp, key, strict)
    except _NoMatch:
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}", key=key) from None


def _coerce(value: Any, tp: Any, key: str, strict: bool) -> Any:
    if tp is Any or tp is object:
        return value
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise _NoMatch
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        if isinstance(value, bool) and ("off" if not value else "on") in args:
            # YAML 1.1 reads a bare off/on (no/yes) as a bool: `train.memory_plan=off` means the choice "off"
            return "off" if not value else "on"
        choices = [a for a in args if isinstance(a, str)]
        close = suggest(str(value), choices) if isinstance(value, str) else None
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ConfigError(
            f"{key}: {value!r} is not one of {', '.join(repr(a) if a is not None else 'null' for a in args)}{hint}",
            key=key,
        )
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _NoMatch
        members = [a for a in args if a is not type(None)]
        literal_error: ConfigError | None = None
        for attempt_strict in ((True, False) if not strict else (True,)):
            for member in members:
                try:
                    return _coerce(value, member, key, attempt_strict)
                except _NoMatch:
                    continue
                except ConfigError as exc:  # a Literal member: keep its did-you-mean message
                    literal_error = literal_error or exc
        if literal_error is not None and len(members) == 1:
            raise literal_error
        raise _NoMatch
    if origin in _SEQUENCE_ORIGINS or tp in (list, tuple, set, frozenset):
        item = args[0] if args else Any
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [_coerce_item(v, item, f"{key}[{i}]", strict) for i, v in enumerate(value)]
        elif not strict and isinstance(value, str):
            items = [_coerce_item(value, item, f"{key}[0]", strict)]
        else:
            raise _NoMatch
        kind = origin or tp
        if kind in (tuple, set, frozenset):
            return kind(items)
        return items
    if origin in _MAPPING_ORIGINS or tp is dict:
        val_tp = args[1] if len(args) == 2 else Any
        if not isinstance(value, Mapping):
            raise _NoMatch
        return {k: _coerce_item(v, val_tp, join(key, str(k)), strict) for k, v in value.items()}
    if isinstance(tp, type) and attrs.has(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _NoMatch
        return build(tp, value, key)[0]
    return _scalar(value, tp, strict)


def _coerce_item(value: Any, tp: Any, key: str, strict: bool) -> Any:
    if is_missing(value):
        return value
    try:
        return _coerce(value, tp, key, strict)
    except _NoMatch:
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}", key=key) from None


def unknown_key_error(prefix: str, name: str, valid: Iterable[str], *,
                      elsewhere: Callable[[str], list[str]] | None = None) -> ConfigError:
    """The error for key ``prefix.name`` that is not in ``valid``, with a did-you-mean."""
    valid = sorted(valid)
    full = join(prefix, name)
    what = "section" if not prefix else "key"
    msg = f"{full}: unknown {what}"
    close = suggest(name, valid)
    if close is not None:
        msg += f" (did you mean {join(prefix, close)!r}?)"
    elif elsewhere is not None:
        others = elsewhere(name)
        if others:
            msg += f" (did you mean {' or '.join(repr(o) for o in others)}?)"
    msg += f"; valid {'sections' if not prefix else f'keys of {prefix!r}'}: {', '.join(valid)}"
    return ConfigError(msg, key=full)


def init_fields(cls: type) -> list[attrs.Attribute]:  # type: ignore[type-arg]
    return [f for f in attrs.fields(cls) if f.init]


def build(
    cls: type,
    data: Mapping[str, Any] | None,
    prefix: str,
    *,
    collect_unknown: bool = False,
    missing_required: str = "mark",
    elsewhere: Callable[[str], list[str]] | None = None,
    instantiate: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Build ``cls`` (an attrs class) from ``data``, checking every key and value.

    :param cls: the attrs class (a core section, a maker's ``Kwargs``, a PEFT method's ``Config``).
    :param data: the values given; missing fields take the class defaults.
    :param prefix: the dotted key of ``data`` (``"train"``, ``"dataset.maker_kwargs"``) for messages.
    :param collect_unknown: return unknown keys instead of failing on them.
    :param missing_required: a required field (no default) that is absent: ``"mark"`` sets it to
        ``"???"`` (reported when the config is resolved), ``"error"`` fails now.
    :param elsewhere: maps an unknown name to full keys of other sections that have it (suggestions).
    :param instantiate: create the instance (runs the class's own validators); with ``False`` the
        checked values are returned as a dict in place of the instance.
    :returns: ``(instance_or_values, unknown)``.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}", key=prefix)
    hints = type_hints(cls)
    fields = {f.name: f for f in init_fields(cls)}
    unknown: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str):
            raise ConfigError(f"{prefix}: keys must be strings, got {name!r}", key=prefix)
        if name not in fields:
            if collect_unknown:
                unknown[name] = value
                continue
            raise unknown_key_error(prefix, name, fields, elsewhere=elsewhere)
        values[name] = coerce(value, hints.get(name, Any), join(prefix, name))
    for name, f in fields.items():
        if name not in values and f.default is attrs.NOTHING:
            if missing_required == "error":
                raise ConfigError(f"{join(prefix, name)}: required, no default; set it", key=join(prefix, name))
            values[name] = MISSING
    if not instantiate:
        for name, f in fields.items():
            if name not in values:
                if isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
                    if not f.default.takes_self:  # type: ignore[union-attr]
                        values[name] = f.default.factory()  # type: ignore[union-attr]
                else:
                    values[name] = f.default
        return values, unknown
    kwargs = {fields[n].alias or n: v for n, v in values.items()}
    if any(is_missing(v) for v in values.values()):
        # the class's own validators would reject "???": build the defaults' instance and set the
        # values in directly; resolve_config() re-validates once everything is set
        obj = _instance_without_validation(cls, kwargs)
    else:
        try:
            obj = cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{prefix}: {exc}", key=prefix) from exc
    return obj, unknown


def _instance_without_validation(cls: type, kwargs: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    for f in attrs.fields(cls):
        init_name = f.alias or f.name
        if init_name in kwargs:
            value = kwargs[init_name]
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            value = f.default.factory(obj) if f.default.takes_self else f.default.factory()  # type: ignore[union-attr]
        elif f.default is not attrs.NOTHING:
            value = f.default
        else:
            value = MISSING
        object.__setattr__(obj, f.name, value)
    return obj
