"""``nvl finetune`` in each process: :class:`FinetuneRecipe`, from a resolved config to a trained checkpoint.

Order (architecture.md §6): preflight -> process groups -> the run directory's lock -> resume decision ->
bridge -> model -> starting weights (Megatron checkpoint or HF directory) -> freeze flags -> PEFT ->
optimizer -> resume -> data -> loggers -> loop -> test split. :func:`run_finetune` is the recipe's ``run()``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nvlcore.bridge import resolve_bridge
from nvlcore.config.refused import bf16_device_params
from nvlcore.interrupt import EXIT_STOPPED_EARLY
from nvlcore.training.schedules import schedules_for
from nvlcore.training.trainer import LoopSettings, Trainer, TrainState

if TYPE_CHECKING:
    import torch

    from nvlcore.config import NvlConfig
    from nvlcore.parallel import ParallelContext

RANDOM_INIT_BANNER = (
    "nvl finetune: RANDOM INITIALISATION (--random-init): no pretrained weights are loaded. "
    "This is for benchmarking throughput and memory only; the result is not a fine-tuned model."
)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) RNGs; every rank the same, as Megatron does."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def apply_freeze_flags(model: torch.nn.Module, cfg: NvlConfig, bridge: Any) -> None:
    """``model.freeze_<group>``: the bridge freezes the groups it declares (:meth:`ModelBridge.freeze`)."""
    bridge.freeze(model, dict(cfg.model.freeze), key="model")


def apply_peft(model: torch.nn.Module, cfg: NvlConfig, manager: Any, bridge: Any) -> Any:
    """Apply ``peft.method`` (registered PEFT method) to ``model``; returns the method object or None."""
    from nvlcore.config import config_to_dict
    from nvlcore.training.peft import apply_peft_method

    return apply_peft_method(model, config_to_dict(cfg)["peft"], bridge=bridge, manager=manager)


def describe_peft_parameters(model: torch.nn.Module, adapter_names: set[str], *, tp_size: int) -> str:
    """Whole-model (TP-independent) counts: trainable of total, and the adapters' share.

    A parameter Megatron marks ``tensor_model_parallel`` counts ``numel * tp_size``; others count once.
    """
    trainable = total = adapter = 0
    for name, p in model.named_parameters():
        n = p.numel() * (tp_size if getattr(p, "tensor_model_parallel", False) else 1)
        total += n
        trainable += n if p.requires_grad else 0
        adapter += n if name in adapter_names else 0
    pct = 100 * trainable / total if total else 0.0
    return f"trainable parameters: {trainable:,} of {total:,} ({pct:.3f}%); adapter parameters: {adapter:,}"


@attrs.frozen
class TowerStatus:
    """How one top-level submodule of the model is trained (printed at start, see :func:`tower_status`).

    :param name: the model's top-level submodule (a tower: ``decoder``, ``encoder``, ...).
    :param base_trainable: its own (non-PEFT) parameters with ``requires_grad``, counted on this rank.
    :param base_total: its own parameters.
    :param adapter: parameters the PEFT method added in it (all trainable ones counted).
    """

    name: str
    base_trainable: int
    base_total: int
    adapter: int

    @property
    def state(self) -> str:
        if self.base_total and self.base_trainable == self.base_total:
            return "trained fully" + (" + adapters" if self.adapter else "")
        if self.base_trainable == 0:
            return "frozen + adapters" if self.adapter else "frozen"
        return (f"partly trained ({self.base_trainable:,} of {self.base_total:,} parameters)"
                + (" + adapters" if self.adapter else ""))


def tower_status(model: torch.nn.Module, adapter_names: set[str]) -> list[TowerStatus]:
    """Per top-level submodule: its base parameters that train and the adapter parameters added to it.

    ``adapter_names``: the PEFT method's parameters (:meth:`~nvlcore.contracts.PeftMethod.adapter_parameters`);
    every other parameter is a base parameter.
    """
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0] if "." in name else "(top level)"
        g = groups.setdefault(top, [0, 0, 0])
        if name not in adapter_names:
            g[1] += p.numel()
            g[0] += p.numel() if p.requires_grad else 0
        elif p.requires_grad:
            g[2] += p.numel()
    return [TowerStatus(n, *v) for n, v in groups.items()]


def describe_towers(statuses: list[TowerStatus]) -> str:
    """One line: ``trained fully: encoder, projector; with adapters: decoder; frozen: -``."""
    full = [t.name for t in statuses if t.base_total and t.base_trainable == t.base_total]
    adapters = [t.name for t in statuses if t.adapter]
    frozen = [t.name for t in statuses if t.base_trainable == 0 and not t.adapter]
    partly = [t.name for t in statuses if 0 < t.base_trainable < t.base_total]
    parts = [f"trained fully: {', '.join(full) or '-'}", f"with adapters: {', '.join(adapters) or '-'}",
             f"frozen: {', '.join(frozen) or '-'}"]
    if partly:
        parts.append(f"partly trained: {', '.join(partly)}")
    return "; ".join(parts)


def prepare_trainable(model: torch.nn.Module, cfg: NvlConfig, manager: Any,
                      bridge: Any) -> tuple[Any, list[TowerStatus]]:
    """Freeze (``model.freeze_*``), then apply ``peft.method``; returns the method and what each tower does.

    A base parameter trains only if neither ``model.freeze_*`` nor the PEFT method freezes it
    (Megatron-Bridge: the provider freezes first, then the PEFT method freezes its towers; a method
    never unfreezes).
    """
    apply_freeze_flags(model, cfg, bridge)
    peft = apply_peft(model, cfg, manager, bridge)
    return peft, tower_status(model, set(peft.adapter_parameters(model)) if peft is not None else set())


#: ``PYTORCH_CUDA_ALLOC_CONF`` when the user sets none (PyTorch's expandable segments).
ALLOCATOR_DEFAULT = "expandable_segments:True"


def check_recompute_modules(cfg: NvlConfig, bridge: Any) -> None:
    """``model.recompute_modules``: read under selective recomputation only, in the bridge's names."""
    modules = cfg.model.recompute_modules
    if modules is None:
        return
    if cfg.model.recompute_granularity != "selective":
        raise ValueError(f"model.recompute_modules={list(modules)} is read under model.recompute_granularity=selective "
                         f"only (it is {cfg.model.recompute_granularity}); set that, or remove recompute_modules")
    known = dict(bridge.recompute_modules)
    unknown = [m for m in modules if m not in known]
    if unknown:
        choices = ", ".join(known) or "none: it has no selective modules"
        raise ValueError(f"model.recompute_modules: {', '.join(map(repr, unknown))} unknown to model bridge "
                         f"{bridge.name!r} (it knows {choices})")


def check_cuda_graphs(cfg: NvlConfig, bridge: Any, device_type: str) -> None:
    """``model.cuda_graph_impl=local`` before the model is built: a CUDA device, and scopes the bridge graphs
    (the config's own checks, in nvlcore.config.refused, ran at load)."""
    from nvlcore.config import ConfigError
    from nvlcore.config.refused import cuda_graph_scopes

    m = cfg.model
    if m.cuda_graph_impl == "none":
        return
    if device_type != "cuda":
        raise ConfigError(f"model.cuda_graph_impl={m.cuda_graph_impl} needs a CUDA device (this run is on "
                          f"{device_type}); set model.cuda_graph_impl=none", key="model.cuda_graph_impl")
    known = bridge.cuda_graph_scopes
    for scope in cuda_graph_scopes(m.cuda_graph_scope):
        if scope not in known:
            raise ConfigError(f"model.cuda_graph_scope: {scope!r} is not a scope model bridge {bridge.name!r} "
                              f"graphs (it has: {', '.join(known) or 'none'})", key="model.cuda_graph_scope")


def _flops_fn(bridge: Any, model: torch.nn.Module, ctx: ParallelContext, *,
              frozen_base: bool) -> tuple[Callable[[Mapping[str, Any]], float], str]:
    """Training FLOPs a micro-batch executes (:meth:`ModelBridge.train_flops`, times
    :data:`~nvlcore.bridge.FROZEN_BASE_FLOPS_SHARE` when ``frozen_base``: a PEFT run computes no weight
    gradients of the base) and whether the bridge has its own formula."""
    from nvlcore.bridge import FROZEN_BASE_FLOPS_SHARE, ModelBridge

    n = 0
    for p in model.parameters():
        n += p.numel() * (ctx.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
    own = type(bridge).train_flops is not ModelBridge.train_flops
    share = FROZEN_BASE_FLOPS_SHARE if frozen_base else 1.0
    return (lambda batch: share * float(bridge.train_flops(batch, num_parameters=n))), ("bridge" if own else "6N")


def loop_settings(cfg: NvlConfig, *, dp_size: int, device_type: str) -> LoopSettings:
    import torch

    from nvlcore.training.fp8 import is_bf16_precision

    mbs = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size
    if gbs % (mbs * dp_size):
        raise ValueError(
            f"train.global_batch_size={gbs} must be a multiple of train.micro_batch_size ({mbs}) x "
            f"data-parallel size ({dp_size})"
        )
    precision = cfg.mixed_precision or ("bf16_mixed" if cfg.optimizer.bf16 else "fp16_mixed" if cfg.optimizer.fp16
                                        else "fp32")
    if precision == "fp16_mixed":
        raise ValueError("mixed_precision=fp16_mixed is not supported by nvl finetune; use bf16_mixed (the recipe's) "
                         "or fp32")
    # the FP8 recipes are bf16 autocast with FP8 matmuls in the chosen linears (nvlcore.training.fp8)
    autocast = torch.bfloat16 if (device_type == "cuda" and is_bf16_precision(precision)) else None
    return LoopSettings(
        train_iters=cfg.train.train_iters,
        global_batch_size=gbs,
        num_microbatches=gbs // (mbs * dp_size),
        clip_grad=cfg.optimizer.clip_grad,
        log_interval=cfg.logger.log_interval,
        save_interval=cfg.checkpoint.save_interval if cfg.checkpoint.save else None,
        eval_interval=cfg.validation.eval_interval,
        generate_eval_interval=cfg.validation.generate_eval_interval,
        eval_iters=cfg.validation.eval_iters,
        autocast_dtype=autocast,
        manual_gc_interval=cfg.train.manual_gc_interval if cfg.train.manual_gc else 0,
        exit_interval=cfg.train.exit_interval,
        exit_duration_s=cfg.train.exit_duration_in_mins * 60 if cfg.train.exit_duration_in_mins else None,
        fail_on_nan_grad=cfg.ddp.check_for_nan_in_grad,
        manual_gc_eval=cfg.train.manual_gc_eval,
        # ddp.bucket_size counts gradient values: fp32, or bf16 under optimizer.main_grads_dtype=torch.bfloat16
        bucket_bytes=cfg.ddp.bucket_size * (2 if cfg.optimizer.main_grads_dtype == "torch.bfloat16" else 4)
        if cfg.ddp.bucket_size else None,
        # make_graphed_callables refuses autocast's weight-cast cache, at capture and at replay
        autocast_cache=cfg.model.cuda_graph_impl == "none",
    )


def resume_schedules(cfg: NvlConfig, saved_run_config: Mapping[str, Any] | None, lr_s: Any, wd_s: Any,
                     *, where: str) -> tuple[Any, Any, str]:
    """The LR and weight-decay schedules of a resumed run (Megatron's ``OptimizerParamScheduler`` rules).

    ``scheduler.override_opt_param_scheduler`` (the default): this config's schedule.
    ``scheduler.use_checkpoint_opt_param_scheduler``: the checkpoint's (from its ``run_config.yaml``).
    Neither: the two must be the same, else a ``ValueError`` naming what differs.
    :returns: ``(lr schedule, wd schedule, a note for the log)``.
    """
    sc = cfg.scheduler
    if sc.override_opt_param_scheduler:
        return lr_s, wd_s, "schedule from this config (scheduler.override_opt_param_scheduler)"
    if not saved_run_config:
        raise ValueError(f"{where} has no run_config.yaml to take the schedule from; set "
                         "scheduler.override_opt_param_scheduler=true to use this config's")
    from nvlcore.config import load_config

    saved = load_config([], [], base=dict(saved_run_config), validate_plugins=False)
    ck_lr, ck_wd = schedules_for(saved)
    if sc.use_checkpoint_opt_param_scheduler:
        return ck_lr, ck_wd, f"schedule from {where} (scheduler.use_checkpoint_opt_param_scheduler)"
    mine = {**{f"lr.{k}": v for k, v in attrs.asdict(lr_s).items()},
            **{f"wd.{k}": v for k, v in attrs.asdict(wd_s).items()}}
    theirs = {**{f"lr.{k}": v for k, v in attrs.asdict(ck_lr).items()},
              **{f"wd.{k}": v for k, v in attrs.asdict(ck_wd).items()}}
    diffs = [f"{k} {mine[k]!r} (checkpoint {theirs[k]!r})" for k in mine if mine[k] != theirs[k]]
    if diffs:
        raise ValueError(
            f"this config's schedule differs from {where}'s in {', '.join(diffs)}; with "
            "scheduler.override_opt_param_scheduler=false set scheduler.use_checkpoint_opt_param_scheduler=true "
            "to continue the checkpoint's, or override_opt_param_scheduler=true to use this config's"
        )
    return lr_s, wd_s, f"schedule checked equal to {where}'s"


@attrs.define
class DataPipeline:
    """The training batches, and the validation and test batches when the maker has those splits."""

    train_batches: Any
    num_train_samples: int
    eval_batches_factory: Callable[[], Any] | None
    eval_note: str
    num_microbatches: int
    test_batches_factory: Callable[[], Any] | None = None
    test_note: str = ""
    #: packed runs: this rank's ``(window, rows consumed)`` after the last micro-batch taken
    packing_position: Callable[[], tuple[int, int]] | None = None

    def close(self) -> None:
        """Stop the training batches' background work (the packed prefetch thread), if any."""
        close = getattr(self.train_batches, "close", None)
        if close is not None:
            close()


def build_data(cfg: NvlConfig, bridge: Any, manager: Any, ctx: ParallelContext, *, consumed_samples: int,
               print_fn: Callable[[str], None],
               packing_positions: Sequence[Sequence[int]] | None = None) -> DataPipeline:
    """The training batches from ``consumed_samples`` (or the packed position), and the validation and test splits."""
    from nvlcore.training.data import GlobalBatchSampler, ProcessedDataset, build_loader
    from nvlcore.training.packing import packing_mode

    ds = cfg.dataset
    maker = manager.registry("dataset_maker").get(ds.maker_name)
    seq_length = ds.seq_length or cfg.model.seq_length
    # pad_to_max_length is padding to a multiple of seq_length.
    processor = bridge.processor(seq_length=seq_length,
                                 pad_to_multiple_of=seq_length if ds.pad_to_max_length else ds.pad_to_multiple_of)
    made = maker(split="train", **dict(ds.maker_kwargs))
    sampler = GlobalBatchSampler(
        num_samples=len(made), global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
        seed=cfg.rng.seed, consumed_samples=consumed_samples, shuffle=ds.dataloader_type == "cyclic",
    )
    pin = ds.pin_memory and ctx.device.type == "cuda"
    packing_position = None
    if packing_mode(cfg) == "none":
        train_batches: Any = iter(build_loader(ProcessedDataset(made, processor, seed=cfg.rng.seed, split="train"),
                                               sampler, processor.collate, num_workers=ds.num_workers, pin_memory=pin,
                                               persistent_workers=ds.persistent_workers))
    else:
        train_batches = _packed_batches(cfg, made, processor, ctx, consumed_samples=consumed_samples, pin=pin,
                                        num_microbatches=sampler.num_microbatches, print_fn=print_fn,
                                        packing_positions=packing_positions)
        packing_position = lambda: train_batches.position  # noqa: E731
    splits = _EvalSplits(cfg, maker, processor, ctx, pin=pin)
    factory, note = splits.validation()
    test_factory, test_note = splits.test()
    return DataPipeline(train_batches, len(made), factory, note, sampler.num_microbatches, test_factory, test_note,
                        packing_position)


def _packed_batches(cfg: NvlConfig, made: Any, processor: Any, ctx: ParallelContext, *, consumed_samples: int,
                    pin: bool, num_microbatches: int, print_fn: Callable[[str], None],
                    packing_positions: Sequence[Sequence[int]] | None) -> Any:
    """``dataset.packing``: windows packed in the workers, micro-batches of packed rows made ahead in a thread."""
    from nvlcore.training.data import GlobalBatchSampler, ProcessedDataset
    from nvlcore.training.packing import PackedBatches, build_packed_loader, packing_mode

    ds = cfg.dataset  # one name per line: tests/test_config_conformance.py reads aliases
    mode = packing_mode(cfg)
    seq_length = ds.seq_length or cfg.model.seq_length
    collate_packed = getattr(processor, "collate_packed", None)
    if collate_packed is None:
        raise ValueError(f"dataset.packing={mode}: the model bridge's processor has no collate_packed(); "
                         "this model cannot train on packed sequences")
    start = None
    if packing_positions is None and consumed_samples:
        print_fn("nvl finetune: the resumed checkpoint holds no packed data position (it was not a packed run); "
                 "packing starts from the beginning of the sample stream")
    if packing_positions is not None:
        if len(packing_positions) != ctx.dp_size:
            raise ValueError(
                f"dataset.packing: the checkpoint's data position was saved by {len(packing_positions)} data-parallel "
                f"rank(s), this run has {ctx.dp_size}; a packed run resumes at the same data-parallel size"
            )
        start = (int(packing_positions[ctx.dp_rank][0]), int(packing_positions[ctx.dp_rank][1]))
    order = GlobalBatchSampler(num_samples=len(made), global_batch_size=1, micro_batch_size=1, seed=cfg.rng.seed,
                               shuffle=ds.dataloader_type == "cyclic")
    loader = build_packed_loader(
        ProcessedDataset(made, processor, seed=cfg.rng.seed, split="train"), order.index_at,
        window=ds.packing_buffer_size, capacity=seq_length, mode=mode, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
        start_window=None if start is None else start[0], num_workers=ds.num_workers,
    )
    print_fn(f"nvl finetune: packing ({mode}) samples into rows of {seq_length} tokens over windows of "
             f"{ds.packing_buffer_size} samples; a micro-batch is {cfg.train.micro_batch_size} packed row(s)")
    # Two iterations of micro-batches made ahead in a thread: collation, pinning and a window's
    # hand-over overlap the GPU's work instead of stalling the step that crosses a window.
    return PackedBatches(iter(loader), collate_packed, micro_batch_size=cfg.train.micro_batch_size,
                         dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, start=start, pin_memory=pin,
                         prefetch=2 * num_microbatches, device=ctx.device)


class _EvalSplits:
    """The validation split (every ``validation.eval_interval``) and the test split (once at the end)."""

    def __init__(self, cfg: NvlConfig, maker: Any, processor: Any, ctx: ParallelContext, *, pin: bool) -> None:
        self.cfg, self.maker, self.processor, self.ctx, self.pin = cfg, maker, processor, ctx, pin
        self.splits = tuple(getattr(maker, "splits", ()) or ())

    def factory(self, split: str, extra_kwargs: Mapping[str, Any]) -> tuple[Callable[[], Any], int]:
        """A function returning a fresh iterator over ``split``'s batches, and the split's size."""
        from nvlcore.training.data import GlobalBatchSampler, ProcessedDataset, build_loader

        cfg, ctx = self.cfg, self.ctx
        ds = cfg.dataset
        made_split = self.maker(split=split, **{**dict(ds.maker_kwargs), **dict(extra_kwargs)})
        split_ds = ProcessedDataset(made_split, self.processor, seed=cfg.rng.seed, split=split)

        def new_loader() -> Any:
            s = GlobalBatchSampler(
                num_samples=len(made_split), global_batch_size=cfg.train.global_batch_size,
                micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                seed=cfg.rng.seed, consumed_samples=0, shuffle=False,
            )
            return build_loader(split_ds, s, self.processor.collate, num_workers=ds.num_workers, pin_memory=self.pin,
                                persistent_workers=ds.persistent_workers)

        if ds.persistent_workers and ds.num_workers > 0:
            kept = new_loader()  # one loader, its workers kept alive between evaluations
            return (lambda: iter(kept)), len(made_split)
        return (lambda: iter(new_loader())), len(made_split)

    def missing(self, split: str) -> str:
        return (f"{split} split skipped: dataset maker {self.cfg.dataset.maker_name!r} has no {split} split "
                f"(it has {', '.join(self.splits) or 'train only'})")

    def validation(self) -> tuple[Callable[[], Any] | None, str]:
        v = self.cfg.validation
        if v.eval_iters > 0 and v.eval_interval:
            if "validation" not in self.splits:
                return None, self.missing("validation").replace("validation split skipped", "validation skipped", 1)
            factory, n = self.factory("validation", self.cfg.dataset.val_maker_kwargs)
            return factory, f"validation: {v.eval_iters} batch(es) every {v.eval_interval} iterations on {n} examples"
        if v.eval_iters > 0:
            return None, "validation skipped: validation.eval_interval is null"
        return None, ""

    def test(self) -> tuple[Callable[[], Any] | None, str]:
        """Megatron-Bridge evaluates the test split once at the end of training, ``eval_iters`` batches."""
        v = self.cfg.validation
        ds = self.cfg.dataset
        if ds.skip_test:
            return None, "test split skipped: dataset.skip_test is set"
        if v.eval_iters <= 0:
            return None, ""  # validation.eval_iters=0 turns validation and test off (the recipe default)
        if "test" not in self.splits:
            return None, self.missing("test")
        factory, n = self.factory("test", ds.test_maker_kwargs)
        return factory, f"test: {v.eval_iters} batch(es) at the end of training on {n} examples"


def build_loggers(cfg: NvlConfig, manager: Any, ctx: ParallelContext, *, resume_iteration: int | None,
                  run_config: Mapping[str, Any]) -> list[Any]:
    """Rank 0's metric sinks: ``logger.loggers`` (console by default), JSONL when saving, wandb and
    TensorBoard when configured (``logger.wandb_project``, ``logger.tensorboard_dir``)."""
    if not ctx.is_main:
        return []
    from nvlcore.parallel import node_prefix

    reg = manager.registry("logger")
    lg = cfg.logger
    names = list(lg.loggers)
    jsonl_path = lg.jsonl_path or (str(Path(cfg.checkpoint.save) / "metrics.jsonl") if cfg.checkpoint.save else None)
    if jsonl_path and "jsonl" not in names:
        names.append("jsonl")
    if lg.wandb_project and "wandb" not in names:
        names.append("wandb")
    if lg.tensorboard_dir and "tensorboard" not in names:
        names.append("tensorboard")
    out = []
    for name in names:
        cls = reg.get(name)
        canonical = reg.canonical(name) if hasattr(reg, "canonical") else name
        if canonical == "console":
            # on CPU a process is not a GPU: say what the throughput is divided by
            out.append(cls(total_iters=cfg.train.train_iters, per="GPU" if ctx.device.type == "cuda" else "process",
                           prefix=node_prefix()))
        elif canonical == "jsonl":
            if not jsonl_path:
                raise ValueError("logger.loggers has 'jsonl' but neither logger.jsonl_path nor checkpoint.save is set")
            out.append(cls(jsonl_path, resume_iteration=resume_iteration))
        elif canonical == "wandb":
            if not lg.wandb_project:
                raise ValueError("logger.loggers has 'wandb' but logger.wandb_project is not set")
            save_dir = lg.wandb_save_dir or (str(Path(cfg.checkpoint.save) / "wandb") if cfg.checkpoint.save else None)
            out.append(cls(project=lg.wandb_project, save_dir=save_dir, exp_name=lg.wandb_exp_name,
                           entity=lg.wandb_entity, config=run_config))
        elif canonical == "tensorboard":
            if not lg.tensorboard_dir:
                raise ValueError("logger.loggers has 'tensorboard' but logger.tensorboard_dir is not set")
            out.append(cls(lg.tensorboard_dir, timers=lg.log_timers_to_tensorboard, resume_iteration=resume_iteration))
        else:
            out.append(cls())
    return out


class MetricsPlotter:
    """Redraws ``metrics.png`` next to ``metrics.jsonl`` (rank 0's JSONL logger) at every save.

    Without matplotlib (an optional extra) it says so once, in one line, and does nothing; a plot that
    fails never stops training.
    """

    def __init__(self, loggers: Any, say: Callable[[str], None]) -> None:
        from nvlcore.training.loggers import JsonlLogger

        paths = [lg.path for lg in loggers if isinstance(lg, JsonlLogger)]
        self.path: Path | None = paths[0] if paths else None
        self.say = say
        self.off = self.path is None

    def plot(self) -> None:
        if self.off:
            return
        from nvlcore.plot import INSTALL_HINT, PlotUnavailable, plot_metrics

        try:
            plot_metrics(self.path)
        except PlotUnavailable:
            self.off = True
            self.say(f"nvl finetune: no metrics.png (matplotlib is not installed; {INSTALL_HINT})")
        except Exception as exc:  # a plot is a convenience: report once, keep training
            self.off = True
            self.say(f"nvl finetune: drawing {self.path.with_name('metrics.png')} failed ({type(exc).__name__}: "
                     f"{exc}); no more plots this run")


class StoppedEarly(SystemExit):
    """Training stopped on SIGTERM/SIGINT: exit status :data:`EXIT_STOPPED_EARLY` (75) when the checkpoint
    was saved, ``128 + signal`` when there was nowhere to save. ``state`` is the final train state."""

    state: TrainState | None = None


class FinetuneRecipe:
    """``nvl finetune`` in one process (one rank of a launch, or the only one), as short phases.

    :meth:`run` calls, in order: :meth:`setup_parallel` (preflight, process groups, seeds),
    :meth:`setup_checkpointing` (the run directory's lock, the resume decision, the async-save group),
    :meth:`setup_model` (bridge, model, kernels, recompute, starting weights, freeze + PEFT),
    :meth:`setup_optimizer` (replica broadcast, optimizer, schedules), :meth:`resume` (weights,
    optimizer, RNG and counters of the checkpoint resumed), :meth:`check_checkpoint_space`,
    :meth:`setup_data` (training batches, validation and test splits), :meth:`setup_logging` (metric
    sinks, FLOPs formula, metrics.png), :meth:`setup_trainer`, :meth:`train`, :meth:`evaluate` (the
    test split), and always :meth:`close`. Each phase leaves its results on the object for the next
    (``self.model``, ``self.optimizer``, ``self.data``, ...); :meth:`save` and :meth:`validate` are
    what the trainer calls back at ``checkpoint.save_interval`` and ``validation.eval_interval``.

    :param cfg: the resolved config.
    :param manager: the plugin manager (default: the process-wide one).
    :param random_init: no starting weights (benchmarks only).
    :param print_fn: where rank 0's notes go.
    :param device_type: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
    """

    def __init__(self, cfg: NvlConfig, *, manager: Any = None, random_init: bool = False,
                 print_fn: Callable[[str], None] = print, device_type: str | None = None) -> None:
        from nvlcore.plugins import get_plugin_manager

        self.cfg = cfg
        self.manager = manager or get_plugin_manager()
        self.random_init = random_init
        self.print_fn = print_fn
        self.device_type = device_type
        self.ctx: Any = None
        self.lock: Any = None
        self.loggers: list[Any] = []
        self.closers: list[Callable[[], None]] = []
        self.pending_saves: list[Any] = []
        self.async_group: Any = None
        self.plotter: MetricsPlotter | None = None
        self.state = TrainState()
        self.prefix = ""
        #: the last "kernels that ran" line's contents (printed again only when it changes)
        self.kernels_reported: dict[str, str] = {}
        #: per-layer CUDA graphs (model.cuda_graph_impl=local), or None
        self.cuda_graphs: Any = None

    def say(self, message: str) -> None:
        """Print ``message`` on rank 0 only (after ``[node 0] `` when the launch spans machines)."""
        if self.ctx is None or self.ctx.is_main:
            self.print_fn(self.prefix + message)

    def run(self) -> TrainState:
        """Train as the config says; returns the final train state.

        :raises StoppedEarly: SIGTERM/SIGINT stopped training (exit status 75 when a checkpoint was saved).
        """
        # before CUDA starts: growable segments instead of fixed blocks, so the card's peak stays close to what
        # the tensors need (visit G: 71 GB allocated, 85 GB reserved without it); the user's setting wins
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_DEFAULT)
        try:
            self.setup_parallel()
            self.setup_checkpointing()
            self.setup_model()
            self.setup_optimizer()
            self.resume()
            self.check_checkpoint_space()
            self.setup_data()
            self.setup_logging()
            self.setup_trainer()
            final = self.train()
            self.evaluate(final)
            return final
        finally:
            self.close()

    # -- phases ------------------------------------------------------------------------------------
    def setup_parallel(self) -> None:
        """Config preflight, process groups, RNG seeds; the run config that checkpoints record."""
        from nvlcore.config import config_to_dict
        from nvlcore.parallel import init_parallel, node_prefix
        from nvlcore.training.preflight import preflight

        cfg = self.cfg
        preflight(cfg, self.manager)  # config contradictions and missing paths, before any process group or model
        self.ctx = ctx = init_parallel(cfg.model.tensor_model_parallel_size, device_type=self.device_type,
                                       seed=cfg.rng.seed, timeout_minutes=cfg.dist.distributed_timeout_minutes,
                                       backend=cfg.dist.distributed_backend)
        # rng.data_parallel_random_init (Megatron): each data-parallel rank seeds its RNGs with seed + 10 x its
        # DP rank (dropout and other draws differ per replica); the weights are still broadcast from the
        # first data-parallel rank (setup_optimizer), so every replica starts from the same model.
        seed_everything(cfg.rng.seed + (10 * ctx.dp_rank if cfg.rng.data_parallel_random_init else 0))
        self.run_config = config_to_dict(cfg)
        self.adapter_only = bool(cfg.peft.method)
        allocator = f"; PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}" \
            if ctx.device.type == "cuda" else ""
        self.prefix = node_prefix()
        if self.prefix and ctx.local_rank == 0:  # one line from each machine: which ranks it runs
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            self.print_fn(f"{self.prefix}nvl finetune: host {socket.gethostname()} runs global ranks "
                          f"{ctx.rank}..{ctx.rank + local - 1} of {ctx.world_size}")
        self.say(f"nvl finetune: {ctx.world_size} process(es): tensor parallel {ctx.tp_size} x data parallel "
                 f"{ctx.dp_size} on {ctx.device.type} ({ctx.backend}){allocator}")

    def setup_checkpointing(self) -> None:
        """Lock ``checkpoint.save`` for this run, decide what to resume, make the async-save group."""
        from nvlcore.training import checkpointing as tck

        cfg, ctx = self.cfg, self.ctx
        self.take_run_lock()
        self.decision = tck.decide_resume(
            load=cfg.checkpoint.load, save=cfg.checkpoint.save, ckpt_step=cfg.checkpoint.ckpt_step,
            run_config=self.run_config, exit_on_missing_checkpoint=cfg.checkpoint.exit_on_missing_checkpoint,
        )
        self.say(f"nvl finetune: {self.decision.reason}")
        if not cfg.checkpoint.save:
            self.say("nvl finetune: WARNING: checkpoint.save is not set: no checkpoint will be written"
                     + (f"; metrics go to {cfg.logger.jsonl_path}" if cfg.logger.jsonl_path
                        else " and no metrics.jsonl"))
        # checkpoint.async_save: the tensors of a save are written by a background thread over a
        # process group of its own (gloo), while training goes on; the save is published (renamed,
        # trackers updated) at the next save or at the end, by every rank at the same point.
        if cfg.checkpoint.async_save and cfg.checkpoint.save and ctx.world_size > 1:
            import torch.distributed as dist

            self.async_group = dist.new_group(backend="gloo")

    def take_run_lock(self) -> None:
        """Rank 0 locks ``checkpoint.save`` (:class:`nvlcore.checkpoint.RunLock`); every rank learns the outcome.
        Over several machines every rank then checks that it sees the same directory
        (:mod:`nvlcore.checkpoint.shared`)."""
        from nvlcore.checkpoint.lock import RunDirectoryLocked, RunLock, describe_holder
        from nvlcore.checkpoint.shared import check_shared_directory
        from nvlcore.parallel import node_rank, spans_nodes

        save, ctx = self.cfg.checkpoint.save, self.ctx
        refused = None
        if save and ctx.is_main:
            try:
                self.lock = RunLock(save, what=f"checkpoint.save={save}").acquire()
            except RunDirectoryLocked as exc:
                refused = str(exc)
        if ctx.world_size > 1:
            import torch.distributed as dist

            box = [refused]
            dist.broadcast_object_list(box, src=0)
            refused = box[0]
        if refused:
            raise RunDirectoryLocked(refused)
        if save and spans_nodes():  # several machines: they must all see this directory
            check_shared_directory(save, rank=ctx.rank, world_size=ctx.world_size, node=node_rank())
        if self.lock is not None and self.lock.took_over:
            self.say(f"nvl finetune: took over {self.lock.path} from {describe_holder(self.lock.took_over)}, "
                     "which no longer runs (a crashed or killed run)")

    def setup_model(self) -> None:
        """Bridge -> memory plan -> model (built in its storage dtypes) -> kernels, recompute, activation
        offload -> starting weights -> ``model.freeze_*`` and PEFT -> the frozen base's storage."""
        from nvlcore.config import config_to_dict
        from nvlcore.training.fp8 import check_fp8_device, fp8_recipe
        from nvlcore.training.memory import hold_to_budget, plan_run
        from nvlcore.training.oom import install_phase_hooks, set_phase

        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        self.bridge = bridge = resolve_bridge(cfg.model.hf_model_path, cfg.model.bridge, manager=self.manager)
        check_recompute_modules(cfg, bridge)
        check_cuda_graphs(cfg, bridge, ctx.device.type)
        self.fp8 = fp8_recipe(cfg.mixed_precision)
        if self.fp8 is not None:
            check_fp8_device(self.fp8, ctx.device)  # before anything is built: one line, no traceback
        plan = plan_run(cfg, bridge, ctx, self.say, manager=self.manager)  # may refuse, or (auto) change cfg
        if plan is not None and plan.chosen is not None:
            self.run_config = config_to_dict(cfg)  # checkpoints record the settings auto chose
        hold_to_budget(cfg, ctx, self.say)  # before anything is allocated: the budget is a limit, not advice
        self.settings = loop_settings(cfg, dp_size=ctx.dp_size, device_type=ctx.device.type)
        if bf16_device_params(cfg.optimizer) and self.settings.autocast_dtype is None:
            from nvlcore.config import ConfigError

            # before anything is built: one line, no traceback
            lean = cfg.optimizer.main_grads_dtype == "torch.bfloat16"
            key = "optimizer.main_grads_dtype" if lean else "optimizer.use_precision_aware_optimizer"
            raise ConfigError(f"{key}={'torch.bfloat16' if lean else 'true'} with the optimizer in host memory "
                              "stores weights in bf16, which needs bf16 autocast: a GPU run with a bf16 mixed "
                              f"precision (this one runs on {ctx.device.type})", key=key)
        set_phase("model build and weight loading")
        self.model = model = self.build_model()
        install_phase_hooks(model, bridge.memory_phases())  # an out-of-memory report names the tower
        model.train()
        self.load_starting_weights(t0)
        self.peft, towers = prepare_trainable(model, cfg, self.manager, bridge)
        self.say(f"nvl finetune: towers: {describe_towers(towers)}")
        self.store_frozen_base()
        self.setup_compute()

    def setup_compute(self) -> None:
        """FP8 matmuls (an FP8 ``mixed_precision`` recipe), the model's kernels (chosen for the device it now
        lives on), recomputation and activation offload."""
        cfg, bridge, model = self.cfg, self.bridge, self.model
        if self.fp8 is not None:
            from nvlcore.training.fp8 import apply_fp8

            adapters = self.peft.adapter_parameters(model) if self.peft is not None else {}
            selection = apply_fp8(model, self.fp8, bridge, adapter_names=adapters)
            self.say(f"nvl finetune: {cfg.mixed_precision}: {selection.describe()}")
        report = bridge.set_kernels(model, cfg.model.kernels)
        if report:
            self.say("nvl finetune: kernels: " + "; ".join(f"{op}: {impl}" for op, impl in report.items()))
        if cfg.model.recompute_granularity:
            modules = cfg.model.recompute_modules
            bridge.set_recompute(model, cfg.model.recompute_granularity, *([modules] if modules is not None else []))
            which = "" if cfg.model.recompute_granularity == "full" else \
                f" of {', '.join(modules if modules is not None else bridge.default_recompute_modules) or 'nothing'}"
            self.say(f"nvl finetune: activation recomputation: {cfg.model.recompute_granularity}{which}")
        if cfg.model.sequence_parallel:
            bridge.set_sequence_parallel(model)
            self.say(f"nvl finetune: sequence parallelism over the {self.ctx.tp_size} tensor-parallel ranks")
        if cfg.model.cpu_offloading:
            from nvlcore.training.offload import offload_activations

            offload_activations(bridge.decoder_layers(model), cfg.model.cpu_offloading_num_layers)
            self.say(f"nvl finetune: activations of the first {cfg.model.cpu_offloading_num_layers} decoder "
                     "layers offloaded to host memory")
        self.cuda_graphs = self.setup_cuda_graphs()

    def setup_cuda_graphs(self) -> Any:
        """``model.cuda_graph_impl=local``: the bridge's modules for ``model.cuda_graph_scope`` wrapped for
        per-layer CUDA graphs (:mod:`nvlcore.training.cuda_graphs`), captured by the trainer after
        ``model.cuda_graph_warmup_steps`` eager steps; None when off. Needs the model on a CUDA device."""
        from nvlcore.config import ConfigError
        from nvlcore.config.refused import check_cuda_graph_settings, cuda_graph_scopes

        m = self.cfg.model
        bridge = self.bridge
        if m.cuda_graph_impl == "none":
            return None
        try:  # again: train.memory_plan=auto may have turned on recomputation or offloading since the load
            check_cuda_graph_settings(self.cfg)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (train.memory_plan=auto may have chosen it; set train.memory_plan=check and a "
                              "setting that fits)", key=exc.key) from None
        scopes = cuda_graph_scopes(m.cuda_graph_scope)
        from nvlcore.training.cuda_graphs import LayerGraphs

        modules = bridge.cuda_graph_modules(self.model, scopes)
        label = f"model.cuda_graph_impl={m.cuda_graph_impl}, scope {','.join(scopes)}"
        graphs = LayerGraphs(modules, warmup_steps=m.cuda_graph_warmup_steps,
                             autocast_dtype=self.settings.autocast_dtype, say=self.say, label=label)
        self.say(f"nvl finetune: CUDA graphs ({label}): {len(modules)} layer(s) to capture after "
                 f"{m.cuda_graph_warmup_steps} eager step(s), at the first micro-batch's shapes")
        return graphs

    def build_model(self) -> torch.nn.Module:
        """The model, each parameter built in the dtype it is stored in (:mod:`nvlcore.training.storage`)."""
        from nvlcore.training.storage import build_in_storage_dtype

        cfg = self.cfg
        model, built = build_in_storage_dtype(
            self.bridge, compute_dtype=self.settings.autocast_dtype, device=self.ctx.device,
            init="random" if self.random_init else "none", seed=cfg.rng.seed,
            prepare=lambda m: prepare_trainable(m, cfg, self.manager, self.bridge),
            frozen_expected=bool(cfg.peft.method) or any(bool(v) for v in cfg.model.freeze.values()),
            on_host=cfg.model.use_cpu_initialization)
        self.say(f"nvl finetune: model {built}")
        return model

    def store_frozen_base(self) -> None:
        """Trainable parameters as fp32 masters; the frozen base as the PEFT method stores it (e.g. NF4),
        else in the autocast dtype, except what the bridge keeps in fp32 as deployed."""
        from nvlcore.training import optim
        from nvlcore.training.storage import move_to_device, trainable_in_fp32

        model, peft, dtype = self.model, self.peft, self.settings.autocast_dtype
        trainable_in_fp32(model)  # adapters added to a base built in bf16 take its dtype; masters are fp32
        store_base = getattr(peft, "store_frozen_base", None)
        if store_base is not None:  # a PEFT method's own storage of the frozen base (e.g. 4-bit)
            store_base(model, bridge=self.bridge, compute_dtype=dtype, device=self.ctx.device)
        if dtype is not None:
            # under bf16 autocast every matmul reads bf16 weights: a frozen parameter is stored once in bf16
            optim.store_frozen_in_(model, dtype, keep_fp32=self.bridge.keeps_fp32)
        moved = move_to_device(model, self.ctx.device)  # built in host memory: model.use_cpu_initialization
        if moved:
            self.say(f"nvl finetune: moved {moved / 1e9:.1f} GB of the model from host memory to {self.ctx.device}")
        if peft is not None:
            self.say("nvl finetune: frozen base storage: " + optim.describe_storage(model)
                     + "".join(f"; {n}" for n in getattr(peft, "storage_notes", ())))
        self.say("nvl finetune: built model's static memory: " + optim.memory_plan(model).describe())

    @property
    def weights_from_checkpoint(self) -> bool:
        """A full run resumed: the model's weights come from the checkpoint (:meth:`resume`), not from
        :meth:`load_starting_weights`, and are unset memory until then (built with ``init="none"``)."""
        return self.decision.iter_dir is not None and not self.adapter_only and not self.random_init

    def load_starting_weights(self, t0: float) -> None:
        """``checkpoint.pretrained_checkpoint`` unless resuming a full run (or ``random_init``)."""
        needs_base = self.decision.iter_dir is None or self.adapter_only
        if self.random_init:
            self.say(RANDOM_INIT_BANNER)
        elif needs_base:
            src = self.cfg.checkpoint.pretrained_checkpoint
            if not src:
                raise ValueError("no starting weights: pass --pretrained-checkpoint DIR (a Megatron checkpoint or an "
                                 "HF directory)")
            load_pretrained(self.model, src, bridge=self.bridge, ctx=self.ctx)
            self.say(f"nvl finetune: loaded pretrained weights from {src} ({time.perf_counter() - t0:.1f} s)")

    def setup_optimizer(self) -> None:
        """Same weights on every data-parallel replica, then the optimizer and the LR/WD schedules."""
        from megatron.core import parallel_state

        from nvlcore.training import optim

        cfg, ctx, model = self.cfg, self.ctx, self.model
        self.named = named = optim.trainable_named_parameters(model)
        if not self.weights_from_checkpoint:  # else the weights are still unset memory: checked after resume()
            self.check_replicated()
        # a packed (quantized) frozen weight was quantized on every rank from the same loaded weights
        optim.broadcast_parameters([p.data for p in model.parameters() if not optim.is_packed(p)],
                                   src_global_rank=parallel_state.get_data_parallel_src_rank(),
                                   group=ctx.dp_group, group_size=ctx.dp_size)
        n_train = sum(p.numel() for _, p in named)
        n_all = sum(p.numel() for p in model.parameters())
        self.say(f"nvl finetune: {n_train:,} of {n_all:,} parameters trainable on this rank"
                 + (f" (PEFT {cfg.peft.method}; adapter-only checkpoints)" if self.peft else ""))
        if self.peft is not None:
            counts = describe_peft_parameters(model, set(self.peft.adapter_parameters(model)), tp_size=ctx.tp_size)
            self.say(f"nvl finetune: {cfg.peft.method}: {counts}")
        o = cfg.optimizer
        self.optimizer = optim.build_optimizer(
            named, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay,
            device_type=ctx.device.type, optimizer=o.optimizer, sgd_momentum=o.sgd_momentum,
            distributed=cfg.ddp.use_distributed_optimizer, dp_group=ctx.dp_group, dp_size=ctx.dp_size,
            **moment_dtypes(cfg), **self.bf16_params_kwargs(),
        )
        self.say(f"nvl finetune: optimizer: {describe_optimizer(self.optimizer, named, cfg, ctx)}")
        self.lr_schedule, self.wd_schedule = schedules_for(cfg)

    def bf16_params_kwargs(self) -> dict[str, Any]:
        """``optimizer.use_precision_aware_optimizer`` fully offloaded with fp32 main grads: the trainable
        weights stored bf16 on the device (the bridge's :meth:`~nvlcore.bridge.ModelBridge.matmul_weights`; a
        PEFT method's adapters stay fp32)."""
        if not bf16_device_params(self.cfg.optimizer) or self.cfg.optimizer.main_grads_dtype == "torch.bfloat16":
            return {}
        adapters = set(self.peft.adapter_parameters(self.model)) if self.peft is not None else set()
        return {"bf16_params": self.bridge.matmul_weights() - adapters}

    def check_replicated(self) -> None:
        """The parameters Megatron replicates over tensor-parallel ranks hold the same values on each."""
        from nvlcore.training import optim

        optim.check_replicated_parameters(list(self.model.named_parameters()), tp_group=self.ctx.tp_group,
                                          tp_size=self.ctx.tp_size)

    def resume(self) -> None:
        """Restore the checkpoint the resume decision chose (if any) and its schedules."""
        it_dir = self.decision.iter_dir
        if it_dir is None:
            return
        from nvlcore.checkpoint import open_checkpoint

        self.state = st = restore(it_dir, model=self.model, optimizer=self.optimizer, named=self.named,
                                  bridge=self.bridge, ctx=self.ctx, cfg=self.cfg, adapter_only=self.adapter_only)
        if self.weights_from_checkpoint:
            self.check_replicated()
        self.say(f"nvl finetune: resumed at iteration {st.iteration} (consumed samples {st.consumed_samples}, "
                 f"{st.optimizer_steps} updates, {st.skipped_iterations} skipped)")
        self.lr_schedule, self.wd_schedule, note = resume_schedules(
            self.cfg, open_checkpoint(it_dir).run_config(), self.lr_schedule, self.wd_schedule, where=it_dir.name)
        self.say(f"nvl finetune: {note}")

    def check_checkpoint_space(self) -> None:
        """Refuse a disk too small for one checkpoint before any iteration runs (warn if too small for k)."""
        from nvlcore.training import checkpointing as tck

        ck = self.cfg.checkpoint
        if ck.save:
            need = tck.estimate_checkpoint_bytes(self.model, self.ctx, adapter_only=self.adapter_only,
                                                 save_optim=ck.save_optim)
            tck.check_checkpoint_space(self.cfg, need, self.ctx, start_iteration=self.state.iteration, say=self.say)

    def setup_data(self) -> None:
        """The training batches (from the resumed position) and the validation/test splits."""
        packing_positions = None
        if self.decision.iter_dir is not None:
            from nvlcore.checkpoint import open_checkpoint

            extra = open_checkpoint(self.decision.iter_dir).extra_state() or {}
            packing_positions = (extra.get("data") or {}).get("packing")
        self.data = build_data(self.cfg, self.bridge, self.manager, self.ctx, print_fn=self.say,
                               consumed_samples=self.state.consumed_samples, packing_positions=packing_positions)
        self.closers.append(self.data.close)
        for note in (self.data.eval_note, self.data.test_note):
            if note:
                self.say(f"nvl finetune: {note}")

    def setup_logging(self) -> None:
        """Metric sinks, the FLOPs formula, and metrics.png redrawn at each save."""
        # metrics.jsonl keeps rows up to the iteration training starts from: rows a killed run logged
        # after its last checkpoint (or before any) are dropped, so each iteration appears once
        self.loggers = build_loggers(self.cfg, self.manager, self.ctx, resume_iteration=self.state.iteration,
                                     run_config=self.run_config)
        frozen_base = self.peft is not None
        self.flops_fn, flops_method = _flops_fn(self.bridge, self.model, self.ctx, frozen_base=frozen_base)
        if flops_method != "bridge":
            self.say("nvl finetune: the bridge has no FLOPs formula of its own (train_flops); TFLOP/s uses 6 x "
                     "parameters x tokens (no attention/ViT terms)")
        if frozen_base:
            self.say("nvl finetune: TFLOP/s counts the work executed: 2/3 of training's 3 x forward (the frozen "
                     "base computes no weight gradients)")
        self.plotter = MetricsPlotter(self.loggers, self.say)

    def setup_trainer(self) -> None:
        """The training loop with this recipe's save, validation and generation-eval callbacks."""
        cfg = self.cfg
        generate_eval_fn = None
        if cfg.validation.generate_eval_interval:
            from nvlcore.eval.training import build_generate_eval

            generate_eval_fn = build_generate_eval(cfg, self.bridge, self.model, self.manager, self.ctx,
                                                   print_fn=self.say)
        self.trainer = Trainer(
            model=self.model, ctx=self.ctx, optimizer=self.optimizer, named_params=self.named,
            lr_schedule=self.lr_schedule, wd_schedule=self.wd_schedule, settings=self.settings, state=self.state,
            flops_fn=self.flops_fn, loggers=self.loggers, save_fn=self.save if cfg.checkpoint.save else None,
            eval_fn=self.validate if self.data.eval_batches_factory is not None else None,
            generate_eval_fn=generate_eval_fn, print_fn=self.say, first_step_fn=self.report_kernels_ran,
            cuda_graphs=self.cuda_graphs,
        )
        if self.decision.iter_dir is not None:
            self.trainer.last_saved_iteration = self.state.iteration

    def report_kernels_ran(self) -> None:
        """Print which implementation ran for the ops whose path depends on the inputs
        (:meth:`ModelBridge.kernels_ran`), when it is new: after the first step, and at the end if a later
        batch took another path. The start's ``kernels:`` line says what was selected."""
        ran = self.bridge.kernels_ran(self.model)
        if ran and ran != self.kernels_reported:
            self.kernels_reported = dict(ran)
            self.say("nvl finetune: kernels that ran: " + "; ".join(f"{op}: {impl}" for op, impl in ran.items()))

    def train(self) -> TrainState:
        """Run the loop; a signal that stopped it raises :class:`StoppedEarly` after the last save."""
        s, trainer = self.settings, self.trainer
        self.say(f"nvl finetune: training iterations {self.state.iteration + 1}..{s.train_iters}: global batch "
                 f"{s.global_batch_size} = {s.num_microbatches} micro-batch(es) x "
                 f"{self.cfg.train.micro_batch_size} x {self.ctx.dp_size} data-parallel rank(s)")
        final = trainer.run(self.data.train_batches)
        self.report_kernels_ran()  # again only if a later batch took another path
        self.finish_pending_saves()
        self.say(f"nvl finetune: {describe_state_bytes(self.optimizer, self.ctx)}")
        if trainer.stopped_by is None:
            return final
        saved = trainer.save_fn is not None and trainer.last_saved_iteration == final.iteration
        self.say(f"nvl finetune: stopped early by {trainer.stopped_by} at iteration {final.iteration}"
                 + (f"; checkpoint saved, exit status {EXIT_STOPPED_EARLY} (resume with the same command)"
                    if saved else "; no checkpoint (checkpoint.save is not set)"))
        code = EXIT_STOPPED_EARLY
        if not saved:
            by = trainer.stopped_by
            code = 128 + int(signal.Signals[by]) if by in signal.Signals.__members__ else 1
        stopped = StoppedEarly(code)
        stopped.state = final
        raise stopped

    def evaluate(self, final: TrainState) -> None:
        """The test split, once at the end of a completed run (Megatron-Bridge), logged as ``test_loss``."""
        if self.data.test_batches_factory is None or final.iteration < self.settings.train_iters:
            return
        from nvlcore.training.trainer import evaluate

        loss_sum, sup = evaluate(self.model, self.data.test_batches_factory(), ctx=self.ctx,
                                 autocast_dtype=self.settings.autocast_dtype,
                                 num_batches=self.cfg.validation.eval_iters * self.data.num_microbatches)
        test_loss = loss_sum / sup if sup > 0 else float("nan")
        self.say(f"nvl finetune: test loss {test_loss:.4f} over {sup:,.0f} supervised tokens")
        for lg in self.loggers:
            lg.log({"iteration": final.iteration, "test_loss": test_loss, "test_tokens": sup}, step=final.iteration)

    # -- callbacks of the loop -----------------------------------------------------------------------
    def validate(self) -> tuple[float, float]:
        """``validation.eval_iters`` global batches of the validation split: ``(loss sum, supervised tokens)``."""
        from nvlcore.training.trainer import evaluate

        assert self.data.eval_batches_factory is not None
        return evaluate(self.model, self.data.eval_batches_factory(), ctx=self.ctx,
                        num_batches=self.cfg.validation.eval_iters * self.data.num_microbatches,
                        autocast_dtype=self.settings.autocast_dtype)

    def save(self, st: TrainState) -> None:
        """Write the checkpoint of ``st`` (collective); with ``checkpoint.async_save`` start writing it."""
        self.finish_pending_saves()
        path = save(self.cfg.checkpoint.save, st, model=self.model, optimizer=self.optimizer, bridge=self.bridge,
                    ctx=self.ctx, cfg=self.cfg, run_config=self.run_config, adapter_only=self.adapter_only,
                    num_samples=self.data.num_train_samples, async_group=self.async_group,
                    packing_positions=gather_packing_positions(self.data.packing_position, self.ctx))
        if isinstance(path, Path):
            self.say(f"nvl finetune: saved checkpoint {path}")
            self.plot()
        else:
            self.pending_saves.append(path)
            self.say(f"nvl finetune: writing checkpoint {path.path.name} in the background")

    def finish_pending_saves(self) -> None:
        """Publish the background saves still being written (collective, every rank at the same point)."""
        while self.pending_saves:
            self.say(f"nvl finetune: saved checkpoint {self.pending_saves.pop().wait()}")
            self.plot()

    def plot(self) -> None:
        if self.plotter is not None:
            self.plotter.plot()

    def close(self) -> None:
        """Stop data workers, close the loggers, release the run lock, tear down the process groups."""
        from nvlcore.parallel import destroy_parallel

        for close in self.closers:
            close()
        for lg in self.loggers:
            try:
                lg.close()
            except Exception as exc:  # a failing sink must not hide the training error
                self.say(f"nvl finetune: closing logger {type(lg).__name__} failed: {exc}")
        if self.lock is not None:
            self.lock.release()
        if self.ctx is not None:
            destroy_parallel(self.ctx)


def run_finetune(
    cfg: NvlConfig,
    *,
    manager: Any = None,
    random_init: bool = False,
    print_fn: Callable[[str], None] = print,
    device_type: str | None = None,
) -> TrainState:
    """Train as ``cfg`` says, in this process (one rank of a launch, or the only one): :class:`FinetuneRecipe`.

    ``cfg.model.hf_model_path`` names the HF directory the bridge reads; ``cfg.checkpoint.pretrained_checkpoint``
    the starting weights (a Megatron checkpoint, base or ``iter_N`` dir, or an HF directory), unless
    ``random_init`` (benchmarks only).

    :raises StoppedEarly: a ``SystemExit`` with status 75 (:data:`nvlcore.interrupt.EXIT_STOPPED_EARLY`)
        when SIGTERM/SIGINT stopped training and the checkpoint of the last iteration was saved.
    """
    return FinetuneRecipe(cfg, manager=manager, random_init=random_init, print_fn=print_fn,
                          device_type=device_type).run()


def moment_dtypes(cfg: NvlConfig) -> dict[str, Any]:
    """Where and how Adam keeps its state: the moment dtypes under the precision-aware optimizer, the
    fraction of it in host memory under optimizer_cpu_offload (arguments of ``optim.build_optimizer``)."""
    o = cfg.optimizer
    out: dict[str, Any] = {}
    if o.optimizer_cpu_offload:
        out["offload_fraction"] = o.optimizer_offload_fraction
    if o.main_grads_dtype == "torch.bfloat16":  # config validation allows it only with fp32 moments
        out["main_grads_dtype"] = o.main_grads_dtype
    elif o.use_precision_aware_optimizer and not o.optimizer_cpu_offload:
        out |= {"exp_avg_dtype": o.exp_avg_dtype, "exp_avg_sq_dtype": o.exp_avg_sq_dtype}
    return out


def describe_optimizer(opt: Any, named: Any, cfg: NvlConfig, ctx: ParallelContext) -> str:
    """One line: the optimizer kind and where its state lives (sharded over data-parallel ranks or not)."""
    from nvlcore.training import optim

    o = cfg.optimizer
    kind = "AdamW" if o.optimizer == "adam" else f"SGD (momentum {o.sgd_momentum:g})"
    per_param = 4 * len(optim.state_names(opt))  # fp32 state tensors per parameter element
    dts = {k: v for k, v in moment_dtypes(cfg).items() if k.startswith("exp_avg")}
    if o.optimizer_cpu_offload:
        kind += f"; state of {o.optimizer_offload_fraction:.0%} of the parameter values in host memory"
    if o.main_grads_dtype == "torch.bfloat16":
        kind += ("; parameters of >= 2 dims and their gradients in bf16 on the device, their fp32 masters in host "
                 "memory")
    elif bf16_device_params(cfg.optimizer):
        n_low = sum(p.numel() for _, p in named if getattr(p, "main_grad", None) is not None)
        kind += (f"; {n_low:,} values of linear layers' weights in bf16 on the device with fp32 main gradients, "
                 "their fp32 masters in host memory")
    host = getattr(optim.local_optimizer(opt), "host_bytes", None)
    if host is not None:
        kind += f" ({host() / 1e9:.2f} GB of host memory on this rank)"
    if dts and o.optimizer == "adam":
        kind += f" (moments stored as {dts['exp_avg_dtype']} / {dts['exp_avg_sq_dtype']})"
        per_param = sum({"torch.bfloat16": 2, "torch.uint8": 1}.get(d, 4) for d in dts.values())
    n_all = sum(p.numel() for _, p in named)
    if optim.is_sharded(opt):
        n_own = sum(p.numel() for _, p in named if optim.owns_parameter(opt, p))
        return (f"{kind}; distributed optimizer (ZeroRedundancyOptimizer): state sharded over {ctx.dp_size} "
                f"data-parallel ranks, rank {ctx.rank} keeps {n_own:,} of {n_all:,} parameters' state "
                f"({n_own * per_param / 2**20:.1f} of {n_all * per_param / 2**20:.1f} MiB)")
    if cfg.ddp.use_distributed_optimizer:
        return f"{kind}; state on the one data-parallel rank ({n_all * per_param / 2**20:.1f} MiB; nothing to shard)"
    mib = n_all * per_param / 2**20
    return f"{kind}; state replicated on each of {ctx.dp_size} data-parallel rank(s) ({mib:.1f} MiB each)"


def describe_state_bytes(opt: Any, ctx: ParallelContext) -> str:
    """The optimizer-state bytes each data-parallel rank holds (collective over the data-parallel group)."""
    import torch
    import torch.distributed as dist

    from nvlcore.training import optim

    held = torch.zeros(ctx.dp_size, dtype=torch.float64, device=ctx.device)
    held[ctx.dp_rank] = float(optim.optimizer_state_bytes(opt))
    if ctx.dp_size > 1:
        dist.all_reduce(held, group=ctx.dp_group)
    per = [int(x) for x in held.tolist()]
    return f"optimizer state held per data-parallel rank: {per} bytes"


def load_pretrained(model: torch.nn.Module, src: str, *, bridge: Any, ctx: ParallelContext) -> None:
    """Starting weights from an HF directory (bridge mapping) or a Megatron checkpoint (base or ``iter_N`` dir)."""
    from nvlcore.bridge import is_hf_dir
    from nvlcore.checkpoint import resolve_checkpoint_dir

    p = Path(src).expanduser()
    if is_hf_dir(p):
        bridge.load_hf_weights(model, p)
        return
    if not p.exists():
        raise FileNotFoundError(f"--pretrained-checkpoint {p}: no such directory")
    bridge.load_checkpoint_weights(model, resolve_checkpoint_dir(p))


def gather_packing_positions(position: Callable[[], tuple[int, int]] | None,
                             ctx: ParallelContext) -> list[list[int]] | None:
    """Every DP rank's packed-data position ``[[window, rows], ...]`` (collective), or None unpacked."""
    if position is None:
        return None
    mine = [int(x) for x in position()]
    if ctx.dp_size == 1:
        return [mine]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.dp_size
    dist.all_gather_object(out, mine, group=ctx.dp_group)
    return [list(x) for x in out]


def save(root: str, st: TrainState, *, model: Any, optimizer: Any, bridge: Any, ctx: ParallelContext, cfg: NvlConfig,
         run_config: Mapping[str, Any], adapter_only: bool, num_samples: int, async_group: Any = None,
         packing_positions: list[list[int]] | None = None) -> Any:
    """Write one training checkpoint (collective over all ranks): the ``iter_N`` path, or with
    ``checkpoint.async_save`` a :class:`~nvlcore.checkpoint.PendingSave` whose ``wait()`` publishes it."""
    from nvlcore.checkpoint import SaveOptions, capture_rng_state, save_checkpoint
    from nvlcore.training import checkpointing as tck

    model_state, optim_state, adam_step = tck.model_and_optimizer_state(
        model, optimizer, bridge=bridge, ctx=ctx, adapter_only=adapter_only,
    )
    files: dict[str, Path] = {}
    if cfg.checkpoint.save_tokenizer_assets and cfg.model.hf_model_path:
        from nvlcore.convert.engine import TOKENIZER_DIR, TOKENIZER_FILES

        hf = Path(cfg.model.hf_model_path)
        files = {f"{TOKENIZER_DIR}/{n}": hf / n for n in TOKENIZER_FILES if (hf / n).is_file()}
    extra = {
        "adam_step": adam_step,
        "data": {"consumed_samples": st.consumed_samples, "seed": cfg.rng.seed, "num_samples": num_samples,
                 **({"packing": packing_positions} if packing_positions is not None else {})},
        "layout": {"tp": ctx.tp_size, "dp": ctx.dp_size, "world_size": ctx.world_size},
        "adapter_only": adapter_only,
        "pretrained_checkpoint": cfg.checkpoint.pretrained_checkpoint,
    }
    return save_checkpoint(
        root, st.iteration,
        model_state=model_state,
        sharded_states={"optimizer": optim_state} if (cfg.checkpoint.save_optim and optim_state) else None,
        extra_state=extra,
        rank_state={"rng": capture_rng_state()} if cfg.checkpoint.save_rng else None,
        run_config=run_config,
        train_state=st.to_dict(),
        files=files,
        options=SaveOptions(overwrite=True, most_recent_k=cfg.checkpoint.most_recent_k,
                            spread_replicated_writes=cfg.checkpoint.fully_parallel_save,
                            async_write=cfg.checkpoint.async_save, async_group=async_group),
    )


def restore(iter_dir: Path, *, model: Any, optimizer: Any, named: Any, bridge: Any, ctx: ParallelContext,
            cfg: NvlConfig, adapter_only: bool) -> TrainState:
    """Load weights, optimizer, RNG and train state of a training checkpoint (collective)."""
    from nvlcore.checkpoint import open_checkpoint, restore_rng_state
    from nvlcore.training import checkpointing as tck

    ckpt = open_checkpoint(iter_dir)
    extra = ckpt.extra_state() or {}
    if bool(extra.get("adapter_only")) != adapter_only:
        raise ValueError(
            f"{iter_dir} is {'an adapter-only (PEFT)' if extra.get('adapter_only') else 'a full'} checkpoint but this "
            "run "
            f"is {'PEFT' if adapter_only else 'full fine-tuning'}; use the same peft settings, or start from it with "
            "--pretrained-checkpoint"
        )
    tck.load_model_weights(model, iter_dir, bridge=bridge, ctx=ctx, only_trainable=adapter_only)
    if cfg.checkpoint.load_optim:
        tck.load_optimizer_state(optimizer, named, iter_dir, adam_step=int(extra.get("adam_step", 0)), bridge=bridge,
                                 ctx=ctx)
    state = TrainState.from_dict(ckpt.train_state())
    data = extra.get("data") or {}
    if data.get("seed") is not None and data["seed"] != cfg.rng.seed:
        raise ValueError(f"{iter_dir} was trained with rng.seed={data['seed']}, this run has {cfg.rng.seed}: the data "
                         "order would change")
    if cfg.checkpoint.load_rng:
        layout = extra.get("layout") or {}
        rank_state = ckpt.rank_state(ctx.rank) if layout.get("world_size") == ctx.world_size else None
        if rank_state is not None and "rng" in rank_state:
            restore_rng_state(rank_state["rng"])
        elif ctx.is_main:
            from nvlcore.parallel import node_prefix

            print(f"{node_prefix()}nvl finetune: {iter_dir} was saved by {layout.get('world_size')} process(es), "
                  f"this run has {ctx.world_size}; RNG states are re-seeded instead of restored")
    return state
