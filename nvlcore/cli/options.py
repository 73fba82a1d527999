"""Shared click plumbing: the model options of every command that takes a model (:func:`model_options`)
and the ``-c/--print-config/OVERRIDES`` of commands that take a run config (``nvl config show``,
``nvl finetune``...).

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

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

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


#: The spellings of the one model option, in every command that takes a model (docs/cli.md).
MODEL_OPTION_NAMES: tuple[str, ...] = ("--hf-model-path", "--hf-model", "--hf-model-id")


def model_options(first: str = "--hf-model-path", *, name: str = "hf_model_path", required: bool = False,
                  help: str) -> Callable[[F], F]:
    """The options of every command that takes a model: one option spelled ``--hf-model-path``,
    ``--hf-model`` or ``--hf-model-id`` (a local directory or a Hugging Face Hub id, resolved to a local
    directory before the command runs: :func:`nvlcore.hub.resolve_hf_model`), and ``--revision``
    (alias ``--hf-revision``) for a Hub id. An error names the spelling the user typed.

    :param first: the spelling help shows (the original workflow's for the command).
    :param name: the command function's parameter that receives the directory (a ``Path`` or None).
    :param required: the command cannot run without a model.
    :param help: what the model is for in this command.
    """
    spellings = [first, *(n for n in MODEL_OPTION_NAMES if n != first)]

    def decorate(f: F) -> F:
        f = click.option(
            "--revision", "--hf-revision", "revision", default=None, is_eager=True, metavar="REV",
            help=f"Branch, tag or commit of a Hub id given to {first}.",
        )(f)
        return click.option(
            *spellings, name, required=required, default=None, callback=_resolve_model, metavar="DIR|HUB_ID",
            help=help + " A local directory or a Hugging Face Hub id (see --revision).",
        )(f)

    return decorate


def _resolve_model(ctx: click.Context, param: click.Parameter, value: Any) -> Path | None:
    """click callback of :func:`model_options`: a directory or a Hub id -> a local directory."""
    from nvlcore.cli.spelling import typed_spelling
    from nvlcore.hub import HubResolutionError, resolve_hf_model

    if value is None:
        return None
    option = typed_spelling(ctx, param) or param.opts[0]
    try:
        return resolve_hf_model(value, revision=ctx.params.get("revision"), option=option)
    except HubResolutionError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"{option} "), param_hint=option) from None


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
