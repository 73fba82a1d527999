"""Training curves from ``metrics.jsonl``: loss, learning rate, grad norm, tokens/s (and evaluation metrics).

``plot_metrics(RUN_DIR)`` writes ``RUN_DIR/metrics.png`` (one PNG, one panel per quantity) with
matplotlib, an optional extra (``pip install 'nvlcore[plot]'``); without it :class:`PlotUnavailable`
is raised. ``nvl plot RUN_DIR`` is the command; ``nvl finetune`` calls it at every save.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
PNG = "metrics.png"
INSTALL_HINT = "pip install 'nvlcore[plot]' (matplotlib)"

#: (metric key, panel title, y-axis label, log scale?)
PANELS: tuple[tuple[str, str, str, bool], ...] = (
    ("loss", "training loss", "loss (token-weighted)", False),
    ("lr", "learning rate", "lr", False),
    ("grad_norm", "gradient norm (before clipping)", "L2 norm", True),
    ("tokens_per_s", "throughput", "tokens/s (all processes)", False),
)
#: Keys of evaluation rows drawn in the evaluation panel (``val_loss`` also goes on the loss panel).
_NOT_EVAL = {"iteration", "val_tokens"}


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def metrics_path(run: str | os.PathLike[str]) -> Path:
    """``run`` itself when it is a file, else ``run/metrics.jsonl``."""
    p = Path(run).expanduser()
    return p if p.is_file() else p / METRICS


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a line cut short by a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "iteration" in row:
            rows.append(row)
    return rows


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and v == v and v not in (float("inf"), float("-inf")):
            xs.append(int(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def plot_metrics(run: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                 title: str | None = None) -> Path:
    """Draw a run's curves into one PNG; returns its path (default: next to ``metrics.jsonl``).

    :raises PlotUnavailable: matplotlib is not installed.
    :raises FileNotFoundError: there is no ``metrics.jsonl``.
    :raises ValueError: it holds no training rows.
    """
    src = metrics_path(run)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist: give a run directory (checkpoint.save) or a metrics.jsonl")
    rows = read_metrics(src)
    train = [r for r in rows if "loss" in r]
    if not train:
        raise ValueError(f"{src} holds no training rows (no 'loss' logged yet)")
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(f"plots need matplotlib: {INSTALL_HINT}") from exc

    evals = [r for r in rows if "loss" not in r]
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k not in _NOT_EVAL and k != "val_loss" and isinstance(v, (int, float))})
    n = len(PANELS) + (1 if eval_keys else 0)
    cols = 2
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (key, name, ylabel, log) in zip(flat, PANELS, strict=False):
        xs, ys = _series(train, key)
        ax.plot(xs, ys, color="tab:blue", linewidth=1.4, label=key)
        if key == "loss":
            vx, vy = _series(evals, "val_loss")
            if vx:
                ax.plot(vx, vy, "o-", color="tab:orange", linewidth=1.4, markersize=4, label="val_loss")
            ax.legend(loc="upper right")
        if log and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if eval_keys:
        ax = flat[len(PANELS)]
        for key in eval_keys:
            xs, ys = _series(evals, key)
            ax.plot(xs, ys, "o-", linewidth=1.4, markersize=4, label=key)
        ax.set_title("evaluation")
        ax.set_xlabel("iteration")
        ax.legend(loc="best")
        ax.grid(True, alpha=0.3)
    for ax in flat[n:]:
        ax.axis("off")
    last = train[-1]
    fig.suptitle(title or f"{src.parent.name}: {len(train)} logged iterations, last {last['iteration']} "
                 f"(loss {last['loss']:.4f})")
    fig.tight_layout()
    out = Path(output) if output is not None else src.with_name(PNG)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out
