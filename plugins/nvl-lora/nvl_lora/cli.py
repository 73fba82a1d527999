"""``nvl peft``: commands of the LoRA plugin (torch is imported only when a command runs)."""

from __future__ import annotations

from pathlib import Path

import click

from nvlcore.cli.options import model_options


@click.group("peft")
def peft_group() -> None:
    """Parameter-efficient fine-tuning: merge LoRA adapters into their base."""


@peft_group.command("merge")
@model_options(required=True, help="The HF model of the base (config.json: picks the bridge and its weight mapping).")
@click.option("--lora-checkpoint", "--adapter-checkpoint", "lora_checkpoint", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The LoRA/DoRA run's checkpoint: its base directory (latest iteration) or an iter_N directory.")
@click.option("--output", "--hf-path", "output", required=True, type=click.Path(path_type=Path),
              help="Directory to write.")
@click.option("--pretrained", "--pretrained-checkpoint", "--megatron-path", "--megatron-model-path", "pretrained",
              type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Base checkpoint (nvl checkpoint or HF directory). Default: checkpoint.pretrained_checkpoint "
                   "recorded in the LoRA run's run_config.yaml.")
@click.option("--format", "fmt", type=click.Choice(["megatron", "hf"]), default="megatron", show_default=True,
              help="megatron: a merged nvl (Megatron-layout) checkpoint; hf: a merged HF model directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@click.option("--tp", "--pp", "--ep", "_parallel", type=int, multiple=True, hidden=True,
              help="Accepted for Megatron-Bridge's merge_lora.py command lines; merging works on logical tensors.")
@click.option("--cpu", "_cpu", is_flag=True, hidden=True,
              help="Accepted for compatibility; merging always runs on CPU.")
@click.option("--debug", "_debug", is_flag=True, hidden=True,
              help="Show the full traceback of an error (also nvl --debug).")
def merge_cmd(hf_model_path: Path, revision: str | None, lora_checkpoint: Path, output: Path, pretrained: Path | None,
              fmt: str,
              overwrite: bool, _parallel: tuple[int, ...], _cpu: bool, _debug: bool) -> None:
    """Merge LoRA adapters into their base weights: W + (alpha/r)·B·A, in fp32, cast back to W's dtype.

    \b
    Example:
      nvl peft merge --hf-model-path ckpts/hf --lora-checkpoint runs/lora/iter_0000200 --output merged
      nvl peft merge ... --format hf --output merged_hf
    """
    from nvl_lora.merge import MergeError
    from nvl_lora.merge_io import merge_checkpoints
    from nvlcore.cli import current_plugin_manager

    try:
        summary = merge_checkpoints(
            hf_model_path=hf_model_path,
            lora_checkpoint=lora_checkpoint,
            output=output,
            pretrained=pretrained,
            fmt=fmt,
            overwrite=overwrite,
            plugin_manager=current_plugin_manager(),
            say=lambda s: click.echo(s, err=True),
        )
    except (MergeError, FileNotFoundError, FileExistsError, KeyError, ValueError) as exc:
        from nvlcore.flags import global_flag

        if _debug or global_flag("debug"):
            raise
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    click.echo(summary.describe())
