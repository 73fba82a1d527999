"""Hook specifications: the whole extension surface of nvl.

Implement any of these in a module listed under ``[project.entry-points.nvl]`` (entry-point name =
module name) and decorate each function with :data:`nvlcore.hookimpl`.

Registration hooks are called once per process, one plugin at a time, with a ``register`` callable
bound to that plugin; they must not be wrappers. Arguments may be added to a hook later but are
never removed or renamed; an implementation may accept any subset of them and must not give them
default values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from nvlcore.registry import Register

PROJECT = "nvl"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "PROJECT",
    "hookimpl",
    "hookspec",
    "nvl_register_command_options",
    "nvl_register_commands",
    "nvl_register_dataset_makers",
    "nvl_register_exporters",
    "nvl_register_loggers",
    "nvl_register_model_bridges",
    "nvl_register_peft_methods",
]


@hookspec
def nvl_register_model_bridges(register: Register[Any]) -> None:
    """Register model bridges (HF checkpoint <-> training model).

    Call ``register(name, BridgeClassOrLazyString, aliases=(...))`` once per bridge. The class
    subclasses :class:`nvlcore.bridge.ModelBridge`; its ``architectures`` attribute lists the HF
    ``architectures`` values it handles, so ``nvl`` can pick it from a checkpoint's ``config.json``;
    users can also name it with ``model.bridge=NAME``.

    :param register: ``register(name, target, *, aliases=())``; ``target`` may be a
        ``"module:Attr"`` string so the import (torch, megatron) waits until the bridge is used.
    """


@hookspec
def nvl_register_dataset_makers(register: Register[Any]) -> None:
    """Register dataset makers, selected with ``dataset.maker_name=NAME`` (or an alias).

    A maker implements :class:`nvlcore.contracts.DatasetMaker`: it turns a source's rows into
    conversations in the schema of :mod:`nvlcore.data.schema`. If the registered object has a
    ``Kwargs`` attribute (an attrs class), ``dataset.maker_kwargs`` is validated against it.

    :param register: ``register(name, target, *, aliases=())``; ``target`` may be a
        ``"module:Attr"`` string so ``datasets`` and decoders are imported only when used.
    """


@hookspec
def nvl_register_peft_methods(register: Register[Any]) -> None:
    """Register parameter-efficient fine-tuning methods, selected with ``peft.method=NAME``.

    A method implements :class:`nvlcore.contracts.PeftMethod`. If the registered object has a
    ``Config`` attribute (an attrs class), the ``peft`` section's keys beyond the core ones are
    validated against it and handed over in ``cfg.peft.options``.

    :param register: ``register(name, target, *, aliases=())``; ``target`` may be a lazy string.
    """


@hookspec
def nvl_register_exporters(register: Register[Any]) -> None:
    """Register exporters, selected with ``nvl export --format NAME``.

    An exporter implements :class:`nvlcore.contracts.Exporter`.

    :param register: ``register(name, target, *, aliases=())``; ``target`` may be a lazy string.
    """


@hookspec
def nvl_register_loggers(register: Register[Any]) -> None:
    """Register metric loggers (sinks for training metrics: console, jsonl, wandb, ...).

    A logger implements :class:`nvlcore.contracts.MetricLogger`; the trainer enables the ones the
    ``logger`` config section asks for.

    :param register: ``register(name, target, *, aliases=())``; ``target`` may be a lazy string.
    """


@hookspec
def nvl_register_commands(cli: click.Group) -> None:
    """Add commands to the ``nvl`` command line.

    Call ``cli.add_command(command)``. A name that clashes with a built-in command, or with a command
    an earlier plugin added, is reported on stderr and skipped.

    :param cli: the root ``nvl`` click group.
    """


@hookspec
def nvl_register_command_options(register: Register[Any]) -> None:
    """Register options that join core commands (a PEFT plugin's recipe flags on ``nvl finetune``).

    The target is a :class:`nvlcore.cli.plugin_options.CommandOptions`: the commands it joins (by
    path: ``"finetune"``, ``"config show"``), its click parameters, hidden spellings of the commands'
    options, and what its values mean for the run config (keyword arguments for the bridge's recipe,
    config overrides). The core passes the values through and names no option of its own for them.

    :param register: ``register(name, target, *, aliases=())``; ``target`` may be a ``"module:Attr"``
        string, imported when a command it joins is parsed (keep that module light: click only).
    """
