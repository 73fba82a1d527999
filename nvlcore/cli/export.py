"""``nvl export --format NAME``: write a trained checkpoint in another format through the exporter registry.

The command is a thin dispatcher: plugins register exporters (:class:`nvlcore.contracts.Exporter`)
with ``nvl_register_exporters``; ``nvl export --format NAME`` looks ``NAME`` up and calls
``exporter.export(checkpoint=..., hf_model_path=..., output=..., overwrite=..., plugin_manager=...,
**options)`` (``plugin_manager`` is the running CLI's, for exporters that need a model bridge).
``nvl export --list-formats`` shows what is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nvlcore.cli.options import model_options
from nvlcore.cli.plugin_options import PluginOptionsCommand


def _parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw else ""
    return out


@click.command("export", cls=PluginOptionsCommand)
@click.option("--format", "fmt", metavar="NAME", help="Exporter name (see --list-formats), e.g. hf-peft.")
@click.option(
    "--checkpoint",
    "--adapter-checkpoint",
    "--megatron-path",
    "--megatron-model-path",
    "checkpoint",
    type=click.Path(path_type=Path),
    help="The trained checkpoint: a base directory (latest iteration) or an iter_N directory.",
)
@model_options(help="The HF model the checkpoint was trained from (config, key names, tokenizer).")
@click.option("--output", "--hf-path", "output", type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Cast the exported tensors (the original export_adapter.py's --dtype; same as -O dtype=...).")
@click.option("--target", default=None, metavar="SERVER",
              help="The server the export is for, where the exporter makes one (hf-peft: vllm); same as -O target=.")
@click.option("--tp", "--pp", "--ep", "--etp", "_parallel", type=click.IntRange(min=1), multiple=True, hidden=True,
              help="Accepted for the original export_adapter.py command lines; checkpoints hold logical tensors.")
@click.option("--trust-remote-code", "--sequence-parallel", "_compat", is_flag=True, hidden=True,
              help="Accepted; unused.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option(
    "--option",
    "-O",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Exporter-specific setting (repeatable; VALUE is read as YAML), e.g. -O dtype=bfloat16.",
)
@click.option("--list-formats", is_flag=True, help="List the installed exporters and exit.")
def export_command(
    fmt: str | None,
    checkpoint: Path | None,
    hf_model_path: Path | None,
    revision: str | None,
    output: Path | None,
    dtype: str | None,
    target: str | None,
    _parallel: Any,
    _compat: bool,
    overwrite: bool,
    options: tuple[str, ...],
    list_formats: bool,
) -> None:
    """Export a trained checkpoint with a registered exporter (--format NAME).

    \b
    Example (an HF PEFT adapter from a PEFT run):
      nvl export --format hf-peft --checkpoint runs/peft/iter_0000200 \\
          --hf-model-path ckpts/hf --output my_adapter
      nvl export --format hf-peft --target vllm ...   (an adapter vllm serve loads as it is)
    """
    from nvlcore.cli import current_plugin_manager
    from nvlcore.registry import UnknownNameError

    manager = current_plugin_manager()
    registry = manager.registry("exporter")
    if list_formats:
        if not len(registry):
            click.echo("no exporters installed")
        for entry in registry.entries():
            name = entry.name
            alias = f" (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
            click.echo(f"{name}{alias}  [{entry.provenance.describe()}]")
        return
    missing = [flag for flag, v in (("--format", fmt), ("--checkpoint", checkpoint), ("--output", output)) if v is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (see nvl export --help)")
    assert fmt is not None and checkpoint is not None and output is not None
    try:
        factory = registry.get(fmt)
    except UnknownNameError as exc:
        raise click.UsageError(str(exc)) from None
    exporter = factory() if isinstance(factory, type) else factory
    extra = _parse_options(options)
    if dtype is not None:
        extra.setdefault("dtype", dtype)
    if target is not None:
        extra.setdefault("target", target)
    try:
        written = exporter.export(
            checkpoint=checkpoint,
            hf_model_path=hf_model_path,
            output=output,
            overwrite=overwrite,
            plugin_manager=manager,
            **extra,
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        from nvlcore.flags import global_flag

        if global_flag("debug"):  # nvl --debug export ...: the full traceback
            raise
        from nvlcore.cli.errors import one_line

        raise click.ClickException(one_line(exc)) from None
    click.echo(f"wrote {written}")
