"""The ``nvl`` command line: built-in commands plus whatever plugins add."""

from __future__ import annotations

import sys
from typing import Any

import click

from nvlcore import __version__


class NvlGroup(click.Group):
    """A group whose built-in commands a plugin cannot replace."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.builtin_names: set[str] = set()
        self.current_plugin: str | None = None
        self.command_owner: dict[str, str] = {}

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        assert name is not None
        if self.current_plugin is not None:
            if name in self.builtin_names:
                click.echo(
                    f"nvl: plugin {self.current_plugin!r} tried to replace built-in command {name!r}; skipped",
                    err=True,
                )
                return
            if name in self.commands:
                click.echo(
                    f"nvl: plugin {self.current_plugin!r} tried to replace command {name!r} of plugin "
                    f"{self.command_owner.get(name)!r}; skipped",
                    err=True,
                )
                return
            self.command_owner[name] = self.current_plugin
        else:
            self.builtin_names.add(name)
        super().add_command(cmd, name)


def build_cli(manager: Any = None) -> NvlGroup:
    """Build the root ``nvl`` group: built-ins first, then each plugin's commands.

    :param manager: an :class:`nvlcore.plugins.NvlPluginManager`; defaults to the process-wide one.
    """
    from nvlcore.plugins import get_plugin_manager

    manager = manager or get_plugin_manager()

    @click.group(cls=NvlGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="nvl")
    def cli() -> None:
        """nvl: fine-tune and serve Nemotron Nano V2 VL, extended by plugins."""

    assert isinstance(cli, NvlGroup)
    from nvlcore.cli.generate import generate_cmd
    from nvlcore.cli.plugins_cmd import plugins_group

    cli.add_command(plugins_group)
    cli.add_command(generate_cmd)

    for impl in reversed(manager.pm.hook.nvl_register_commands.get_hookimpls()):
        cli.current_plugin = impl.plugin_name
        try:
            impl.function(cli=cli)
        except Exception as exc:
            info = manager.infos.get(impl.plugin_name)
            if manager.strict:
                raise
            if info is not None:
                info.status = "failed"
                info.error = f"{type(exc).__name__}: {exc}"
            click.echo(f"nvl: plugin {impl.plugin_name!r} failed to add commands: {exc}", err=True)
        finally:
            cli.current_plugin = None
    return cli


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    return build_cli()(args=argv, prog_name="nvl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
