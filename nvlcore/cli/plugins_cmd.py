"""``nvl plugins``: what is installed, what it registered, what failed; the hook reference."""

from __future__ import annotations

import json

import click


@click.group("plugins")
def plugins_group() -> None:
    """Inspect installed plugins and the hooks they can implement."""


@plugins_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per plugin.")
@click.option("--all", "include_all", is_flag=True, help="Include the built-in plugins.")
@click.option("--hook", "hooks", multiple=True, metavar="NAME",
              help="Only plugins implementing this hook (repeatable).")
@click.option(
    "--requirements", is_flag=True, help="Print loaded plugin distributions as NAME==VERSION lines (pip -r format)."
)
def list_plugins(as_json: bool, include_all: bool, hooks: tuple[str, ...], requirements: bool) -> None:
    """List plugins with their version, status (loaded/failed/blocked) and registered names.

    JSON objects have the keys name, distribution, version, status, error, hooks, registered
    (kind -> names), builtin and warnings. NVL_LOAD_PLUGINS / NVL_DISABLE_PLUGINS select plugins;
    NVL_STRICT_PLUGINS=1 turns a plugin failure into an error.
    """
    from nvlcore.cli import current_plugin_manager
    from nvlcore.plugins import hookspec_names

    known = hookspec_names()
    for hook in hooks:
        if hook not in known:
            import difflib

            close = difflib.get_close_matches(hook, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise click.UsageError(f"unknown hook {hook!r}{hint}; see `nvl plugins hooks`")
    manager = current_plugin_manager()
    infos = manager.plugin_infos(include_builtins=include_all)
    if hooks:
        infos = [i for i in infos if set(hooks) & set(i.hooks)]
    if requirements:
        pins = sorted({f"{i.distribution}=={i.version}" for i in infos if i.status == "loaded" and i.distribution
                       and i.version})
        for pin in pins:
            click.echo(pin)
        return
    if as_json:
        click.echo(json.dumps([i.as_json() for i in infos], indent=2))
        return
    for warning in manager.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not infos:
        click.echo("no plugins installed" + ("" if include_all else " (--all shows the built-in ones)"))
        return
    rows = [("NAME", "VERSION", "STATUS", "REGISTERED / ERROR")]
    for i in infos:
        if i.status == "failed":
            detail = i.error or "-"
        elif i.status == "blocked":
            detail = "blocked by NVL_LOAD_PLUGINS / NVL_DISABLE_PLUGINS"
        else:
            detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in i.registered.items())
            if not detail:
                detail = f"hooks: {', '.join(i.hooks)}" if i.hooks else "-"
        if i.warnings:
            detail += f" [warning: {'; '.join(i.warnings)}]"
        name = i.name if not i.builtin else f"{i.name} (built-in)"
        rows.append((name, i.version or "-", i.status, detail))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])


@plugins_group.command("hooks")
def list_hooks() -> None:
    """List the hooks a plugin can implement, with the first line of each one's documentation."""
    import inspect

    from nvlcore import hookspecs
    from nvlcore.plugins import hookspec_names

    names = hookspec_names()
    width = max(len(n) for n in names)
    for name in names:
        fn = getattr(hookspecs, name)
        args = ", ".join(inspect.signature(fn).parameters)
        doc = (inspect.getdoc(fn) or "").splitlines()[0] if inspect.getdoc(fn) else ""
        click.echo(f"{f'{name}({args})'.ljust(width + 12)}  {doc}")
