"""``nvl convert import|export``: HF <-> nvl checkpoints (Megatron-Bridge's convert_checkpoints.py).

The bridge is picked from the HF config's ``architectures`` through the ``model_bridge`` registry
(or named with ``--bridge``) by :func:`nvlcore.bridge.resolve_bridge`; heavy imports happen only when
a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from nvlcore.bridge import resolve_bridge
from nvlcore.cli.options import model_options
from nvlcore.cli.spelling import declare_aliases

#: The original scripts' short spellings (scripts/conversion/convert.sh: -tp/-pp/-ep/-etp).
CONVERT_ALIASES = {"-tp": "--tp", "-pp": "--pp", "-ep": "--ep", "-etp": "--etp"}

DTYPES = ("bfloat16", "float16", "float32")


def _run(fn: Any, summary_json: str | None) -> None:
    from nvlcore.checkpoint import (
        CheckpointCorruptError,
        CheckpointNotFoundError,
        CheckpointSaveError,
        MegatronBridgeError,
        OutputExistsError,
    )
    from nvlcore.convert.engine import ConversionError
    from nvlcore.convert.safetensors_io import SafetensorsError
    from nvlcore.registry import RegistryError

    try:
        summary = fn()
    except (ConversionError, SafetensorsError, OutputExistsError, CheckpointNotFoundError, CheckpointSaveError,
            CheckpointCorruptError, MegatronBridgeError, RegistryError, OSError, ValueError) as exc:
        # OSError: a file the command reads or writes (one line)
        from nvlcore.flags import global_flag

        if global_flag("debug"):  # nvl --debug convert ...: the full traceback
            raise
        raise click.ClickException(str(exc)) from None
    click.echo(summary.format())
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary.as_dict(), indent=2) + "\n")


@click.group("convert")
def convert_group() -> None:
    """Convert checkpoints between Hugging Face and nvl's sharded (Megatron-style) format."""


@declare_aliases(aliases=CONVERT_ALIASES)
@convert_group.command("import")
@model_options("--hf-model", name="hf_model", required=True, help="HF model (config.json + safetensors).")
@click.option("--megatron-path", "--megatron-model-path", "megatron_path", required=True,
              type=click.Path(path_type=Path),
              help="Output checkpoint directory (gets iter_0000000/ and the tracker).")
@click.option("--tp", "--tensor-parallel-size", "tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel size to validate and record (the checkpoint loads at any TP).")
@click.option("--pp", "--ep", "--etp", "_other_parallel", type=click.IntRange(1, 1), multiple=True, hidden=True,
              help="Accepted for the original scripts' command lines; only 1 is supported.")
@click.option("--device-map", "--device", "_device_map", default=None, hidden=True,
              help="Accepted for the original script's command lines; conversion streams on CPU.")
@click.option("--low-memory-save", "_low_memory", is_flag=True, hidden=True,
              help="Accepted; import always streams one tensor group at a time.")
@click.option("--distributed-timeout-minutes", "_timeout", type=int, default=None, hidden=True,
              help="Accepted; unused.")
@click.option("--dtype", "--torch-dtype", "dtype", type=click.Choice(DTYPES), default=None,
              help="Convert the model's tensors to this dtype (default: keep the source's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --megatron-path.")
@click.option("--format", "fmt", type=click.Choice(["nvl", "megatron-bridge"]), default="nvl", show_default=True,
              help="nvl: nvl's checkpoint (streamed); megatron-bridge: Megatron-Bridge's own torch_dist layout "
                   "(megatron-core dist_checkpointing; docs/coming-from-megatron-bridge.md).")
@click.option("--bridge", default=None, help="Bridge name (default: from config.json architectures).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--summary-json", default=None, type=click.Path(dir_okay=False), help="Also write the summary as JSON.")
@click.option("--trust-remote-code", is_flag=True, hidden=True, help="Accepted for compatibility; never needed.")
def import_cmd(hf_model: Path, revision: str | None, megatron_path: Path, tp: int, _other_parallel: Any,
               _device_map: Any, _low_memory: bool, _timeout: Any, dtype: str | None, overwrite: bool, fmt: str,
               bridge: str | None, no_progress: bool, summary_json: str | None, trust_remote_code: bool) -> None:
    """Import an HF checkpoint: streams tensors one group at a time into iteration 0."""
    from nvlcore.flags import global_flag

    no_progress = no_progress or global_flag("no_progress")

    def go() -> Any:
        b = resolve_bridge(hf_model, bridge, option="--hf-model")
        if fmt == "megatron-bridge":
            from nvlcore.convert.megatron_bridge import import_hf_to_megatron_bridge

            return import_hf_to_megatron_bridge(b, hf_model, megatron_path, tp=tp, dtype=dtype, overwrite=overwrite,
                                                progress=not no_progress)
        from nvlcore.convert.engine import import_hf_checkpoint

        return import_hf_checkpoint(b, hf_model, megatron_path, tp=tp, dtype=dtype, overwrite=overwrite,
                                    progress=not no_progress)

    _run(go, summary_json)


@declare_aliases(aliases=CONVERT_ALIASES)
@convert_group.command("export")
@model_options("--hf-model", name="hf_model", required=True,
               help="Reference HF model (config, tokenizer, *.py, tensor list).")
@click.option("--megatron-path", "--megatron-model-path", "megatron_path", required=True,
              type=click.Path(path_type=Path),
              help="Checkpoint directory (latest iteration) or one iter_N directory; nvl's or Megatron-Bridge's "
                   "(torch_dist, detected by its layout).")
@click.option("--hf-path", "--output", "hf_path", required=True, type=click.Path(path_type=Path),
              help="Output HF model directory.")
@click.option("--tp", "--tensor-parallel-size", "--pp", "--ep", "--etp", "_parallel", type=click.IntRange(min=1),
              multiple=True, hidden=True,
              help="Accepted for the original scripts' command lines; export reads logical tensors.")
@click.option("--distributed-save/--no-distributed-save", "_dist_save", default=None, hidden=True,
              help="Accepted; unused.")
@click.option("--save-every-n-ranks", "_every", type=int, default=None, hidden=True, help="Accepted; unused.")
@click.option("--distributed-timeout-minutes", "_timeout", type=int, default=None, hidden=True,
              help="Accepted; unused.")
@click.option("--not-strict", is_flag=True, help="Skip tensors that cannot be produced instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --hf-path.")
@click.option("--shard-size", default="5GB", show_default=True, help="Maximum safetensors shard size.")
@click.option("--dtype", "--export-weight-dtype", "dtype", type=click.Choice(DTYPES), default=None,
              help="Write the model's tensors in this dtype (default: as stored in the checkpoint).")
@click.option("--bridge", default=None, help="Bridge name (default: from config.json architectures).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--summary-json", default=None, type=click.Path(dir_okay=False), help="Also write the summary as JSON.")
@click.option("--trust-remote-code", is_flag=True, hidden=True, help="Accepted for compatibility; never needed.")
def export_cmd(hf_model: Path, revision: str | None, megatron_path: Path, hf_path: Path, _parallel: Any,
               _dist_save: Any, _every: Any, _timeout: Any, not_strict: bool, overwrite: bool,
               shard_size: str, dtype: str | None, bridge: str | None, no_progress: bool,
               summary_json: str | None, trust_remote_code: bool) -> None:
    """Export a checkpoint (imported or trained) to an HF model directory."""
    from nvlcore.flags import global_flag

    no_progress = no_progress or global_flag("no_progress")

    def go() -> Any:
        from nvlcore.convert.engine import export_hf_checkpoint
        from nvlcore.convert.safetensors_io import parse_size

        size = parse_size(shard_size)
        b = resolve_bridge(hf_model, bridge, option="--hf-model")
        return export_hf_checkpoint(b, hf_model, megatron_path, hf_path, strict=not not_strict, overwrite=overwrite,
                                    shard_size=size, dtype=dtype, progress=not no_progress)

    _run(go, summary_json)
