"""Checks of a resolved run config that need no model: run before anything heavy is built or launched.

A missing dataset path, a warm-up longer than the schedule, a batch size that does not divide, a
``--pretrained-checkpoint`` that does not exist: each would otherwise surface only after the model has
been built and its weights loaded (minutes on a 12B model, on every rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: maker_kwargs names (or suffixes) that name local files or directories which must exist.
_LOCAL_SUFFIXES = ("_root", "_dir", "_path", "_root_path", "_file")
_CREATED = ("cache_dir",)  # created on demand


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def config_problems(cfg: Any, manager: Any = None, *, world_size: int | None = None) -> list[str]:
    """Every contradiction found in ``cfg`` (a resolved :class:`nvlcore.config.NvlConfig`), as one-line messages."""
    from nvlcore.training.schedules import schedules_for

    problems: list[str] = []
    t = cfg.train
    if t.train_iters is not None and t.train_iters < 1:
        problems.append(f"train.train_iters={t.train_iters} must be at least 1")
    try:
        schedules_for(cfg)
    except ValueError as exc:
        problems.append(str(exc))
    mbs, gbs = t.micro_batch_size, t.global_batch_size
    if mbs and gbs and gbs % mbs:
        problems.append(f"train.global_batch_size={gbs} is not a multiple of train.micro_batch_size={mbs}")
    tp = cfg.model.tensor_model_parallel_size or 1
    if world_size is not None and tp >= 1 and world_size % tp:
        from nvlcore.parallel import tensor_parallel_mismatch

        problems.append(tensor_parallel_mismatch(tp, world_size))
    if world_size is not None and mbs and gbs and world_size % tp == 0 and gbs % (mbs * (world_size // tp)):
        problems.append(f"train.global_batch_size={gbs} is not a multiple of train.micro_batch_size ({mbs}) x "
                        f"data-parallel size ({world_size // tp} = {world_size} processes / TP {tp})")
    v = cfg.validation
    if v.eval_interval is not None and v.eval_interval < 1:
        problems.append(f"validation.eval_interval={v.eval_interval} must be at least 1 (or null for no validation)")
    ck = cfg.checkpoint
    if ck.save_interval is not None and ck.save_interval < 1:
        problems.append(f"checkpoint.save_interval={ck.save_interval} must be at least 1")
    if ck.pretrained_checkpoint and not Path(ck.pretrained_checkpoint).expanduser().exists():
        problems.append(f"checkpoint.pretrained_checkpoint (--pretrained-checkpoint) {ck.pretrained_checkpoint} does "
                        "not exist")
    if ck.load and not Path(ck.load).expanduser().exists() and ck.exit_on_missing_checkpoint:
        problems.append(f"checkpoint.load={ck.load} does not exist and checkpoint.exit_on_missing_checkpoint is set")
    problems += _dataset_problems(cfg, manager)
    return problems


def _dataset_problems(cfg: Any, manager: Any) -> list[str]:
    ds = cfg.dataset
    out: list[str] = []
    kwargs = dict(ds.maker_kwargs or {})
    for key, value in sorted(kwargs.items()):
        if not isinstance(value, str) or not value or key in _CREATED:
            continue
        local = key.endswith(_LOCAL_SUFFIXES) or (key == "path" and _looks_local(value))
        if local and not Path(value).expanduser().exists():
            out.append(f"dataset.maker_kwargs.{key}: {value} does not exist")
    if manager is not None and ds.maker_name:
        try:
            maker = manager.registry("dataset_maker").get(ds.maker_name)
        except Exception as exc:  # the config loader reports unknown makers; here only a note
            out.append(str(exc).splitlines()[0])
            return out
        make_kwargs = getattr(maker, "make_kwargs", None)
        if callable(make_kwargs):
            try:
                make_kwargs(kwargs)
            except (TypeError, ValueError) as exc:
                out.append(str(exc).splitlines()[0])
    return out


def preflight(cfg: Any, manager: Any = None, *, world_size: int | None = None) -> None:
    """Raise ``ValueError`` listing every problem :func:`config_problems` finds; nothing else is touched."""
    problems = config_problems(cfg, manager, world_size=world_size)
    if problems:
        raise ValueError("; ".join(problems))
