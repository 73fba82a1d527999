"""``nvl config``: compose, check and explain run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nvlcore.cli.options import (
    CONFIG_CONTEXT_SETTINGS,
    OVERRIDES_HELP,
    config_options,
    echo_config,
    load_config_from_cli,
    model_options,
)
from nvlcore.cli.plugin_options import PluginOptionsCommand


@click.group("config")
def config_group() -> None:
    """Compose, check and explain run configs (YAML files + dotted overrides)."""


CORE_DEFAULTS_NOTE = (
    "# nvlcore's defaults (no --hf-model-path): `nvl finetune` starts from the model bridge's recipe "
    "instead;\n# `nvl config show --hf-model-path DIR` shows what finetune would run\n"
)


@config_group.command("show", cls=PluginOptionsCommand, nvl_path="config show",
                      context_settings=CONFIG_CONTEXT_SETTINGS,
                      epilog=OVERRIDES_HELP)
@config_options(print_config=False)
@click.option("--check", is_flag=True,
              help="Also fail if a mandatory ('???') value is unset or a setting is unsupported.")
@model_options(help="Show what `nvl finetune --hf-model-path DIR` would run: the model's recipe and default YAML.")
@click.pass_context
def show(ctx: click.Context, config_files: tuple[Path, ...], overrides: tuple[str, ...], check: bool,
         hf_model_path: Path | None, revision: str | None, **plugin_params: Any) -> None:
    """Print the resolved config as YAML: defaults <- config files <- OVERRIDES.

    With --hf-model-path the defaults are the model bridge's recipe and its default YAML file, exactly
    as `nvl finetune` composes them; without it they are nvlcore's own defaults (the output says so).
    Options that plugins add here (a PEFT plugin's recipe flags) mean what they mean for `nvl finetune`.
    """
    command = ctx.command
    assert isinstance(command, PluginOptionsCommand)
    plugin_values = command.split_values(plugin_params, ctx)
    if hf_model_path is None:
        given = [p.opts[0] for p in command.given_options(ctx) if isinstance(p, click.Option)]
        if given:
            raise click.UsageError(f"{', '.join(given)} select a model's recipe: also give --hf-model-path DIR")
        cfg = load_config_from_cli(config_files, overrides, resolve=check)
        click.echo(CORE_DEFAULTS_NOTE, nl=False)
        echo_config(cfg)
        return
    from nvlcore.cli import current_plugin_manager
    from nvlcore.cli.finetune import compose_config
    from nvlcore.config import ConfigError, resolve_config

    cfg, files = compose_config(
        manager=current_plugin_manager(), hf_model_path=hf_model_path, pretrained_checkpoint=None,
        config_files=config_files, overrides=overrides, plugin_values=plugin_values, command="config show",
    )
    if check:
        try:
            resolve_config(cfg)
        except ConfigError as exc:
            raise click.UsageError(f"config: {exc}") from None
    click.echo(f"# what `nvl finetune --hf-model-path {hf_model_path}` would run: the model's recipe"
               + (f" <- {', '.join(str(f) for f in files)}" if files else "") + " <- overrides")
    echo_config(cfg)


@config_group.command("keys")
@click.argument("section", required=False)
def keys(section: str | None) -> None:
    """List every config key with its type, default and meaning (optionally of one SECTION)."""
    from nvlcore.config import ALIASES
    from nvlcore.config.loader import schema_rows
    from nvlcore.config.structure import suggest

    rows = schema_rows()
    if section is not None:
        names = sorted({r[0].split(".")[0] for r in rows})
        if section not in names:
            close = suggest(section, names)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise click.UsageError(f"unknown section {section!r}{hint}; sections: {', '.join(names)}")
        rows = [r for r in rows if r[0].split(".")[0] == section]
    width = max(len(r[0]) for r in rows)
    for key, tp, default, help_text in rows:
        if default is None or isinstance(default, bool):
            shown = {None: "null", True: "true", False: "false"}[default]
        else:
            shown = repr(default)
        click.echo(f"{key.ljust(width)}  {tp}  = {shown}")
        if help_text:
            click.echo(f"{' ' * width}  {help_text}")
    if section is None:
        click.echo("\naliases (accepted, deprecated): " + ", ".join(f"{k} -> {v}" for k, v in ALIASES.items()))
