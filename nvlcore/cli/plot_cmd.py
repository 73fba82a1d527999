"""``nvl plot RUN_DIR``: a training run's curves from its ``metrics.jsonl`` into one PNG."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("plot")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write (default: RUN/metrics.png, next to metrics.jsonl).")
def plot_command(run: Path, output: Path | None) -> None:
    """Plot loss, learning rate, grad norm and tokens/s (and evaluation metrics) of a run.

    RUN is a run directory (`checkpoint.save`) or its metrics.jsonl. Needs matplotlib
    (`pip install 'nvlcore[plot]'`).
    """
    from nvlcore.plot import PlotUnavailable, plot_metrics

    try:
        out = plot_metrics(run, output)
    except (PlotUnavailable, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(out))
