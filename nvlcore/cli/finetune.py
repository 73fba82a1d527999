"""``nvl finetune``: the original workflow's fine-tuning script as a command.

Config resolution (later wins), as in the original script: the bridge's recipe (options that plugins
add may select its variant, e.g. its PEFT recipe) -> the bridge's default YAML file, or ``--config-file``
instead -> the command-line overrides (``key=value``, ``key value``, mapping values, ``+key``, ``~key``)
-> what the plugins' options set -> the paths given as options (``--hf-model-path``,
``--pretrained-checkpoint``).

``--nproc-per-node N`` starts N workers through ``torch.distributed.run`` (torchrun's library) and
supervises them; a process started by ``torchrun`` itself (``RANK``/``WORLD_SIZE`` set) trains as
that rank. Several machines use torchrun's rendezvous options (``--nnodes``, ``--node-rank``,
``--rdzv-endpoint``, ``--rdzv-id``, ``--rdzv-backend``, ``--rdzv-conf``, ``--master-addr``,
``--master-port``) and ``--max-restarts``, passed through unchanged. See docs/finetune.md and
docs/multi-node.md.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from nvlcore.cli.options import CONFIG_CONTEXT_SETTINGS, config_options, model_options
from nvlcore.cli.plugin_options import PluginOptionsCommand

MODULE = "nvlcore.cli.finetune"


def _resolve(manager: Any, hf_model_path: str | None, bridge_name: str | None) -> Any:
    """The bridge for ``--hf-model-path`` (:func:`nvlcore.bridge.resolve_bridge`), errors as usage errors."""
    from nvlcore.bridge import BridgeError, resolve_bridge

    if not hf_model_path:
        raise click.UsageError("--hf-model-path DIR is required (the HF model directory: config.json, tokenizer)")
    try:
        return resolve_bridge(hf_model_path, bridge_name, manager=manager)
    except BridgeError as exc:
        raise click.BadParameter(str(exc), param_hint="--hf-model-path") from None


def _recipe(bridge: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The bridge's recipe; plugin options choose its variant (e.g. ``peft=True, adapted_groups=[...]``)."""
    return dict(bridge.recipe(**options) or {})


def compose_config(
    *,
    manager: Any,
    hf_model_path: str | None,
    pretrained_checkpoint: str | None,
    config_files: Sequence[str | Path],
    overrides: Sequence[str],
    plugin_values: Sequence[tuple[Any, Mapping[str, Any]]] = (),
    command: str = "finetune",
) -> Any:
    """Recipe -> default YAML or ``--config-file`` -> overrides -> plugin options -> option paths;
    returns the (unresolved) config and the YAML files used.

    :param plugin_values: ``(CommandOptions, its values)`` of the options plugins added to the command
        (:meth:`nvlcore.cli.plugin_options.PluginOptionsCommand.split_values`).
    :param command: the command path the plugin options are asked about (``"finetune"``, ``"config show"``).
    """
    from nvlcore.cli.plugin_options import ConfigRequest
    from nvlcore.config import ConfigError, Override, load_config, parse_overrides

    try:
        parsed = parse_overrides(list(overrides))
    except ConfigError as exc:
        hint = _option_hint(overrides)
        raise click.UsageError(f"{exc}{hint}" if hint else f"config: {exc}") from None
    given = {o.key: o.value for o in parsed}
    hf = hf_model_path or given.get("model.hf_model_path")
    bridge = _resolve(manager, hf, given.get("model.bridge"))
    recipe_options: dict[str, Any] = {}
    for obj, values in plugin_values:
        recipe_options.update(obj.recipe_options(command, values))
    base = _recipe(bridge, recipe_options)
    files: list[str] = [str(f) for f in config_files]
    if not files:
        default = bridge.default_config_file()
        if default:
            files.append(str(default))
    extra: list[Override] = []
    if hf_model_path:
        extra.append(Override("model.hf_model_path", str(Path(hf_model_path).expanduser().absolute())))
    if pretrained_checkpoint:
        extra.append(Override("checkpoint.pretrained_checkpoint",
                              str(Path(pretrained_checkpoint).expanduser().absolute())))
    request = ConfigRequest(manager=manager, base=base, given=given, config_files=tuple(str(f) for f in config_files))
    for obj, values in plugin_values:
        extra += list(obj.overrides(command, values, request))
    try:
        return load_config(files, [*parsed, *extra], base=base, plugins=manager), files
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None


def _option_hint(tokens: Sequence[str]) -> str:
    """``; did you mean --hf-model-path?`` for the first ``--option`` the command does not know."""
    from nvlcore.config.structure import suggest

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return ""
    known = [o for p in ctx.command.get_params(ctx) if isinstance(p, click.Option)
             for o in (*p.opts, *p.secondary_opts)]
    for token in tokens:
        if token.startswith("--"):
            close = suggest(token.split("=", 1)[0], known)
            command = ctx.command_path.split(" ", 1)[-1]
            return f"; did you mean {close}?" if close else f"; `nvl {command} --help` lists the options"
    return ""


LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id",
                  "rdzv_conf", "max_restarts", "master_addr", "master_port")


def _child_argv(params: dict[str, Any], overrides: Sequence[str], plugin_argv: Sequence[str] = ()) -> list[str]:
    """The worker's command line: every option except the launcher's (the plugins' as ``plugin_argv``),
    then the overrides as given."""
    argv: list[str] = []
    for opt in ("hf_model_path", "pretrained_checkpoint"):
        if params.get(opt):
            argv += ["--" + opt.replace("_", "-"), str(params[opt])]
    for f in params.get("config_files") or ():
        argv += ["--config-file", str(f)]
    for flag in ("random_init", "debug"):
        if params.get(flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv + list(plugin_argv) + list(overrides)


def _latest_saved(save: str | None) -> tuple[int | None, float | None]:
    """The tracker's iteration and time under ``checkpoint.save`` (to tell whether a launch saved)."""
    from nvlcore.checkpoint.layout import TRACKER_TXT

    if not save:
        return None, None
    tracker = Path(save) / TRACKER_TXT
    try:
        return int(tracker.read_text().strip()), tracker.stat().st_mtime
    except (OSError, ValueError):
        return None, None


def _launch_workers(params: Mapping[str, Any], module_args: list[str], *, save: str | None) -> None:
    """``--nproc-per-node N``: start N workers through torchrun's library and wait; their status is ours."""
    from nvlcore.interrupt import EXIT_STOPPED_EARLY
    from nvlcore.parallel import build_launch_args, launch

    nproc = params["nproc_per_node"]
    multi = {k: params[k] for k in LAUNCH_OPTIONS if k != "nproc_per_node" and params[k] is not None}
    args = build_launch_args(
        nproc_per_node=nproc, module=MODULE, module_args=module_args,
        nnodes=str(params["nnodes"] or "1"), node_rank=params["node_rank"],
        rdzv_endpoint=params["rdzv_endpoint"], rdzv_backend=params["rdzv_backend"], rdzv_id=params["rdzv_id"],
        master_addr=params["master_addr"], master_port=params["master_port"],
        rdzv_conf=params["rdzv_conf"], max_restarts=params["max_restarts"],
    )
    click.echo(f"nvl finetune: starting {nproc} worker(s) on this machine"
               + (f" ({', '.join(f'{k}={v}' for k, v in multi.items())})" if multi else ""), err=True)
    before = _latest_saved(save)
    code = launch(args)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and _latest_saved(save) != before:
        # the workers were told to stop and saved a checkpoint: the same status as one process
        click.echo(f"nvl finetune: stopped early; checkpoint saved (exit status {EXIT_STOPPED_EARLY})", err=True)
        code = EXIT_STOPPED_EARLY
    if code:
        raise SystemExit(code)


@click.command("finetune", cls=PluginOptionsCommand,
               context_settings={**CONFIG_CONTEXT_SETTINGS, "help_option_names": ["-h", "--help"]})
@model_options(help="HF model (config.json, tokenizer); selects the model bridge.")
@click.option("--pretrained-checkpoint", "--pretrained", "--megatron-path", "--megatron-model-path",
              "pretrained_checkpoint", type=click.Path(), default=None,
              help="Starting weights: a Megatron checkpoint (base dir or iter_N) or an HF directory.")
@click.option("--random-init", is_flag=True,
              help="No starting weights: random initialisation. FOR BENCHMARKING ONLY.")
@click.option("--nproc-per-node", type=int, default=None, help="Start this many worker processes on this machine.")
@click.option("--nnodes", default=None, help="torchrun: number of machines (or MIN:MAX).")
@click.option("--node-rank", type=int, default=None, help="torchrun: this machine's rank (static rendezvous).")
@click.option("--rdzv-endpoint", default=None, help="torchrun: rendezvous HOST:PORT shared by all machines.")
@click.option("--rdzv-backend", default=None, help="torchrun: rendezvous backend (default c10d).")
@click.option("--rdzv-id", default=None, help="torchrun: job id shared by all machines.")
@click.option("--rdzv-conf", default=None,
              help="torchrun: rendezvous settings, e.g. join_timeout=600,read_timeout=60 (seconds).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=None,
              help="torchrun: restart all workers this many times after a failure; they resume from checkpoint.save.")
@click.option("--master-addr", default=None, help="torchrun: address of machine 0 (static rendezvous).")
@click.option("--master-port", type=int, default=None, help="torchrun: port on machine 0 (static rendezvous).")
@click.option("--debug", is_flag=True, help="Show full tracebacks (also nvl --debug).")
@config_options()
def finetune_command(**params: Any) -> None:
    """Fine-tune a model (fully or with a PEFT method) on a registered dataset.

    OVERRIDES set config keys: `train.train_iters=30`, `dataset.maker_name make_raven_dataset`,
    `dataset.maker_kwargs '{"path": "/data/raven"}'`, `~key` resets a key. --config-file (repeatable)
    replaces the bridge's default YAML, as in the original script. Installed plugins may add options
    (a PEFT plugin its recipe flags). Example:

        nvl finetune --hf-model-path HF --pretrained-checkpoint CKPT checkpoint.save=out dataset.maker_name=raven
    """
    from nvlcore.cli import current_plugin_manager
    from nvlcore.config import ConfigError, config_to_yaml, resolve_config
    from nvlcore.flags import global_flag
    from nvlcore.parallel import die_with_parent, launched_by_torchrun

    overrides = list(params.pop("overrides"))
    params.pop("revision", None)  # used by --hf-model-path's resolution
    params["debug"] = params["debug"] or global_flag("debug")
    manager = current_plugin_manager()
    ctx = click.get_current_context()
    command = ctx.command
    assert isinstance(command, PluginOptionsCommand)
    plugin_values = command.split_values(params, ctx)
    cfg, files = compose_config(
        manager=manager, hf_model_path=params["hf_model_path"], pretrained_checkpoint=params["pretrained_checkpoint"],
        config_files=params["config_files"], overrides=overrides, plugin_values=plugin_values,
    )
    if params["print_config"]:
        if files:
            click.echo(f"# config files: {', '.join(files)}")
        click.echo(config_to_yaml(cfg), nl=False)
        return
    try:
        resolve_config(cfg)
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None
    if params["random_init"] and params["pretrained_checkpoint"]:
        raise click.UsageError("--random-init and --pretrained-checkpoint exclude each other")
    if not params["random_init"] and not cfg.checkpoint.pretrained_checkpoint:
        raise click.UsageError("--pretrained-checkpoint DIR is required (a Megatron checkpoint or an HF directory)")
    from nvlcore.training.preflight import config_problems

    world = None  # the process count, where this process can know it before any worker starts
    if params["nproc_per_node"] is not None and str(params["nnodes"] or "1") == "1":
        world = params["nproc_per_node"]
    elif params["nproc_per_node"] is None and not launched_by_torchrun():
        world = 1
    problems = config_problems(cfg, manager, world_size=world)
    if problems:  # before any worker starts or any model is built
        raise click.UsageError("config: " + "; ".join(problems))

    nproc = params["nproc_per_node"]
    if nproc is not None and not launched_by_torchrun():
        _launch_workers(params, _child_argv(params, overrides, command.plugin_argv(ctx)), save=cfg.checkpoint.save)
        return
    if launched_by_torchrun():
        die_with_parent()  # a kill -9 of the launcher must not leave this worker training
    if nproc is not None and launched_by_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
        if local != nproc:
            raise click.UsageError(
                f"--nproc-per-node {nproc} but this process was started by a launcher with {local} per node; "
                "drop --nproc-per-node when starting with torchrun"
            )

    from nvlcore.training.finetune import run_finetune

    try:
        run_finetune(cfg, manager=manager, random_init=params["random_init"])
    except (click.ClickException, SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        if params["debug"]:
            raise
        from nvlcore.checkpoint import RunDirectoryLocked
        from nvlcore.checkpoint.save import NoSpaceError
        from nvlcore.checkpoint.shared import SharedDirectoryError
        from nvlcore.cli.errors import one_line
        from nvlcore.training.memory import MemoryPlanError
        from nvlcore.training.oom import budget_note, describe, fitting_options, is_out_of_memory

        # the same line from every rank
        if isinstance(exc, (NoSpaceError, RunDirectoryLocked, SharedDirectoryError, MemoryPlanError)):
            raise click.ClickException(str(exc)) from exc
        from nvlcore.parallel import node_rank, spans_nodes

        rank = os.environ.get("RANK")
        where = f"rank {rank}: " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        if where and spans_nodes():
            where = f"node {node_rank()}, {where}"
        if is_out_of_memory(exc):  # also NCCL's "Failed to CUDA calloc": not a communication failure
            hint = "; ".join(h for h in (budget_note(cfg), fitting_options(
                cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))) if h)
            raise click.ClickException(f"{where}{describe(exc, hint=hint)} (--debug shows the traceback)") from exc
        raise click.ClickException(f"{where}{one_line(exc)} (--debug shows the traceback)") from exc


def main(argv: list[str] | None = None) -> Any:
    """Entry point of each worker process (``python -m nvlcore.cli.finetune ...``)."""
    from nvlcore.cli.spelling import adopt

    adopt(finetune_command)
    return finetune_command.main(args=argv, prog_name="nvl finetune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
