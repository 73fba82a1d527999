"""Named, attributed, lazily imported registries.

Every extensible kind (model bridges, dataset makers, PEFT methods, exporters, metric loggers) has one
:class:`Registry`. Plugins fill them from their ``nvl_register_*`` hooks through a ``register``
callable that the plugin manager binds to the calling plugin, so every entry knows which plugin,
distribution and version it came from, and a clash can name both parties.
"""

from __future__ import annotations

import difflib
import importlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import attrs

T = TypeVar("T")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RegistryError(Exception):
    """Base class of registry errors."""


class DuplicateNameError(RegistryError):
    """A name (or alias) was registered twice."""


class UnknownNameError(RegistryError, KeyError):
    """A name that no installed plugin registered was asked for."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@attrs.frozen
class Provenance:
    """Who registered an entry.

    :param plugin: the plugin's name in the plugin manager (entry-point name or built-in module).
    :param distribution: the distribution that ships it (``None`` for in-process plugins).
    :param version: that distribution's version.
    """

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.distribution and self.version:
            return f"plugin {self.plugin!r} ({self.distribution} {self.version})"
        if self.distribution:
            return f"plugin {self.plugin!r} ({self.distribution})"
        return f"plugin {self.plugin!r}"


@attrs.define
class Entry(Generic[T]):
    """One registered object, possibly not imported yet.

    :param kind: the registry's kind, e.g. ``"dataset_maker"``.
    :param name: the canonical name users select it by.
    :param target: the object itself, or a ``"package.module:Attr"`` string imported on first use.
    :param aliases: other names that resolve to this entry.
    :param provenance: which plugin registered it.
    """

    kind: str
    name: str
    target: Any
    aliases: tuple[str, ...] = ()
    provenance: Provenance = Provenance("unknown")
    _loaded: Any = attrs.field(default=None, init=False, repr=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    @property
    def is_lazy(self) -> bool:
        return isinstance(self.target, str)

    def load(self) -> T:
        """Import (once) and return the registered object."""
        if not self.is_lazy:
            return self.target
        with self._lock:
            if self._loaded is None:
                self._loaded = import_target(self.target, what=f"{self.kind} {self.name!r}")
            return self._loaded


def import_target(spec: str, *, what: str = "target") -> Any:
    """Import ``"package.module:Attr.sub"`` and return the attribute.

    :param spec: the lazy target string.
    :param what: a description used in error messages.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise RegistryError(f"{what}: lazy target {spec!r} must look like 'package.module:Attribute'")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise RegistryError(f"{what}: module {module_name!r} has no attribute {attr_path!r}") from exc
    return obj


class Register(Protocol[T]):
    """The callable handed to ``nvl_register_*`` hooks."""

    def __call__(self, name: str, target: T | str, *, aliases: tuple[str, ...] | list[str] = ()) -> None: ...


class Registry(Generic[T]):
    """A string-keyed registry of one kind of extension.

    :param kind: what it holds, used in messages (``"model_bridge"``, ``"dataset_maker"``, ...).
    :param hint: what to tell a user who asks for an unknown name.
    """

    def __init__(self, kind: str, *, hint: str = "is the plugin installed? run `nvl plugins list`") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, Entry[T]] = {}
        self._alias_to_name: dict[str, str] = {}

    # -- registration ---------------------------------------------------------------------------
    def add(
        self,
        name: str,
        target: T | str,
        *,
        aliases: tuple[str, ...] | list[str] = (),
        provenance: Provenance | None = None,
    ) -> Entry[T]:
        """Add an entry; a name or alias already taken raises :class:`DuplicateNameError`.

        :param name: canonical name.
        :param target: the object, or a lazy ``"module:Attr"`` string.
        :param aliases: alternative names.
        :param provenance: who registers it.
        """
        provenance = provenance or Provenance("unknown")
        aliases = tuple(aliases)
        for key in (name, *aliases):
            if not isinstance(key, str) or not _NAME_RE.match(key):
                raise RegistryError(
                    f"{provenance.describe()}: invalid {self.kind} name {key!r} "
                    "(use letters, digits, '_', '-', '.')"
                )
            holder = self._owner_of(key)
            if holder is not None:
                raise DuplicateNameError(
                    f"{self.kind} {key!r} is registered by {holder.provenance.describe()} and by "
                    f"{provenance.describe()}; uninstall one or block it with NVL_DISABLE_PLUGINS"
                )
        if len(set((name, *aliases))) != 1 + len(aliases):
            raise RegistryError(f"{provenance.describe()}: {self.kind} {name!r} repeats a name in its aliases")
        entry: Entry[T] = Entry(kind=self.kind, name=name, target=target, aliases=aliases, provenance=provenance)
        self._entries[name] = entry
        for alias in aliases:
            self._alias_to_name[alias] = name
        return entry

    def _owner_of(self, key: str) -> Entry[T] | None:
        if key in self._entries:
            return self._entries[key]
        if key in self._alias_to_name:
            return self._entries[self._alias_to_name[key]]
        return None

    def clear(self) -> None:
        """Forget every entry (the plugin manager re-collects)."""
        self._entries.clear()
        self._alias_to_name.clear()

    def remove_plugin(self, plugin: str) -> None:
        """Forget every entry registered by ``plugin`` (used when its hook fails half-way)."""
        for name in [n for n, e in self._entries.items() if e.provenance.plugin == plugin]:
            entry = self._entries.pop(name)
            for alias in entry.aliases:
                self._alias_to_name.pop(alias, None)

    # -- lookup ---------------------------------------------------------------------------------
    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name`` or one of its aliases.

        :raises UnknownNameError: listing the known names and the closest match.
        """
        found = self._owner_of(name)
        if found is None:
            raise UnknownNameError(self._unknown_message(name))
        return found

    def get(self, name: str) -> T:
        """The (imported) object registered under ``name`` or one of its aliases."""
        return self.entry(name).load()

    def canonical(self, name: str) -> str:
        """Resolve an alias to its canonical name."""
        return self.entry(name).name

    def _unknown_message(self, name: str) -> str:
        known = self.all_keys()
        msg = f"unknown {self.kind} {name!r}"
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        if self._entries:
            listed = ", ".join(
                f"{e.name}" + (f" (aliases: {', '.join(e.aliases)})" if e.aliases else "")
                for e in sorted(self._entries.values(), key=lambda e: e.name)
            )
            msg += f"; known: {listed}"
        else:
            msg += f"; none are registered ({self.hint})"
        return msg

    def names(self) -> list[str]:
        """Canonical names, sorted."""
        return sorted(self._entries)

    def all_keys(self) -> list[str]:
        """Canonical names and aliases."""
        return sorted([*self._entries, *self._alias_to_name])

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def by_plugin(self, plugin: str) -> list[str]:
        return [n for n in self.names() if self._entries[n].provenance.plugin == plugin]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._owner_of(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


#: The kinds of registries the core knows, keyed by the hook that fills them.
REGISTRY_KINDS: dict[str, str] = {
    "nvl_register_model_bridges": "model_bridge",
    "nvl_register_dataset_makers": "dataset_maker",
    "nvl_register_peft_methods": "peft_method",
    "nvl_register_exporters": "exporter",
    "nvl_register_loggers": "logger",
    "nvl_register_command_options": "command_options",
}

RegisterFactory = Callable[[str], Register[Any]]
