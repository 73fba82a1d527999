"""The ``nvl`` command line: built-in commands plus whatever plugins add.

Importing this module is cheap (click and the plugin manager only); each command imports what it
needs (torch, transformers...) when it runs, so ``nvl --help`` stays fast with every plugin installed.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from nvlcore import __version__
from nvlcore.flags import GLOBAL_FLAGS
from nvlcore.plugins import MANAGER_KEY  # the click context key of the running manager


class NvlGroup(click.Group):
    """A group whose built-in commands a plugin cannot replace."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.builtin_names: set[str] = set()
        self.current_plugin: str | None = None
        self.command_owner: dict[str, str] = {}
        #: ``(plugin, message)`` for every command a plugin tried to add and could not.
        self.clashes: list[tuple[str, str]] = []

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        assert name is not None
        if self.current_plugin is not None:
            message = None
            if name in self.builtin_names:
                message = f"tried to replace built-in command {name!r}; skipped"
            elif name in self.commands:
                message = f"tried to replace command {name!r} of plugin {self.command_owner.get(name)!r}; skipped"
            if message is not None:
                self.clashes.append((self.current_plugin, message))
                click.echo(f"nvl: plugin {self.current_plugin!r} {message}", err=True)
                return
            self.command_owner[name] = self.current_plugin
        else:
            self.builtin_names.add(name)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command with SIGINT/SIGTERM turned into a clean stop: one line, exit 130/143.

        Writers remove their temporary output on the way out (:mod:`nvlcore.interrupt`); no traceback.
        """
        from nvlcore import interrupt

        previous = interrupt.install()
        try:
            return super().invoke(ctx)
        except BaseException as exc:
            code = interrupt.exit_status(exc)
            if code is None:
                raise
            click.echo(interrupt.message(), err=True)
            raise SystemExit(code) from None
        finally:
            interrupt.restore(previous)


#: The built-in commands: name -> "module:attribute" (click objects, imported when the CLI is built).
BUILTIN_COMMANDS: dict[str, str] = {
    "config": "nvlcore.cli.config_cmd:config_group",
    "convert": "nvlcore.cli.convert:convert_group",
    "data": "nvlcore.cli.data_cmd:data_group",
    "eval": "nvlcore.cli.eval_cmd:eval_command",
    "export": "nvlcore.cli.export:export_command",
    "finetune": "nvlcore.cli.finetune:finetune_command",
    "generate": "nvlcore.cli.generate:generate_cmd",
    "plot": "nvlcore.cli.plot_cmd:plot_command",
    "plugins": "nvlcore.cli.plugins_cmd:plugins_group",
    "serve": "nvlcore.cli.serve:serve_command",
}


def current_plugin_manager() -> Any:
    """The plugin manager of the running ``nvl`` command (the one given to :func:`build_cli`).

    Commands should use this rather than :func:`nvlcore.plugins.get_plugin_manager`, so that a CLI
    built from a test's manager lists and uses that manager's plugins.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is not None and MANAGER_KEY in ctx.meta:
        return ctx.meta[MANAGER_KEY]
    from nvlcore.plugins import get_plugin_manager

    return get_plugin_manager()


def build_cli(manager: Any = None) -> NvlGroup:
    """Build the root ``nvl`` group: built-ins first, then each plugin's commands (in load order).

    A plugin whose ``nvl_register_commands`` raises is marked failed and the commands it added are
    removed; a command name that clashes with a built-in or an earlier plugin's is reported on stderr,
    recorded in that plugin's ``warnings`` and skipped.

    :param manager: an :class:`nvlcore.plugins.NvlPluginManager`; defaults to the process-wide one.
    """
    from nvlcore.plugins import get_plugin_manager
    from nvlcore.registry import import_target

    manager = manager or get_plugin_manager()

    @click.group(cls=NvlGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="nvl")
    @click.option("--debug", is_flag=True, help="Full tracebacks and debug logging (every command).")
    @click.option("--quiet", "-q", is_flag=True, help="Only results and errors: no progress bars or notes.")
    @click.option("--no-progress", is_flag=True, help="No progress bars (notes and results still print).")
    @click.pass_context
    def cli(ctx: click.Context, debug: bool, quiet: bool, no_progress: bool) -> None:
        """nvl: fine-tune and serve vision-language models, extended by plugins.

        `nvl plugins list` shows what is installed; docs/cli.md describes every command.
        The global options go before the command: `nvl --quiet generate ...`.
        """
        import os

        ctx.meta[MANAGER_KEY] = manager
        for name, value in (("debug", debug), ("quiet", quiet), ("no_progress", no_progress)):
            ctx.meta[f"nvl.{name}"] = value
            if value:  # worker processes (nvl finetune --nproc-per-node) inherit the environment
                var = GLOBAL_FLAGS[name]
                old = os.environ.get(var)
                os.environ[var] = "1"
                ctx.call_on_close(lambda var=var, old=old: os.environ.pop(var, None) if old is None
                                  else os.environ.__setitem__(var, old))
        if debug:
            import logging

            logging.basicConfig(level=logging.DEBUG)

    assert isinstance(cli, NvlGroup)
    for name, target in BUILTIN_COMMANDS.items():
        cli.add_command(import_target(target, what=f"built-in command {name!r}"), name)

    for plugin_name, impl in manager.command_plugins():
        cli.current_plugin = plugin_name
        before = set(cli.commands)
        clashes_before = len(cli.clashes)
        try:
            impl.function(**{arg: cli for arg in impl.argnames})
        except BaseException as exc:  # sys.exit() in a command hook fails that plugin, not the CLI
            if isinstance(exc, KeyboardInterrupt):
                raise
            for added in set(cli.commands) - before:
                cli.commands.pop(added)
                cli.command_owner.pop(added, None)
            info = manager.infos.get(plugin_name)
            if info is not None:
                manager._fail(info, exc)
            else:  # pragma: no cover - every hook implementation belongs to a known plugin
                raise
        finally:
            cli.current_plugin = None
        info = manager.infos.get(plugin_name)
        if info is not None:
            for _, message in cli.clashes[clashes_before:]:
                if message not in info.warnings:
                    info.warnings.append(message)
    from nvlcore.cli.spelling import adopt

    return adopt(cli)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    import warnings

    # megatron-core warns at import that Transformer Engine/Apex are absent; nvl uses only its
    # tensor-parallel layers, which need neither, so the warning would only alarm users.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
    return build_cli()(args=argv, prog_name="nvl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
