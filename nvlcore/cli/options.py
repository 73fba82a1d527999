"""Shared click plumbing for commands that take a run config (``nvl config show``, ``nvl finetune``...).

Usage::

    @click.command("finetune", context_settings=CONFIG_CONTEXT_SETTINGS)
    @config_options()
    def finetune(config_files, print_config, overrides):
        cfg = load_config_from_cli(config_files, overrides, base=recipe, resolve=not print_config)
        if print_config:
            echo_config(cfg)
            return

``CONFIG_CONTEXT_SETTINGS`` lets values that start with ``-`` (``checkpoint.most_recent_k -1``) reach
the overrides; a mistyped option still fails, with the override parser's message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: Pass as ``context_settings=`` to a command decorated with :func:`config_options`.
CONFIG_CONTEXT_SETTINGS: dict[str, Any] = {"ignore_unknown_options": True}

OVERRIDES_HELP = (
    "OVERRIDES are dotted config keys with values, as KEY=VALUE or KEY VALUE, e.g. "
    "train.global_batch_size=8, dataset.maker_name make_raven_dataset, "
    "dataset.maker_kwargs '{\"video_root_path\":\"/data/videos\"}'; ~KEY resets a key to its default. "
    "See `nvl config keys` and docs/config.md."
)


def config_options(*, print_config: bool = True) -> Callable[[F], F]:
    """Add ``-c/--config-file`` (repeatable), ``--print-config`` and the ``OVERRIDES`` argument.

    The decorated function receives ``config_files: tuple[Path, ...]``, ``print_config: bool`` (when
    enabled) and ``overrides: tuple[str, ...]``.

    :param print_config: add the ``--print-config`` flag.
    """

    def decorate(f: F) -> F:
        f = click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[OVERRIDES]...")(f)
        if print_config:
            f = click.option(
                "--print-config", is_flag=True, help="Print the resolved config as YAML and exit."
            )(f)
        f = click.option(
            "--config-file",
            "-c",
            "config_files",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="YAML config file merged over the defaults; repeat to merge several in order.",
        )(f)
        return f

    return decorate


def load_config_from_cli(
    config_files: Sequence[Path],
    overrides: Sequence[str],
    *,
    base: Mapping[str, Any] | None = None,
    plugins: Any = None,
    resolve: bool = False,
) -> Any:
    """:func:`nvlcore.config.load_config` with config errors turned into click usage errors.

    :param plugins: the plugin manager whose registries validate plugin-owned keys (default: the
        running CLI's, see :func:`nvlcore.cli.current_plugin_manager`).
    :param resolve: also require every mandatory (``???``) value and supported settings
        (:func:`nvlcore.config.resolve_config`), as a run does.
    """
    from nvlcore.cli import current_plugin_manager
    from nvlcore.config import ConfigError, load_config, resolve_config

    if plugins is None:
        plugins = current_plugin_manager()
    try:
        cfg = load_config(list(config_files), list(overrides), base=base, plugins=plugins)
        if resolve:
            resolve_config(cfg)
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None
    return cfg


def echo_config(cfg: Any) -> None:
    """Print a config as YAML on stdout."""
    from nvlcore.config import config_to_yaml

    click.echo(config_to_yaml(cfg), nl=False)
