"""Metric sinks: console progress lines, ``metrics.jsonl``, Weights & Biases and TensorBoard.

Each follows :class:`nvlcore.contracts.MetricLogger` (``log(metrics, step=)``, ``close()``) and is
registered by the built-in plugin :mod:`nvlcore.builtin.loggers` under ``console``, ``jsonl``,
``wandb`` and ``tensorboard``. The trainer calls them on global rank 0 only, however many machines
the run spans (the console line then starts with ``[node 0] ``).

Metric keys the trainer logs (``metrics.jsonl`` holds them all, one JSON object per logged iteration):
``iteration``, ``loss`` (token-weighted mean over the logged interval), ``lr``, ``weight_decay``,
``grad_norm``, ``tokens_per_s`` (real tokens, padding excluded, all GPUs), ``tokens_per_s_per_gpu``,
``tflops_per_gpu`` (vision encoder and projector included), ``supervised_tokens``,
``step_time_s``, ``consumed_samples``, ``skipped_iterations``, ``mem_gb`` (peak allocated on the
GPU; peak resident memory of the process on CPU), ``eta_s``; validation adds ``val_loss`` and ``val_tokens``;
generation-based validation adds ``val_gen_<metric>`` for each of the dataset maker's metrics (and
``val_gen_seconds``);
the test split, evaluated once at the end, ``test_loss`` and ``test_tokens``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ConsoleLogger:
    """One line per logged iteration::

        iter    12/30 | loss 2.3456 | lr 1.20e-05 | grad 0.912 | 1,234 tok/s | 12.3 TFLOP/s/GPU | mem 10.2 GB
        | ETA 0:01:23 | skipped 0

    (one line, wrapped here).
    """

    def __init__(self, *, total_iters: int | None = None, stream: TextIO | None = None, per: str = "GPU",
                 prefix: str = "") -> None:
        """:param per: what the throughput is divided by: ``GPU``, or ``process`` for CPU runs.
        :param prefix: before each line (``[node 0] `` when a run spans machines)."""
        self.total_iters = total_iters
        self.stream = stream
        self.per = per
        self.prefix = prefix

    def log(self, metrics: Mapping[str, Any], *, step: int) -> None:
        width = len(str(self.total_iters)) if self.total_iters else 1
        total = f"/{self.total_iters}" if self.total_iters else ""
        parts = [f"iter {step:>{width}}{total}"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "val_loss" in metrics:
            parts.append(f"val loss {metrics['val_loss']:.4f}")
        for key, value in metrics.items():  # generation-based validation (validation.generate_eval_interval)
            if key.startswith("val_gen_"):
                parts.append(f"val {key[len('val_gen_'):]} {value:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.3e}")
        if "grad_norm" in metrics:
            parts.append(f"grad {metrics['grad_norm']:.3f}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
        if "tflops_per_gpu" in metrics:
            tf = metrics["tflops_per_gpu"]
            parts.append(f"{tf:.1f} TFLOP/s/{self.per}" if tf >= 1 else f"{tf:.3g} TFLOP/s/{self.per}")
        if metrics.get("mem_gb") is not None:
            parts.append(f"mem {metrics['mem_gb']:.1f} GB")
        if "eta_s" in metrics:
            parts.append(f"ETA {_fmt_eta(metrics['eta_s'])}")
        if "skipped_iterations" in metrics:
            parts.append(f"skipped {int(metrics['skipped_iterations'])}")
        print(self.prefix + " | ".join(parts), file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per logged iteration to ``path`` (``<checkpoint.save>/metrics.jsonl``).

    :param resume_iteration: when resuming, lines of iterations after this one (work lost when the
        earlier run stopped between checkpoints) are dropped first, so each iteration appears once.

    The file is created at the first row: a run that fails before its first iteration leaves none.
    """

    def __init__(self, path: str | Path, *, resume_iteration: int | None = None) -> None:
        self.path = Path(path)
        self._fh: TextIO | None = None
        self._closed = False
        if resume_iteration is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", 0) <= resume_iteration:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)

    def log(self, metrics: Mapping[str, Any], *, step: int) -> None:
        if self._closed:
            raise RuntimeError(f"{self.path}: logger already closed")
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        row = {"iteration": step, **{k: v for k, v in metrics.items() if k != "iteration"}}
        self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class WandbLogger:
    """Weights & Biases: ``logger.wandb_project`` (required), ``wandb_save_dir``, ``wandb_exp_name``, ``wandb_entity``.

    ``WANDB_MODE=offline`` writes the run under ``save_dir/wandb`` with no network. The whole run
    config is uploaded as the run's config.
    """

    def __init__(
        self,
        *,
        project: str,
        save_dir: str | Path | None = None,
        exp_name: str | None = None,
        entity: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_id: str | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - wandb is an optional extra
            raise ImportError(
                "logger.wandb_project is set but wandb is not installed: pip install 'nvlcore[wandb]'"
            ) from exc
        if "WANDB_API_KEY" in os.environ:
            os.environ["WANDB_API_KEY"] = os.environ["WANDB_API_KEY"].strip()
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project,
            name=exp_name,
            entity=entity,
            dir=str(save_dir) if save_dir is not None else None,
            config=dict(config or {}),
            id=resume_id,
            resume="allow" if resume_id else None,
        )

    @property
    def run_id(self) -> str:
        return self._run.id

    def log(self, metrics: Mapping[str, Any], *, step: int) -> None:
        self._run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


#: Metrics derived from timers; ``logger.log_timers_to_tensorboard=false`` keeps them out of TensorBoard.
TIMER_METRICS = ("step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "eta_s")


class TensorBoardLogger:
    """TensorBoard scalars through ``torch.utils.tensorboard.SummaryWriter`` in ``logger.tensorboard_dir``.

    Every numeric metric is one scalar tag (its metric name) at the iteration as step; the timer-derived
    ones (:data:`TIMER_METRICS`) only with ``timers`` (``logger.log_timers_to_tensorboard``).
    :param resume_iteration: when resuming, events after this iteration (work lost when the earlier run
        stopped between checkpoints) are purged, so each iteration appears once.
    """

    def __init__(self, log_dir: str | Path, *, timers: bool = True, resume_iteration: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - tensorboard is a dependency of nvlcore
            raise ImportError(
                "logger.tensorboard_dir is set but tensorboard is not installed: pip install tensorboard") from exc
        self.log_dir = Path(log_dir)
        self.timers = timers
        purge = resume_iteration + 1 if resume_iteration is not None else None
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def log(self, metrics: Mapping[str, Any], *, step: int) -> None:
        if self._writer is None:
            raise RuntimeError(f"{self.log_dir}: logger already closed")
        for key, value in metrics.items():
            if key == "iteration" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not self.timers and key in TIMER_METRICS:
                continue
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
