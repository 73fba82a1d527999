"""Built-in metric loggers: console, JSONL, wandb and TensorBoard (lazy targets, imported only when used)."""

from __future__ import annotations

from typing import Any

from nvlcore.hookspecs import hookimpl


@hookimpl
def nvl_register_loggers(register: Any) -> None:
    register("console", "nvlcore.training.loggers:ConsoleLogger")
    register("jsonl", "nvlcore.training.loggers:JsonlLogger")
    register("wandb", "nvlcore.training.loggers:WandbLogger")
    register("tensorboard", "nvlcore.training.loggers:TensorBoardLogger")
