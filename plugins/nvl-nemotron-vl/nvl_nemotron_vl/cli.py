"""``nvl toy-model``: write a toy HF checkpoint (click only at import; torch inside the command)."""

from __future__ import annotations

from pathlib import Path

import click

SIZE_CHOICES = ("tiny", "small", "12b-shape")


@click.command("toy-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(SIZE_CHOICES), default="tiny", show_default=True,
              help="tiny: seconds on CPU; small: a few hundred MB, sharded; 12b-shape: the real dimensions (~25 GB).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to draw the random weights (cuda is much faster for 12b-shape; values differ from cpu).")
def toy_model(out: Path, size: str, seed: int, overwrite: bool, device: str) -> None:
    """Write a toy Nemotron Nano V2 VL checkpoint (HF format, real key names, random weights) to OUT."""
    from .toy import write_toy_checkpoint

    if out.exists() and not overwrite:
        raise click.UsageError(f"{out} exists; pass --overwrite to replace it")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    try:
        write_toy_checkpoint(out, size, seed=seed, overwrite=overwrite, device=device,
                             progress=lambda msg: click.echo(msg, err=True))
    except (ValueError, FileExistsError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(str(out))
