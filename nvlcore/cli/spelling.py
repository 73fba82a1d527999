"""The original workflow's command lines, verbatim: option spellings and dash-like characters.

Every ``nvl`` command (built-in or a plugin's) is adopted by :func:`adopt` when the CLI is built, which
wraps its ``parse_args`` so that, before click parses:

* an option spelled with underscores (``--hf_model_path``, ``--max_new_tokens``, the original
  generate script's spelling) becomes the hyphenated option it names, when the command has one.
  The underscore spellings are hidden aliases: help shows only the hyphenated ones;
* a command can declare more hidden spellings in ``nvl_option_aliases`` (``{"--image-paths":
  "--image-path", "-tp": "--tp"}``) and spellings that take several values the original way
  (``nvl_nargs_options``: ``--image_paths a.png b.png`` -> ``--image-path a.png,b.png``);
* an argument that starts with a dash-like character that is not ``-`` (an em dash from a word
  processor: ``—-hf-model-path``) is refused with one line that says what to type.

Only the arguments before a bare ``--`` are looked at. Importing this module is cheap (click only).
"""

from __future__ import annotations

from typing import Any

import click

from nvlcore.dashes import dash_error, starts_with_dash_like

#: ``ctx.meta`` key: click parameter -> the spelling the user typed for it (see :func:`typed_spelling`).
TYPED_SPELLINGS_KEY = "nvl.typed_spellings"


def typed_spelling(ctx: click.Context | None, param: click.Parameter) -> str | None:
    """The spelling the user typed for ``param`` on this command line (``--hf-model`` where the option is
    also ``--hf-model-path``), so that an error names what the user wrote; None when not recorded."""
    if ctx is None:
        return None
    return ctx.meta.get(TYPED_SPELLINGS_KEY, {}).get(param)


def _long_options(cmd: click.Command, ctx: click.Context | None = None) -> dict[str, click.Parameter]:
    out: dict[str, click.Parameter] = {}
    for p in (cmd.get_params(ctx) if ctx is not None else cmd.params):
        for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]:
            if opt.startswith("-"):
                out[opt] = p
    return out


def normalize_args(cmd: click.Command, args: list[str], ctx: click.Context | None = None) -> list[str]:
    """``args`` with underscore spellings and declared aliases rewritten to the command's options.

    For a group only its own options are looked at: everything from the subcommand's name on is
    left to the subcommand. With ``ctx``, the options and aliases that plugins add to a core command
    (:class:`nvlcore.cli.plugin_options.PluginOptionsCommand`) count too.

    :raises click.UsageError: for an argument that starts with a dash-like character.
    """
    from nvlcore.cli.plugin_options import PluginOptionsCommand

    options = _long_options(cmd, ctx)
    aliases: dict[str, str] = dict(getattr(cmd, "nvl_option_aliases", {}) or {})
    if isinstance(cmd, PluginOptionsCommand):
        aliases.update(cmd.option_aliases(ctx))
    nargs_options: set[str] = set(getattr(cmd, "nvl_nargs_options", ()) or ())
    known = sorted(set(options) | set(aliases))
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            out.append(token)
            out.extend(args[i:])
            break
        if starts_with_dash_like(token):
            raise click.UsageError(dash_error(token, [k for k in known if k.startswith("--")]))
        if isinstance(cmd, click.Group) and not token.startswith("-"):
            out.append(token)
            out.extend(args[i:])
            break
        name, eq, value = token.partition("=")
        if name in aliases and not name.startswith("--"):  # a short spelling such as -tp
            out.append(aliases[name] + eq + value)
            continue
        short = options.get(token)
        if short is not None and not token.startswith("--") and isinstance(short, click.Option) \
                and not short.is_flag and not short.count and i < len(args):  # -c FILE: the value as it is
            out += [token, args[i]]
            i += 1
            continue
        if not token.startswith("--") or len(token) < 3:
            out.append(token)
            continue
        target = name
        hyphen = "--" + name[2:].replace("_", "-")
        if target not in options:
            target = aliases.get(name) or aliases.get(hyphen) or (hyphen if hyphen in options else name)
        param = options.get(target)
        if param is not None and ctx is not None:
            ctx.meta.setdefault(TYPED_SPELLINGS_KEY, {})[param] = name
        takes_value = (isinstance(param, click.Option) and not param.is_flag and not param.count and not eq
                       and not (name in nargs_options or hyphen in nargs_options))
        if takes_value and i < len(args):  # its value passes as it is (a prompt may start with a dash)
            out += [target, args[i]]
            i += 1
            continue
        if (name in nargs_options or hyphen in nargs_options) and not eq:
            values: list[str] = []
            while i < len(args) and not args[i].startswith("-") and not starts_with_dash_like(args[i]):
                values.append(args[i])
                i += 1
            out += [target, ",".join(values)] if values else [target]
            continue
        out.append(target + eq + value)
    return out


def adopt(cmd: click.Command) -> click.Command:
    """Make ``cmd`` (and, for a group, every subcommand) normalise its arguments; idempotent."""
    if not getattr(cmd, "_nvl_adopted", False):
        original = cmd.parse_args

        def parse_args(ctx: click.Context, args: list[str]) -> list[str]:
            return original(ctx, normalize_args(cmd, list(args), ctx))

        cmd.parse_args = parse_args  # type: ignore[method-assign]
        cmd._nvl_adopted = True  # type: ignore[attr-defined]
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            adopt(sub)
    return cmd


def declare_aliases(**options: Any) -> Any:
    """Decorator for a click command: ``nvl_option_aliases`` / ``nvl_nargs_options`` (see the module
    docstring); apply it on top of ``@click.command``."""

    def decorate(cmd: click.Command) -> click.Command:
        aliases = dict(getattr(cmd, "nvl_option_aliases", {}) or {})
        aliases.update(options.get("aliases", {}))
        cmd.nvl_option_aliases = aliases  # type: ignore[attr-defined]
        nargs = set(getattr(cmd, "nvl_nargs_options", ()) or ())
        nargs.update(options.get("nargs", ()))
        cmd.nvl_nargs_options = nargs  # type: ignore[attr-defined]
        return cmd

    return decorate
