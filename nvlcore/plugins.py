"""The plugin manager: discovery through the ``nvl`` entry-point group, error isolation, registries.

A plugin that fails (its import raises, it implements a hook that does not exist or with arguments
the hook does not have, or one of its hooks raises) is recorded as ``failed`` with its error, its
partial registrations are removed, and it never breaks the CLI or the other plugins, unless
``NVL_STRICT_PLUGINS=1`` asks for the error to be raised (for CI and plugin authors).

Environment:

``NVL_LOAD_PLUGINS``
    Comma-separated allowlist of distribution names; set but empty means no entry-point plugins.
``NVL_DISABLE_PLUGINS``
    Comma-separated blocklist of distribution (or entry-point) names.
``NVL_STRICT_PLUGINS=1``
    Raise instead of recording a failure.

Order: built-in plugins first, then entry-point plugins sorted by distribution name, then in-process
plugins in the order they are added. Registration hooks run in that order, so on a duplicate name the
earlier plugin keeps it and the later one is marked failed with an error naming both.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: The key of ``click.Context.meta`` under which the running ``nvl`` command keeps its plugin manager.
MANAGER_KEY = "nvl.plugin_manager"
import pluggy

from nvlcore import hookspecs
from nvlcore.registry import REGISTRY_KINDS, Provenance, Registry

GROUP = hookspecs.PROJECT

#: Built-in plugins, registered exactly as an outside plugin would be.
BUILTIN_PLUGINS: tuple[str, ...] = ("nvlcore.builtin.loggers", "nvlcore.builtin.synthetic_vqa")


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_list(env: Mapping[str, str], key: str) -> list[str] | None:
    if key not in env:
        return None
    return [normalize(x.strip()) for x in env[key].split(",") if x.strip()]


def hookspec_names() -> list[str]:
    """The names of every hook specification, sorted."""
    return sorted(n for n in dir(hookspecs) if n.startswith(f"{GROUP}_") and callable(getattr(hookspecs, n)))


@attrs.define
class PluginInfo:
    """What ``nvl plugins list`` shows about one plugin.

    :param name: the plugin's name (entry-point name = module name, or the built-in module).
    :param distribution: the distribution that ships it.
    :param version: the distribution's version.
    :param status: ``loaded``, ``failed`` or ``blocked``.
    :param error: the failure, one line (``ImportError: ...``).
    :param hooks: the hooks it implements.
    :param registered: ``kind -> names`` it registered.
    :param builtin: shipped with nvlcore.
    :param warnings: problems that did not fail the plugin (a command name clash, say).
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    status: str = "loaded"
    error: str | None = None
    hooks: list[str] = attrs.field(factory=list)
    registered: dict[str, list[str]] = attrs.field(factory=dict)
    builtin: bool = False
    warnings: list[str] = attrs.field(factory=list)
    traceback: str | None = attrs.field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "hooks": list(self.hooks),
            "registered": {k: list(v) for k, v in self.registered.items()},
            "builtin": self.builtin,
            "warnings": list(self.warnings),
        }


class PluginError(RuntimeError):
    """A plugin failed while ``NVL_STRICT_PLUGINS=1``."""


def _plugin_fault(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a plugin, fails that plugin: anything but a user's Ctrl-C.

    ``SystemExit`` (a plugin calling ``sys.exit()`` at import or in a hook) and other ``BaseException``
    subclasses are faults of that plugin; they must not take the CLI or the other plugins down.
    """
    return not isinstance(exc, KeyboardInterrupt)


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(exc).__name__}: {text}".rstrip(": ")


class NvlPluginManager:
    """The loaded plugins and the registries they filled.

    :param env: environment to read ``NVL_*`` settings from (default ``os.environ``).
    :param entry_points: load plugins from installed distributions.
    :param builtins: register the built-in plugins.
    :param plugins: extra in-process plugin objects (modules or objects with hook functions), as
        ``(name, obj)`` pairs; tests use this.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        entry_points: bool = True,
        builtins: bool = True,
        plugins: Iterable[tuple[str, object]] = (),
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        self.strict = self.env.get("NVL_STRICT_PLUGINS", "").strip().lower() not in ("", "0", "false", "no")
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        #: Problems with the plugin set itself (an allowlisted distribution that is not installed).
        self.warnings: list[str] = []
        self.registries: dict[str, Registry[Any]] = {kind: Registry(kind) for kind in REGISTRY_KINDS.values()}
        self._collected = False
        if builtins:
            for module_name in BUILTIN_PLUGINS:
                self._register_module(module_name, None, builtin=True)
        if entry_points:
            self._load_entry_points()
        for name, obj in plugins:
            self.add_plugin(obj, name=name)

    # -- loading --------------------------------------------------------------------------------
    def _fail(self, info: PluginInfo, exc: BaseException) -> None:
        info.status = "failed"
        info.error = _one_line(exc)
        info.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        plugin = self.pm.get_plugin(info.name)
        if plugin is not None:  # a failed plugin's hooks must never run again
            self.pm.unregister(plugin, name=info.name)
        for registry in self.registries.values():
            registry.remove_plugin(info.name)
        if self.strict:
            raise PluginError(f"plugin {info.name!r} failed: {info.error}") from exc
        print(f"nvl: plugin {info.name!r} failed: {info.error}", file=sys.stderr)

    def _register(self, info: PluginInfo, obj: object) -> None:
        """Register ``obj`` under ``info.name``, checking its hooks; failures are recorded on ``info``."""
        try:
            self.pm.register(obj, name=info.name)
            self._check_hooks(info, obj)
        except BaseException as exc:  # one broken plugin must not break the others
            if not _plugin_fault(exc):
                raise
            self._fail(info, exc)
            return
        info.hooks = sorted({h.name for h in self.pm.get_hookcallers(obj) or []})

    def _check_hooks(self, info: PluginInfo, obj: object) -> None:
        known = hookspec_names()
        for caller in self.pm.get_hookcallers(obj) or []:
            if not caller.has_spec():
                close = difflib.get_close_matches(caller.name, known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise pluggy.PluginValidationError(
                    obj, f"unknown hook {caller.name!r} in plugin {info.name!r}{hint}; hooks: {', '.join(known)}"
                )
        # a hook-named function without @hookimpl is silently ignored by pluggy: say so
        for name in known:
            fn = getattr(obj, name, None)
            if callable(fn) and self.pm.parse_hookimpl_opts(obj, name) is None:
                info.warnings.append(f"{name} is not decorated with @nvlcore.hookimpl and is ignored")
                print(f"nvl: plugin {info.name!r}: {info.warnings[-1]}", file=sys.stderr)

    def _register_module(self, module_name: str, dist: md.Distribution | None, *, builtin: bool = False) -> None:
        info = PluginInfo(name=module_name, builtin=builtin)
        if dist is not None:
            info.distribution = dist.metadata["Name"]
            info.version = dist.version
        self.infos[module_name] = info
        try:
            module = importlib.import_module(module_name)
        except BaseException as exc:
            if not _plugin_fault(exc):
                raise
            self._fail(info, exc)
            return
        self._register(info, module)

    def _load_entry_points(self) -> None:
        allow = _env_list(self.env, "NVL_LOAD_PLUGINS")
        block = set(_env_list(self.env, "NVL_DISABLE_PLUGINS") or [])
        seen: dict[str, md.Distribution] = {}
        for dist in md.distributions():
            dist_name = dist.metadata["Name"]
            if not dist_name or normalize(dist_name) in seen:
                continue  # the same distribution on sys.path twice: the first one wins, as for imports
            if any(ep.group == GROUP for ep in dist.entry_points):
                seen[normalize(dist_name)] = dist
        if allow is not None:
            for name in allow:
                if name not in seen:
                    self.warnings.append(f"NVL_LOAD_PLUGINS names {name!r}, which is not an installed nvl plugin")
                    print(f"nvl: {self.warnings[-1]}", file=sys.stderr)
        for key in sorted(seen):
            dist = seen[key]
            dist_name = dist.metadata["Name"]
            for ep in sorted((ep for ep in dist.entry_points if ep.group == GROUP), key=lambda e: e.name):
                blocked = key in block or normalize(ep.name) in block or (allow is not None and key not in allow)
                if blocked:
                    self.infos[ep.name] = PluginInfo(
                        name=ep.name, distribution=dist_name, version=dist.version, status="blocked"
                    )
                    self.pm.set_blocked(ep.name)
                    continue
                if ep.name in self.infos:
                    prior = self.infos[ep.name]
                    info = PluginInfo(name=f"{ep.name} ({dist_name})", distribution=dist_name, version=dist.version)
                    self.infos[info.name] = info
                    self._fail(
                        info,
                        PluginError(
                            f"entry point {ep.name!r} is already provided by {prior.distribution or 'nvlcore'}"
                        ),
                    )
                    continue
                info = PluginInfo(name=ep.name, distribution=dist_name, version=dist.version)
                self.infos[ep.name] = info
                try:
                    obj = ep.load()
                except BaseException as exc:  # SystemExit at import included: the plugin fails, not the CLI
                    if not _plugin_fault(exc):
                        raise
                    self._fail(info, exc)
                    continue
                self._register(info, obj)
        self._collected = False

    def add_plugin(self, obj: object, *, name: str | None = None) -> str:
        """Register an in-process plugin (a module or an object with hook functions).

        :param obj: the plugin.
        :param name: its name; defaults to the module's ``__name__`` (or the object's class name).
        :returns: the name it was registered under (failures are recorded, see :meth:`plugin_infos`).
        """
        name = name or getattr(obj, "__name__", None) or type(obj).__name__
        if name in self.infos:
            raise ValueError(f"a plugin named {name!r} is already registered")
        info = PluginInfo(name=name)
        self.infos[name] = info
        self._register(info, obj)
        self._collected = False
        return name

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin and forget what it registered (tests use this)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)
        self.infos.pop(name, None)
        for registry in self.registries.values():
            registry.remove_plugin(name)
        self._collected = False

    # -- registries -----------------------------------------------------------------------------
    def collect(self) -> dict[str, Registry[Any]]:
        """Call every registration hook once per plugin, attributing what each registers.

        Plugins run in load order (built-ins first); a hook that raises marks its plugin failed and
        removes everything that plugin registered.
        """
        if self._collected:
            return self.registries
        self._collected = True
        for registry in self.registries.values():
            registry.clear()
        for hook_name, kind in REGISTRY_KINDS.items():
            registry = self.registries[kind]
            caller = getattr(self.pm.hook, hook_name)
            for impl in self._in_load_order(caller.get_hookimpls()):
                name = impl.plugin_name
                info = self.infos.setdefault(name, PluginInfo(name=name))
                if info.status != "loaded":
                    continue
                prov = Provenance(plugin=name, distribution=info.distribution, version=info.version)

                def register(n: str, target: Any, *, aliases: Any = (), _prov: Provenance = prov,
                             _registry: Any = registry) -> None:
                    _registry.add(n, target, aliases=aliases, provenance=_prov)

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except BaseException as exc:
                    if not _plugin_fault(exc):
                        raise
                    self._fail(info, exc)
        for info in self.infos.values():
            info.registered = {
                kind: reg.by_plugin(info.name) for kind, reg in self.registries.items() if reg.by_plugin(info.name)
            }
        return self.registries

    def _in_load_order(self, impls: list[Any]) -> list[Any]:
        order = {name: i for i, name in enumerate(self.infos)}
        return sorted(impls, key=lambda impl: order.get(impl.plugin_name, len(order)))

    def registry(self, kind: str) -> Registry[Any]:
        """The collected registry of one kind (``model_bridge``, ``dataset_maker``, ...)."""
        registries = self.collect()
        if kind not in registries:
            close = difflib.get_close_matches(kind, list(registries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown registry kind {kind!r}{hint}; kinds: {', '.join(registries)}")
        return registries[kind]

    def plugin_infos(self, *, include_builtins: bool = False) -> list[PluginInfo]:
        """Every plugin (loaded, failed or blocked), sorted by name; built-ins only if asked."""
        self.collect()
        return sorted((i for i in self.infos.values() if include_builtins or not i.builtin), key=lambda i: i.name)

    def command_plugins(self) -> list[tuple[str, Any]]:
        """``(plugin name, hook function)`` of every loaded plugin's ``nvl_register_commands``, in load order."""
        self.collect()
        out = []
        for impl in self._in_load_order(self.pm.hook.nvl_register_commands.get_hookimpls()):
            info = self.infos.get(impl.plugin_name)
            if info is None or info.status == "loaded":
                out.append((impl.plugin_name, impl))
        return out


_MANAGER: NvlPluginManager | None = None


def get_plugin_manager() -> NvlPluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = NvlPluginManager()
    return _MANAGER


def set_plugin_manager(manager: NvlPluginManager | None) -> NvlPluginManager | None:
    """Replace the process-wide manager (tests); returns the previous one."""
    global _MANAGER
    previous, _MANAGER = _MANAGER, manager
    return previous


def get_registry(kind: str) -> Registry[Any]:
    """Shortcut for ``get_plugin_manager().registry(kind)``."""
    return get_plugin_manager().registry(kind)
