"""Options that plugins add to core commands (``nvl_register_command_options``).

A core command that takes plugin options is a :class:`PluginOptionsCommand`: on every parse (and in
its ``--help``) it asks the running plugin manager for the :class:`CommandOptions` registered for it,
adds their click parameters after its own, and accepts their hidden spellings (``aliases``). What an
option means for the run config is the plugin's to say (:meth:`CommandOptions.recipe_options`,
:meth:`CommandOptions.overrides`); the core only passes the values along. So the core names no PEFT
method and no model: a PEFT plugin's recipe flags on ``nvl finetune`` are that plugin's options.

Importing this module is cheap (click, attrs and the registry only); a registered target is imported
when a command that takes its options is parsed, not by ``nvl --help``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import click


@attrs.frozen
class ConfigRequest:
    """What a plugin's options see when they are turned into config overrides.

    :param manager: the plugin manager of the command (its registries: ``peft_method``, ...).
    :param base: the model bridge's recipe (a nested mapping), already chosen with every plugin's
        :meth:`CommandOptions.recipe_options`.
    :param given: the command line's overrides, dotted key -> value (``{"peft.method": "dora"}``).
    :param config_files: the ``--config-file`` paths the user gave (not the bridge's default file).
    """

    manager: Any
    base: Mapping[str, Any]
    given: Mapping[str, Any]
    config_files: tuple[str, ...]


class CommandOptions:
    """Options one plugin adds to core commands, and what they mean for the run config.

    Register an instance (or a lazy ``"module:Attr"`` string naming one) with
    ``nvl_register_command_options``. Subclass and override what you need; every method has a
    do-nothing default. ``values`` is always this object's own parameters only: parameter name ->
    parsed value (``{"fast": True, ...}``).
    """

    #: The core commands these options join, by their path: ``"finetune"``, ``"config show"``.
    commands: ClassVar[tuple[str, ...]] = ()

    def aliases(self, command: str) -> Mapping[str, str]:
        """Hidden spellings of ``command``'s options (the core's or this object's), e.g. the old name of a
        renamed option: ``{"--old-name": "--new-name"}``. Help shows only the real names."""
        return {}

    def params(self, command: str) -> list[click.Parameter]:
        """The click options added to ``command`` (new objects each call; the core caches them).

        Their names must not clash with the command's own parameters or another plugin's.
        """
        return []

    def recipe_options(self, command: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the model bridge's ``recipe()`` (``{"peft": True}`` picks its PEFT recipe).

        Called before the recipe is built; the mappings of all plugins are merged.
        """
        return {}

    def overrides(self, command: str, values: Mapping[str, Any], request: ConfigRequest) -> list[Any]:
        """Config overrides that apply the options, after the recipe, the YAML files and the user's overrides.

        Each item is an :class:`nvlcore.config.Override` (not imported here: the config package reaches
        this module through the option spelling rules). An override of a key the user set on the command
        line should not be returned: the user's value wins. Raise :class:`click.UsageError` for a combination that
        cannot work.
        """
        return []


    def generator_options(self, command: str, values: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the model bridge's ``generator_for_model`` (``nvl generate``): the model's
        own generation options (a model plugin's ``--video-pruning-rate``). The mappings of all plugins are
        merged; the bridge refuses options it does not know.

        :param params: the command's own parameter values (``video_path``, ...), to check combinations;
            raise :class:`click.UsageError` for one that cannot work.
        """
        return {}


class PluginOptionError(click.ClickException):
    """A plugin's command options cannot be loaded or clash with another option."""


def _manager(ctx: click.Context | None) -> Any:
    from nvlcore.plugins import MANAGER_KEY, get_plugin_manager

    if ctx is not None and MANAGER_KEY in ctx.meta:
        return ctx.meta[MANAGER_KEY]
    return get_plugin_manager()


def command_options(manager: Any, command: str) -> list[tuple[Any, CommandOptions]]:
    """``(registry entry, CommandOptions)`` of every registered contribution to ``command``, in load order.

    A target that cannot be imported, or is not a :class:`CommandOptions`, is skipped with one line on
    stderr naming its plugin (recorded in the plugin's ``warnings``); with ``NVL_STRICT_PLUGINS=1`` it is
    an error instead.
    """
    registry = manager.registry("command_options")
    out = []
    for name in registry.names():
        entry = registry.entry(name)
        try:
            obj = entry.load()
            if isinstance(obj, type):
                obj = obj()
            if not isinstance(obj, CommandOptions):
                raise TypeError(f"{type(obj).__name__} is not a subclass of nvlcore.cli.plugin_options.CommandOptions")
        except Exception as exc:
            message = (f"command options {name!r} of {entry.provenance.describe()} cannot be used: "
                       f"{type(exc).__name__}: {exc}; its options are skipped (fix or disable that plugin: "
                       "NVL_DISABLE_PLUGINS)")
            if manager.strict:
                raise PluginOptionError(message) from exc
            info = manager.infos.get(entry.provenance.plugin)
            if info is not None and message not in info.warnings:
                info.warnings.append(message)
                click.echo(f"nvl: {message}", err=True)
            continue
        if command in tuple(obj.commands):
            out.append((entry, obj))
    return out


class PluginOptionsCommand(click.Command):
    """A core command whose parameters include the options plugins register for it.

    :param nvl_path: the command's path for :attr:`CommandOptions.commands` (``"config show"``);
        defaults to its name.
    """

    def __init__(self, *args: Any, nvl_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nvl_path = nvl_path or self.name or ""
        self._plugin_params: weakref.WeakKeyDictionary[Any, list[tuple[CommandOptions, list[click.Parameter]]]] = \
            weakref.WeakKeyDictionary()

    def plugin_params(self, ctx: click.Context | None = None) -> list[tuple[CommandOptions, list[click.Parameter]]]:
        """``(contribution, its parameters)`` for the running plugin manager (built once per manager)."""
        manager = _manager(ctx)
        try:
            return self._plugin_params[manager]
        except (KeyError, TypeError):
            pass
        taken = {p.name for p in self.params}
        out = []
        for entry, obj in command_options(manager, self.nvl_path):
            params = list(obj.params(self.nvl_path))
            for p in params:
                if p.name in taken:
                    raise PluginOptionError(
                        f"{entry.provenance.describe()} adds option {p.name!r} to `nvl {self.nvl_path}`, which "
                        "already has one of that name; rename it in the plugin or disable one plugin"
                    )
                taken.add(p.name)
            out.append((obj, params))
        try:
            self._plugin_params[manager] = out
        except TypeError:  # pragma: no cover - a manager that cannot be weakly referenced: no cache
            pass
        return out

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        extra = [p for _, ps in self.plugin_params(ctx) for p in ps]
        n = len(self.params)  # the command's own, then the help option: plugin options go between
        return [*params[:n], *extra, *params[n:]]

    def option_aliases(self, ctx: click.Context | None = None) -> dict[str, str]:
        """The hidden spellings the plugins declare for this command."""
        out: dict[str, str] = {}
        for obj, _ in self.plugin_params(ctx):
            out.update(obj.aliases(self.nvl_path))
        return out

    def split_values(self, params: dict[str, Any],
                     ctx: click.Context | None = None) -> list[tuple[CommandOptions, dict[str, Any]]]:
        """Remove the plugins' values from ``params`` (the callback's keyword arguments) and return them
        per contribution."""
        return [(obj, {p.name: params.pop(p.name, None) for p in ps if p.name})
                for obj, ps in self.plugin_params(ctx)]

    def given_options(self, ctx: click.Context) -> list[click.Parameter]:
        """The plugins' parameters the user gave (on the command line or through an environment variable)."""
        from click.core import ParameterSource

        return [p for _, ps in self.plugin_params(ctx) for p in ps
                if p.name and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT,
                                                                        ParameterSource.DEFAULT_MAP)]

    def plugin_argv(self, ctx: click.Context) -> list[str]:
        """The plugins' options the user gave, as command-line arguments again (for worker processes),
        each spelled with the option's first name."""
        argv: list[str] = []
        for p in self.given_options(ctx):
            if not isinstance(p, click.Option):
                continue
            value = ctx.params.get(p.name or "")
            flag = p.opts[0]
            if p.is_flag:
                if value is True or (p.flag_value is not True and value == p.flag_value):
                    argv.append(flag)
                elif p.secondary_opts:
                    argv.append(p.secondary_opts[0])
                continue
            if value is None:
                continue
            for item in (value if p.multiple else [value]):
                argv += [flag, *map(str, item)] if isinstance(item, (tuple, list)) else [flag, str(item)]
        return argv


__all__ = ["CommandOptions", "ConfigRequest", "PluginOptionError", "PluginOptionsCommand", "command_options"]
