"""``nvl finetune``: the original workflow's ``finetune_nemotron_nano_v2_vl.py`` as a command.

Config resolution (later wins), as in the original script: the bridge's recipe (``--lora-on-*``
select its PEFT recipe) -> the bridge's default YAML file, or ``--config-file`` instead -> the
command-line overrides (``key=value``, ``key value``, mapping values, ``+key``, ``~key``) -> the
paths given as options (``--hf-model-path``, ``--pretrained-checkpoint``).

``--nproc-per-node N`` starts N workers through ``torch.distributed.run`` (torchrun's library) and
supervises them; a process started by ``torchrun`` itself (``RANK``/``WORLD_SIZE`` set) trains as
that rank. Several machines use torchrun's rendezvous options (``--nnodes``, ``--node-rank``,
``--rdzv-endpoint``, ``--rdzv-id``, ``--rdzv-backend``, ``--master-addr``, ``--master-port``), passed
through unchanged. See docs/finetune.md.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from nvlcore.cli.options import CONFIG_CONTEXT_SETTINGS, config_options
from nvlcore.hub import hf_model_option, revision_option

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


def _recipe(bridge: Any, *, language: bool, vision: bool) -> dict[str, Any]:
    """The bridge's recipe; the LoRA flags pick its PEFT variant (which groups get adapters)."""
    groups = [g for g, on in (("language_model", language), ("vision_model", vision)) if on]
    return dict(bridge.recipe(peft=bool(groups), adapted_groups=groups) or {})


def compose_config(
    *,
    manager: Any,
    hf_model_path: str | None,
    pretrained_checkpoint: str | None,
    config_files: Sequence[str | Path],
    lora_on_language_model: bool,
    lora_on_vision_model: bool,
    overrides: Sequence[str],
) -> Any:
    """Recipe -> default YAML or ``--config-file`` -> overrides -> option paths; returns the (unresolved) config."""
    from nvlcore.config import ConfigError, Override, load_config, parse_overrides

    parsed = parse_overrides(list(overrides))
    given = {o.key: o.value for o in parsed}
    hf = hf_model_path or given.get("model.hf_model_path")
    bridge = _resolve(manager, hf, given.get("model.bridge"))
    base = _recipe(bridge, language=lora_on_language_model, vision=lora_on_vision_model)
    files: list[str] = [str(f) for f in config_files]
    if not files:
        default = bridge.default_config_file()
        if default:
            files.append(str(default))
    extra: list[Override] = []
    if hf_model_path:
        extra.append(Override("model.hf_model_path", str(Path(hf_model_path).expanduser().absolute())))
    if pretrained_checkpoint:
        extra.append(Override("checkpoint.pretrained_checkpoint", str(Path(pretrained_checkpoint).expanduser().absolute())))
    if (lora_on_language_model or lora_on_vision_model) and not base.get("peft", {}).get("method") \
            and "peft.method" not in given:
        extra.append(Override("peft.method", "lora"))
    if lora_on_language_model or lora_on_vision_model:
        extra += _lora_flag_overrides(manager, base, given, [str(f) for f in config_files],
                                      lora_on_language_model, lora_on_vision_model)
    try:
        return load_config(files, [*parsed, *extra], base=base, plugins=manager), files
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None


FREEZE_KEYS = ("freeze_language_model", "freeze_vision_model", "freeze_vision_projection")


def _user_peft_freeze(given: dict[str, Any], config_files: Sequence[str]) -> set[str]:
    """``peft.freeze_*`` keys the user set explicitly: on the command line or in a ``--config-file``.

    Megatron-Bridge's rule: under PEFT the recipe decides what is frozen, and only an explicit
    ``peft.freeze_*`` override changes it. A ``model.freeze_*: False`` (both shipped YAML files have
    them) never unfreezes a tower the PEFT recipe froze; ``model.freeze_*: True`` freezes a tower in
    addition (the trainer applies both: a base parameter trains only if neither freezes it).
    """
    import yaml

    out: set[str] = set()
    for config_file in config_files:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # the config loader reports an unreadable file with its own message
        peft = data.get("peft") if isinstance(data, dict) else None
        if isinstance(peft, dict):
            out |= {k for k in FREEZE_KEYS if k in peft}
    out |= {k for k in FREEZE_KEYS if f"peft.{k}" in given}
    return out


def _lora_flag_overrides(manager: Any, base: dict[str, Any], given: dict[str, Any], config_files: Sequence[str],
                         language: bool, vision: bool) -> list[Any]:
    """``--lora-on-language-model`` / ``--lora-on-vision-model`` resolved by the PEFT method (Megatron-Bridge's
    table: which towers get adapters, which are frozen). An explicit ``peft.freeze_*`` or
    ``peft.target_modules`` of the user is kept; ``model.freeze_*`` does not enter the PEFT settings."""
    from nvlcore.config import Override

    method_name = given.get("peft.method") or base.get("peft", {}).get("method") or "lora"
    try:
        method = manager.registry("peft_method").get(method_name)
    except Exception:  # the config loader reports an unknown method with its own message
        return []
    settings = getattr(method, "workflow_settings", None)
    if settings is None:
        return []
    peft, freeze = settings(language, vision)
    explicit = _user_peft_freeze(given, config_files)
    out = [Override(f"peft.{k}", freeze[k]) for k in FREEZE_KEYS if k not in explicit]
    if "peft.target_modules" not in given:
        out.append(Override("peft.target_modules", list(peft["target_modules"])))
    return out


LAUNCH_OPTIONS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id",
                  "master_addr", "master_port")


def _child_argv(params: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """The worker's command line: every option except the launcher's, then the overrides as given."""
    argv: list[str] = []
    for opt in ("hf_model_path", "pretrained_checkpoint"):
        if params.get(opt):
            argv += ["--" + opt.replace("_", "-"), str(params[opt])]
    for f in params.get("config_files") or ():
        argv += ["--config-file", str(f)]
    for flag in ("lora_on_language_model", "lora_on_vision_model", "random_init", "debug"):
        if params.get(flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv + list(overrides)


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


@click.command("finetune", context_settings={**CONFIG_CONTEXT_SETTINGS, "help_option_names": ["-h", "--help"]})
@hf_model_option("--hf-model-path", help="HF model (config.json, tokenizer); selects the model bridge.")
@revision_option()
@click.option("--pretrained-checkpoint", "--pretrained", "--megatron-path", "--megatron-model-path",
              "pretrained_checkpoint", type=click.Path(), default=None,
              help="Starting weights: a Megatron checkpoint (base dir or iter_N) or an HF directory.")
@click.option("--random-init", is_flag=True,
              help="No starting weights: random initialisation. FOR BENCHMARKING ONLY.")
@click.option("--lora-on-language-model", is_flag=True, help="LoRA on the language model (PEFT recipe).")
@click.option("--lora-on-vision-model", is_flag=True, help="LoRA on the vision encoder and projector (PEFT recipe).")
@click.option("--nproc-per-node", type=int, default=None, help="Start this many worker processes on this machine.")
@click.option("--nnodes", default=None, help="torchrun: number of machines (or MIN:MAX).")
@click.option("--node-rank", type=int, default=None, help="torchrun: this machine's rank (static rendezvous).")
@click.option("--rdzv-endpoint", default=None, help="torchrun: rendezvous HOST:PORT shared by all machines.")
@click.option("--rdzv-backend", default=None, help="torchrun: rendezvous backend (default c10d).")
@click.option("--rdzv-id", default=None, help="torchrun: job id shared by all machines.")
@click.option("--master-addr", default=None, help="torchrun: address of machine 0 (static rendezvous).")
@click.option("--master-port", type=int, default=None, help="torchrun: port on machine 0 (static rendezvous).")
@click.option("--debug", is_flag=True, help="Show full tracebacks (also nvl --debug).")
@config_options()
def finetune_command(**params: Any) -> None:
    """Fine-tune a model (full or LoRA) on a registered dataset.

    OVERRIDES set config keys: `train.train_iters=30`, `dataset.maker_name make_raven_dataset`,
    `dataset.maker_kwargs '{"path": "/data/raven"}'`, `~key` resets a key. --config-file (repeatable)
    replaces the bridge's default YAML, as in the original script. Example:

        nvl finetune --hf-model-path HF --pretrained-checkpoint CKPT checkpoint.save=out dataset.maker_name=raven
    """
    from nvlcore.config import ConfigError, config_to_yaml, resolve_config
    from nvlcore.interrupt import EXIT_STOPPED_EARLY
    from nvlcore.parallel import build_launch_args, die_with_parent, launch, launched_by_torchrun
    from nvlcore.cli import current_plugin_manager

    from nvlcore.cli import global_flag

    overrides = list(params.pop("overrides"))
    params.pop("revision", None)  # used by --hf-model-path's resolution
    params["debug"] = params["debug"] or global_flag("debug")
    manager = current_plugin_manager()
    cfg, files = compose_config(
        manager=manager, hf_model_path=params["hf_model_path"], pretrained_checkpoint=params["pretrained_checkpoint"],
        config_files=params["config_files"], lora_on_language_model=params["lora_on_language_model"],
        lora_on_vision_model=params["lora_on_vision_model"], overrides=overrides,
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

    world = None
    if params["nproc_per_node"] is not None and str(params["nnodes"] or "1") == "1":
        world = params["nproc_per_node"]
    problems = config_problems(cfg, manager, world_size=world)
    if problems:  # before any worker starts or any model is built
        raise click.UsageError("config: " + "; ".join(problems))

    nproc = params["nproc_per_node"]
    if nproc is not None and not launched_by_torchrun():
        multi = {k: params[k] for k in LAUNCH_OPTIONS if k != "nproc_per_node" and params[k] is not None}
        args = build_launch_args(
            nproc_per_node=nproc, module=MODULE, module_args=_child_argv(params, overrides),
            nnodes=str(params["nnodes"] or "1"), node_rank=params["node_rank"],
            rdzv_endpoint=params["rdzv_endpoint"], rdzv_backend=params["rdzv_backend"], rdzv_id=params["rdzv_id"],
            master_addr=params["master_addr"], master_port=params["master_port"],
        )
        click.echo(f"nvl finetune: starting {nproc} worker(s) on this machine"
                   + (f" ({', '.join(f'{k}={v}' for k, v in multi.items())})" if multi else ""), err=True)
        before = _latest_saved(cfg.checkpoint.save)
        code = launch(args)
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and _latest_saved(cfg.checkpoint.save) != before:
            # the workers were told to stop and saved a checkpoint: the same status as one process
            click.echo(f"nvl finetune: stopped early; checkpoint saved (exit status {EXIT_STOPPED_EARLY})", err=True)
            code = EXIT_STOPPED_EARLY
        if code:
            raise SystemExit(code)
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
        from nvlcore.checkpoint.save import NoSpaceError

        if isinstance(exc, NoSpaceError):  # the same line from every rank
            raise click.ClickException(str(exc)) from exc
        rank = os.environ.get("RANK")
        where = f"rank {rank}: " if rank is not None else ""
        raise click.ClickException(f"{where}{type(exc).__name__}: {exc} (--debug shows the traceback)") from exc


def main(argv: list[str] | None = None) -> Any:
    """Entry point of each worker process (``python -m nvlcore.cli.finetune ...``)."""
    from nvlcore.cli.spelling import adopt

    adopt(finetune_command)
    return finetune_command.main(args=argv, prog_name="nvl finetune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
