"""The plugin manager: discovery through the ``nvl`` entry-point group, error isolation, registries.

A plugin that fails (its import raises, it implements a hook that does not exist, or its hook raises)
is recorded as ``failed`` with its error and never breaks the CLI or the other plugins, unless
``NVL_STRICT_PLUGINS=1`` asks for the error to be raised (for CI and plugin authors).

Environment:

``NVL_LOAD_PLUGINS``
    Comma-separated allowlist of distribution names; set but empty means no entry-point plugins.
``NVL_DISABLE_PLUGINS``
    Comma-separated blocklist of distribution (or entry-point) names.
``NVL_STRICT_PLUGINS=1``
    Raise instead of recording a failure.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import sys
import traceback
from typing import Any, Iterable, Mapping

import attrs
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
    return [normalize(x) for x in env[key].split(",") if x.strip()]


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
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    status: str = "loaded"
    error: str | None = None
    hooks: list[str] = attrs.field(factory=list)
    registered: dict[str, list[str]] = attrs.field(factory=dict)
    builtin: bool = False
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
        }


class PluginError(RuntimeError):
    """A plugin failed while ``NVL_STRICT_PLUGINS=1``."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
        self.strict = self.env.get("NVL_STRICT_PLUGINS", "") not in ("", "0", "false", "False")
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.registries: dict[str, Registry[Any]] = {kind: Registry(kind) for kind in REGISTRY_KINDS.values()}
        self._collected = False
        if builtins:
            for module_name in BUILTIN_PLUGINS:
                self._register_module(module_name, None, builtin=True)
        if entry_points:
            self._load_entry_points()
        for name, obj in plugins:
            self.add_plugin(obj, name=name)
        self._check_pending()

    # -- loading --------------------------------------------------------------------------------
    def _fail(self, info: PluginInfo, exc: BaseException) -> None:
        info.status = "failed"
        info.error = _one_line(exc)
        info.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if self.strict:
            raise PluginError(f"plugin {info.name!r} failed: {info.error}") from exc
        print(f"nvl: plugin {info.name!r} failed to load: {info.error}", file=sys.stderr)

    def _register_module(self, module_name: str, dist: md.Distribution | None, *, builtin: bool = False) -> None:
        info = PluginInfo(name=module_name, builtin=builtin)
        if dist is not None:
            info.distribution = dist.metadata["Name"]
            info.version = dist.version
        self.infos[module_name] = info
        try:
            module = importlib.import_module(module_name)
            self.pm.register(module, name=module_name)
        except Exception as exc:  # one broken plugin must not break the others
            self._fail(info, exc)

    def _load_entry_points(self) -> None:
        allow = _env_list(self.env, "NVL_LOAD_PLUGINS")
        block = set(_env_list(self.env, "NVL_DISABLE_PLUGINS") or [])
        seen: set[str] = set()
        for dist in md.distributions():
            eps = [ep for ep in dist.entry_points if ep.group == GROUP]
            if not eps:
                continue
            dist_name = dist.metadata["Name"]
            if dist_name is None or normalize(dist_name) in seen:
                continue  # the same distribution on sys.path twice: the first one wins, as for imports
            seen.add(normalize(dist_name))
            for ep in eps:
                blocked = normalize(dist_name) in block or normalize(ep.name) in block
                if allow is not None and normalize(dist_name) not in allow:
                    blocked = True
                if blocked:
                    self.infos[ep.name] = PluginInfo(
                        name=ep.name, distribution=dist_name, version=dist.version, status="blocked"
                    )
                    self.pm.set_blocked(ep.name)
                    continue
                if ep.name in self.infos:
                    prior = self.infos[ep.name]
                    info = PluginInfo(name=ep.name, distribution=dist_name, version=dist.version)
                    self.infos[f"{ep.name} ({dist_name})"] = info
                    self._fail(
                        info,
                        PluginError(f"entry point {ep.name!r} is already provided by {prior.distribution}"),
                    )
                    continue
                info = PluginInfo(name=ep.name, distribution=dist_name, version=dist.version)
                self.infos[ep.name] = info
                try:
                    self.pm.register(ep.load(), name=ep.name)
                except Exception as exc:
                    self._fail(info, exc)

    def add_plugin(self, obj: object, *, name: str | None = None) -> str:
        """Register an in-process plugin (a module or an object with hook functions).

        :param obj: the plugin.
        :param name: its name; defaults to the module's ``__name__``.
        """
        name = name or getattr(obj, "__name__", None) or repr(obj)
        info = PluginInfo(name=name)
        self.infos[name] = info
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:
            self._fail(info, exc)
        self._collected = False
        self._check_pending()
        return name

    def _check_pending(self) -> None:
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
                self.pm.unregister(exc.plugin)
                info = self.infos.setdefault(name, PluginInfo(name=name))
                self._fail(info, exc)

    # -- registries -----------------------------------------------------------------------------
    def collect(self) -> dict[str, Registry[Any]]:
        """Call every registration hook once per plugin, attributing what each registers."""
        if self._collected:
            return self.registries
        self._collected = True
        for hook_name, kind in REGISTRY_KINDS.items():
            registry = self.registries[kind]
            caller = getattr(self.pm.hook, hook_name)
            for impl in reversed(caller.get_hookimpls()):  # registration order, built-ins first
                name = impl.plugin_name
                info = self.infos.setdefault(name, PluginInfo(name=name))
                if info.status == "failed":
                    continue
                prov = Provenance(plugin=name, distribution=info.distribution, version=info.version)

                def register(n: str, target: Any, *, aliases: Any = (), _prov: Provenance = prov) -> None:
                    registry.add(n, target, aliases=aliases, provenance=_prov)

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as exc:
                    for reg in self.registries.values():
                        reg.remove_plugin(name)
                    self._fail(info, exc)
        for info in self.infos.values():
            if info.status == "loaded":
                plugin = self.pm.get_plugin(info.name)
                if plugin is not None:
                    info.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
                info.registered = {
                    kind: reg.by_plugin(info.name) for kind, reg in self.registries.items() if reg.by_plugin(info.name)
                }
        return self.registries

    def registry(self, kind: str) -> Registry[Any]:
        """The collected registry of one kind (``model_bridge``, ``dataset_maker``, ...)."""
        return self.collect()[kind]

    def plugin_infos(self, *, include_builtins: bool = False) -> list[PluginInfo]:
        self.collect()
        return sorted(
            (i for i in self.infos.values() if include_builtins or not i.builtin), key=lambda i: i.name
        )


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
