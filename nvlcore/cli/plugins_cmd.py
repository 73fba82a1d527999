"""``nvl plugins``: what is installed, what it registered, what failed."""

from __future__ import annotations

import json

import click


@click.group("plugins")
def plugins_group() -> None:
    """Inspect installed plugins."""


@plugins_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per plugin.")
@click.option("--all", "include_all", is_flag=True, help="Include the built-in plugins.")
def list_plugins(as_json: bool, include_all: bool) -> None:
    """List plugins with their status, hooks and registered names."""
    from nvlcore.plugins import get_plugin_manager

    infos = get_plugin_manager().plugin_infos(include_builtins=include_all)
    if as_json:
        click.echo(json.dumps([i.as_json() for i in infos], indent=2))
        return
    if not infos:
        click.echo("no plugins installed")
        return
    rows = [("NAME", "VERSION", "STATUS", "REGISTERED")]
    for i in infos:
        reg = "; ".join(f"{k}: {', '.join(v)}" for k, v in i.registered.items()) or (i.error or "-")
        rows.append((i.name, i.version or "-", i.status, reg))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
