"""``nvl config``: compose, check and explain run configs."""

from __future__ import annotations

from pathlib import Path

import click

from nvlcore.cli.options import CONFIG_CONTEXT_SETTINGS, OVERRIDES_HELP, config_options, echo_config, load_config_from_cli


@click.group("config")
def config_group() -> None:
    """Compose, check and explain run configs (YAML files + dotted overrides)."""


@config_group.command("show", context_settings=CONFIG_CONTEXT_SETTINGS, epilog=OVERRIDES_HELP)
@config_options(print_config=False)
@click.option("--check", is_flag=True, help="Also fail if a mandatory ('???') value is unset or a setting is unsupported.")
def show(config_files: tuple[Path, ...], overrides: tuple[str, ...], check: bool) -> None:
    """Print the resolved config as YAML: defaults <- config files <- OVERRIDES."""
    cfg = load_config_from_cli(config_files, overrides, resolve=check)
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
