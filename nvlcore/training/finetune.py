"""``run_finetune``: from a resolved config to a trained checkpoint (what ``nvl finetune`` runs in each process).

Order (architecture.md §5): process groups -> bridge -> model -> pretrained weights (Megatron
checkpoint or HF directory) -> freeze flags -> PEFT -> optimizer -> resume -> data -> loggers -> loop.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import attrs

from nvlcore.bridge import resolve_bridge
from nvlcore.interrupt import EXIT_STOPPED_EARLY
from nvlcore.training.schedules import schedules_for
from nvlcore.training.trainer import LoopSettings, TrainState, Trainer

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


def apply_freeze_flags(model: "torch.nn.Module", cfg: "NvlConfig", bridge: Any) -> None:
    """``model.freeze_<group>``: the bridge freezes the groups it declares (:meth:`ModelBridge.freeze`)."""
    bridge.freeze(model, dict(cfg.model.freeze), key="model")


def apply_peft(model: "torch.nn.Module", cfg: "NvlConfig", manager: Any, bridge: Any) -> Any:
    """Apply ``peft.method`` (registered PEFT method) to ``model``; returns the method object or None."""
    from nvlcore.config import config_to_dict
    from nvlcore.training.peft import apply_peft_method

    return apply_peft_method(model, config_to_dict(cfg)["peft"], bridge=bridge, manager=manager)


def describe_peft_parameters(model: "torch.nn.Module", adapter_names: set[str], *, tp_size: int) -> str:
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


def tower_status(model: "torch.nn.Module", adapter_names: set[str]) -> list[TowerStatus]:
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


def prepare_trainable(model: "torch.nn.Module", cfg: "NvlConfig", manager: Any, bridge: Any) -> tuple[Any, list[TowerStatus]]:
    """Freeze (``model.freeze_*``), then apply ``peft.method``; returns the method and what each tower does.

    A base parameter trains only if neither ``model.freeze_*`` nor the PEFT method freezes it
    (Megatron-Bridge: the provider freezes first, then the PEFT method freezes its towers; a method
    never unfreezes).
    """
    apply_freeze_flags(model, cfg, bridge)
    peft = apply_peft(model, cfg, manager, bridge)
    return peft, tower_status(model, set(peft.adapter_parameters(model)) if peft is not None else set())


def _flops_fn(bridge: Any, model: "torch.nn.Module", ctx: "ParallelContext") -> tuple[Callable[[Mapping[str, Any]], float], str]:
    """Training FLOPs per micro-batch (:meth:`ModelBridge.train_flops`) and whether the bridge has its own formula."""
    from nvlcore.bridge import ModelBridge

    n = 0
    for p in model.parameters():
        n += p.numel() * (ctx.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
    own = type(bridge).train_flops is not ModelBridge.train_flops
    return (lambda batch: float(bridge.train_flops(batch, num_parameters=n))), ("bridge" if own else "6N")


def loop_settings(cfg: "NvlConfig", *, dp_size: int, device_type: str) -> LoopSettings:
    import torch

    mbs = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size
    if gbs % (mbs * dp_size):
        raise ValueError(
            f"train.global_batch_size={gbs} must be a multiple of train.micro_batch_size ({mbs}) x "
            f"data-parallel size ({dp_size})"
        )
    precision = cfg.mixed_precision or ("bf16_mixed" if cfg.optimizer.bf16 else "fp16_mixed" if cfg.optimizer.fp16 else "fp32")
    if precision == "fp16_mixed":
        raise ValueError("mixed_precision=fp16_mixed is not supported by nvl finetune; use bf16_mixed (the recipe's) or fp32")
    autocast = torch.bfloat16 if (device_type == "cuda" and precision == "bf16_mixed") else None
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
        bucket_bytes=cfg.ddp.bucket_size * 4 if cfg.ddp.bucket_size else None,  # fp32 gradients
    )


def resume_schedules(cfg: "NvlConfig", saved_run_config: Mapping[str, Any] | None, lr_s: Any, wd_s: Any,
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
    mine = {**{f"lr.{k}": v for k, v in attrs.asdict(lr_s).items()}, **{f"wd.{k}": v for k, v in attrs.asdict(wd_s).items()}}
    theirs = {**{f"lr.{k}": v for k, v in attrs.asdict(ck_lr).items()}, **{f"wd.{k}": v for k, v in attrs.asdict(ck_wd).items()}}
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


def build_data(cfg: "NvlConfig", bridge: Any, manager: Any, ctx: "ParallelContext", *, consumed_samples: int,
               print_fn: Callable[[str], None], packing_positions: Sequence[Sequence[int]] | None = None) -> DataPipeline:
    from nvlcore.training.data import GlobalBatchSampler, ProcessedDataset, build_loader
    from nvlcore.training.packing import PackedBatches, build_packed_loader, packing_mode

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
    mode = packing_mode(cfg)
    packing_position = None
    if mode == "none":
        train_batches: Any = iter(build_loader(ProcessedDataset(made, processor, seed=cfg.rng.seed, split="train"),
                                               sampler, processor.collate, num_workers=ds.num_workers, pin_memory=pin,
                                               persistent_workers=ds.persistent_workers))
    else:
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
        # Two iterations of micro-batches made ahead in a thread: collation, pinning and a window's
        # hand-over overlap the GPU's work instead of stalling the step that crosses a window.
        train_batches = PackedBatches(iter(loader), collate_packed, micro_batch_size=cfg.train.micro_batch_size,
                                      dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, start=start, pin_memory=pin,
                                      prefetch=2 * sampler.num_microbatches, device=ctx.device)
        packing_position = lambda: train_batches.position  # noqa: E731
        print_fn(f"nvl finetune: packing ({mode}) samples into rows of {seq_length} tokens over windows of "
                 f"{ds.packing_buffer_size} samples; a micro-batch is {cfg.train.micro_batch_size} packed row(s)")
    splits = tuple(getattr(maker, "splits", ()) or ())

    def eval_factory(split: str, extra_kwargs: Mapping[str, Any]) -> tuple[Callable[[], Any], int]:
        made_split = maker(split=split, **{**dict(ds.maker_kwargs), **dict(extra_kwargs)})
        split_ds = ProcessedDataset(made_split, processor, seed=cfg.rng.seed, split=split)

        def new_loader() -> Any:
            s = GlobalBatchSampler(
                num_samples=len(made_split), global_batch_size=cfg.train.global_batch_size,
                micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                seed=cfg.rng.seed, consumed_samples=0, shuffle=False,
            )
            return build_loader(split_ds, s, processor.collate, num_workers=ds.num_workers, pin_memory=pin,
                                persistent_workers=ds.persistent_workers)

        if ds.persistent_workers and ds.num_workers > 0:
            kept = new_loader()  # one loader, its workers kept alive between evaluations
            return (lambda: iter(kept)), len(made_split)
        return (lambda: iter(new_loader())), len(made_split)

    def has(split: str) -> bool:
        return split in splits

    factory = None
    note = ""
    v = cfg.validation
    if v.eval_iters > 0 and v.eval_interval:
        if not has("validation"):
            note = (f"validation skipped: dataset maker {ds.maker_name!r} has no validation split "
                    f"(it has {', '.join(splits) or 'train only'})")
        else:
            factory, n = eval_factory("validation", ds.val_maker_kwargs)
            note = f"validation: {v.eval_iters} batch(es) every {v.eval_interval} iterations on {n} examples"
    elif v.eval_iters > 0:
        note = "validation skipped: validation.eval_interval is null"

    # The test split: evaluated once at the end of training (Megatron-Bridge), eval_iters batches.
    test_factory = None
    test_note = ""
    if ds.skip_test:
        test_note = "test split skipped: dataset.skip_test is set"
    elif v.eval_iters <= 0:
        test_note = ""  # validation.eval_iters=0 turns validation and test off (the recipe default)
    elif not has("test"):
        test_note = (f"test split skipped: dataset maker {ds.maker_name!r} has no test split "
                     f"(it has {', '.join(splits) or 'train only'})")
    else:
        test_factory, n = eval_factory("test", ds.test_maker_kwargs)
        test_note = f"test: {v.eval_iters} batch(es) at the end of training on {n} examples"
    return DataPipeline(train_batches, len(made), factory, note, sampler.num_microbatches, test_factory, test_note,
                        packing_position)


def build_loggers(cfg: "NvlConfig", manager: Any, ctx: "ParallelContext", *, resume_iteration: int | None,
                  run_config: Mapping[str, Any]) -> list[Any]:
    """Rank 0's metric sinks: ``logger.loggers`` (console by default), JSONL when saving, wandb and
    TensorBoard when configured (``logger.wandb_project``, ``logger.tensorboard_dir``)."""
    if not ctx.is_main:
        return []
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
            out.append(cls(total_iters=cfg.train.train_iters, per="GPU" if ctx.device.type == "cuda" else "process"))
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
            self.say(f"nvl finetune: drawing {self.path.with_name('metrics.png')} failed ({type(exc).__name__}: {exc}); "
                     "no more plots this run")


class StoppedEarly(SystemExit):
    """Training stopped on SIGTERM/SIGINT: exit status :data:`EXIT_STOPPED_EARLY` (75) when the checkpoint
    was saved, ``128 + signal`` when there was nowhere to save. ``state`` is the final train state."""

    state: TrainState | None = None


def run_finetune(
    cfg: "NvlConfig",
    *,
    manager: Any = None,
    random_init: bool = False,
    print_fn: Callable[[str], None] = print,
    device_type: str | None = None,
) -> TrainState:
    """Train as ``cfg`` says, in this process (one rank of a launch, or the only one).

    ``cfg.model.hf_model_path`` names the HF directory the bridge reads; ``cfg.checkpoint.pretrained_checkpoint``
    the starting weights (a Megatron checkpoint, base or ``iter_N`` dir, or an HF directory), unless
    ``random_init`` (benchmarks only).

    :raises StoppedEarly: a ``SystemExit`` with status 75 (:data:`nvlcore.interrupt.EXIT_STOPPED_EARLY`)
        when SIGTERM/SIGINT stopped training and the checkpoint of the last iteration was saved.
    """

    from nvlcore.config import config_to_dict
    from nvlcore.parallel import destroy_parallel, init_parallel
    from nvlcore.plugins import get_plugin_manager
    from nvlcore.training import checkpointing as tck
    from nvlcore.training import optim

    manager = manager or get_plugin_manager()
    from nvlcore.training.preflight import preflight

    preflight(cfg, manager)  # config contradictions and missing paths, before any process group or model
    ctx = init_parallel(cfg.model.tensor_model_parallel_size, device_type=device_type, seed=cfg.rng.seed,
                        timeout_minutes=cfg.dist.distributed_timeout_minutes, backend=cfg.dist.distributed_backend)
    say = print_fn if ctx.is_main else (lambda _m: None)
    loggers: list[Any] = []
    closers: list[Callable[[], None]] = []
    try:
        # rng.data_parallel_random_init (Megatron): each data-parallel rank seeds its RNGs with seed + 10 x its
        # DP rank (dropout and other draws differ per replica); the weights are still broadcast from the
        # first data-parallel rank below, so every replica starts from the same model.
        seed_everything(cfg.rng.seed + (10 * ctx.dp_rank if cfg.rng.data_parallel_random_init else 0))
        run_config = config_to_dict(cfg)
        adapter_only = bool(cfg.peft.method)
        say(f"nvl finetune: {ctx.world_size} process(es): tensor parallel {ctx.tp_size} x data parallel {ctx.dp_size} "
            f"on {ctx.device.type} ({ctx.backend})")

        decision = tck.decide_resume(
            load=cfg.checkpoint.load, save=cfg.checkpoint.save, ckpt_step=cfg.checkpoint.ckpt_step,
            run_config=run_config, exit_on_missing_checkpoint=cfg.checkpoint.exit_on_missing_checkpoint,
        )
        say(f"nvl finetune: {decision.reason}")
        if not cfg.checkpoint.save:
            say("nvl finetune: WARNING: checkpoint.save is not set: no checkpoint will be written"
                + (f"; metrics go to {cfg.logger.jsonl_path}" if cfg.logger.jsonl_path else " and no metrics.jsonl"))

        # -- model ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        bridge = resolve_bridge(cfg.model.hf_model_path, cfg.model.bridge, manager=manager)
        from nvlcore.training.memory import plan_run

        plan = plan_run(cfg, bridge, ctx, say, manager=manager)  # may refuse the run, or (auto) change cfg to fit
        if plan is not None and plan.chosen is not None:
            run_config = config_to_dict(cfg)  # checkpoints record the settings auto chose
        settings = loop_settings(cfg, dp_size=ctx.dp_size, device_type=ctx.device.type)
        from nvlcore.training.oom import install_phase_hooks, set_phase

        set_phase("model build and weight loading")
        from nvlcore.training.storage import build_in_storage_dtype, trainable_in_fp32

        model, built = build_in_storage_dtype(
            bridge, compute_dtype=settings.autocast_dtype, device=ctx.device,
            init="random" if random_init else "none", seed=cfg.rng.seed,
            prepare=lambda m: prepare_trainable(m, cfg, manager, bridge),
            frozen_expected=bool(cfg.peft.method) or any(bool(v) for v in cfg.model.freeze.values()))
        say(f"nvl finetune: model {built}")
        install_phase_hooks(model, bridge.memory_phases())  # an out-of-memory report names the tower
        model.train()
        report = bridge.set_kernels(model, cfg.model.kernels)
        if report:
            say("nvl finetune: kernels: " + "; ".join(f"{op}: {impl}" for op, impl in report.items()))
        recompute = cfg.model.recompute_granularity
        if recompute:
            bridge.set_recompute(model, recompute)
            say(f"nvl finetune: activation recomputation: {recompute}")
        if cfg.model.cpu_offloading:
            from nvlcore.training.offload import offload_activations

            offload_activations(bridge.decoder_layers(model), cfg.model.cpu_offloading_num_layers)
            say(f"nvl finetune: activations of the first {cfg.model.cpu_offloading_num_layers} decoder layers "
                "offloaded to host memory")
        needs_base = decision.iter_dir is None or adapter_only
        if random_init:
            say(RANDOM_INIT_BANNER)
        elif needs_base:
            src = cfg.checkpoint.pretrained_checkpoint
            if not src:
                raise ValueError("no starting weights: pass --pretrained-checkpoint DIR (a Megatron checkpoint or an HF directory)")
            load_pretrained(model, src, bridge=bridge, ctx=ctx)
            say(f"nvl finetune: loaded pretrained weights from {src} ({time.perf_counter() - t0:.1f} s)")
        peft, towers = prepare_trainable(model, cfg, manager, bridge)
        trainable_in_fp32(model)  # adapters added to a base built in bf16 take its dtype; masters are fp32
        say(f"nvl finetune: towers: {describe_towers(towers)}")
        store_base = getattr(peft, "store_frozen_base", None)
        if store_base is not None:  # a PEFT method's own storage of the frozen base (e.g. 4-bit)
            store_base(model, bridge=bridge, compute_dtype=settings.autocast_dtype, device=ctx.device)
        if settings.autocast_dtype is not None:
            # Under bf16 autocast every matmul reads bf16 weights: a frozen parameter (a PEFT run's base
            # model) is stored once in bf16, 2 bytes instead of 4 plus a per-step cast; trainable ones
            # keep their fp32 masters, and the bridge's precision-sensitive ones stay fp32 as deployed.
            optim.store_frozen_in_(model, settings.autocast_dtype, keep_fp32=bridge.keeps_fp32)
        if peft is not None:
            say("nvl finetune: frozen base storage: " + optim.describe_storage(model)
                + "".join(f"; {n}" for n in getattr(peft, "storage_notes", ())))
        say("nvl finetune: built model's static memory: " + optim.memory_plan(model).describe())

        named = optim.trainable_named_parameters(model)
        optim.check_replicated_parameters(list(model.named_parameters()), tp_group=ctx.tp_group, tp_size=ctx.tp_size)
        from megatron.core import parallel_state

        src_rank = parallel_state.get_data_parallel_src_rank()
        # A packed (quantized) frozen weight was quantized on every rank from the same loaded weights.
        unpacked = [p.data for p in model.parameters() if not optim.is_packed(p)]
        optim.broadcast_parameters(unpacked, src_global_rank=src_rank,
                                   group=ctx.dp_group, group_size=ctx.dp_size)
        n_train = sum(p.numel() for _, p in named)
        n_all = sum(p.numel() for p in model.parameters())
        say(f"nvl finetune: {n_train:,} of {n_all:,} parameters trainable on this rank"
            + (f" (PEFT {cfg.peft.method}; adapter-only checkpoints)" if peft else ""))
        if peft is not None:
            counts = describe_peft_parameters(model, set(peft.adapter_parameters(model)), tp_size=ctx.tp_size)
            say(f"nvl finetune: {cfg.peft.method}: {counts}")
        opt = optim.build_optimizer(
            named, lr=cfg.optimizer.lr, betas=(cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2),
            eps=cfg.optimizer.adam_eps, weight_decay=cfg.optimizer.weight_decay, device_type=ctx.device.type,
            optimizer=cfg.optimizer.optimizer, sgd_momentum=cfg.optimizer.sgd_momentum,
            distributed=cfg.ddp.use_distributed_optimizer, dp_group=ctx.dp_group, dp_size=ctx.dp_size,
            **moment_dtypes(cfg),
        )
        say(f"nvl finetune: optimizer: {describe_optimizer(opt, named, cfg, ctx)}")
        lr_s, wd_s = schedules_for(cfg)

        # -- resume ---------------------------------------------------------------------------
        state = TrainState()
        if decision.iter_dir is not None:
            state = restore(decision.iter_dir, model=model, optimizer=opt, named=named, bridge=bridge, ctx=ctx,
                            cfg=cfg, adapter_only=adapter_only)
            say(f"nvl finetune: resumed at iteration {state.iteration} (consumed samples {state.consumed_samples}, "
                f"{state.optimizer_steps} updates, {state.skipped_iterations} skipped)")
            from nvlcore.checkpoint import open_checkpoint

            lr_s, wd_s, note = resume_schedules(cfg, open_checkpoint(decision.iter_dir).run_config(), lr_s, wd_s,
                                                where=decision.iter_dir.name)
            say(f"nvl finetune: {note}")

        # -- will the checkpoints fit? (before any iteration runs) ---------------------------------
        if cfg.checkpoint.save:
            need = tck.estimate_checkpoint_bytes(model, ctx, adapter_only=adapter_only, save_optim=cfg.checkpoint.save_optim)
            tck.check_checkpoint_space(cfg, need, ctx, start_iteration=state.iteration, say=say)

        # -- data, loggers ----------------------------------------------------------------------
        packing_positions = None
        if decision.iter_dir is not None:
            from nvlcore.checkpoint import open_checkpoint

            packing_positions = ((open_checkpoint(decision.iter_dir).extra_state() or {}).get("data") or {}).get("packing")
        data = build_data(cfg, bridge, manager, ctx, consumed_samples=state.consumed_samples, print_fn=say,
                          packing_positions=packing_positions)
        closers.append(data.close)
        if data.eval_note:
            say(f"nvl finetune: {data.eval_note}")
        if data.test_note:
            say(f"nvl finetune: {data.test_note}")
        # metrics.jsonl keeps rows up to the iteration training starts from: rows a killed run logged
        # after its last checkpoint (or before any) are dropped, so each iteration appears once
        loggers = build_loggers(cfg, manager, ctx, resume_iteration=state.iteration, run_config=run_config)
        flops_fn, flops_method = _flops_fn(bridge, model, ctx)
        if flops_method != "bridge":
            say("nvl finetune: the bridge has no FLOPs formula of its own (train_flops); TFLOP/s uses 6 x parameters x "
                "tokens (no attention/ViT terms)")

        eval_fn = None
        if data.eval_batches_factory is not None:
            factory = data.eval_batches_factory

            def eval_fn() -> tuple[float, float]:
                from nvlcore.training.trainer import evaluate

                return evaluate(model, factory(), num_batches=cfg.validation.eval_iters * data.num_microbatches,
                                ctx=ctx, autocast_dtype=settings.autocast_dtype)

        generate_eval_fn = None
        if cfg.validation.generate_eval_interval:
            from nvlcore.eval.training import build_generate_eval

            generate_eval_fn = build_generate_eval(cfg, bridge, model, manager, ctx, print_fn=say)
        plotter = MetricsPlotter(loggers, say)
        # checkpoint.async_save: the tensors of a save are written by a background thread over a
        # process group of its own (gloo), while training goes on; the save is published (renamed,
        # trackers updated) at the next save or at the end, by every rank at the same point.
        async_group = None
        if cfg.checkpoint.async_save and cfg.checkpoint.save and ctx.world_size > 1:
            import torch.distributed as dist

            async_group = dist.new_group(backend="gloo")
        pending: list[Any] = []

        def finish_pending() -> None:
            while pending:
                say(f"nvl finetune: saved checkpoint {pending.pop().wait()}")
                plotter.plot()

        def save_fn(st: TrainState) -> None:
            finish_pending()
            path = save(cfg.checkpoint.save, st, model=model, optimizer=opt, bridge=bridge, ctx=ctx, cfg=cfg,
                        run_config=run_config, adapter_only=adapter_only, num_samples=data.num_train_samples,
                        async_group=async_group, packing_positions=gather_packing_positions(data.packing_position, ctx))
            if isinstance(path, Path):
                say(f"nvl finetune: saved checkpoint {path}")
                plotter.plot()
            else:
                pending.append(path)
                say(f"nvl finetune: writing checkpoint {path.path.name} in the background")

        trainer = Trainer(
            model=model, ctx=ctx, optimizer=opt, named_params=named, lr_schedule=lr_s, wd_schedule=wd_s,
            settings=settings, state=state, flops_fn=flops_fn, loggers=loggers,
            save_fn=save_fn if cfg.checkpoint.save else None, eval_fn=eval_fn, generate_eval_fn=generate_eval_fn,
            print_fn=say,
        )
        if decision.iter_dir is not None:
            trainer.last_saved_iteration = state.iteration
        say(f"nvl finetune: training iterations {state.iteration + 1}..{settings.train_iters}: global batch "
            f"{settings.global_batch_size} = {settings.num_microbatches} micro-batch(es) x "
            f"{cfg.train.micro_batch_size} x {ctx.dp_size} data-parallel rank(s)")
        final = trainer.run(data.train_batches)
        finish_pending()
        say(f"nvl finetune: {describe_state_bytes(opt, ctx)}")
        if trainer.stopped_by is not None:
            saved = trainer.save_fn is not None and trainer.last_saved_iteration == final.iteration
            say(f"nvl finetune: stopped early by {trainer.stopped_by} at iteration {final.iteration}"
                + (f"; checkpoint saved, exit status {EXIT_STOPPED_EARLY} (resume with the same command)"
                   if saved else "; no checkpoint (checkpoint.save is not set)"))
            code = EXIT_STOPPED_EARLY
            if not saved:
                code = 128 + int(signal.Signals[trainer.stopped_by]) if trainer.stopped_by in signal.Signals.__members__ else 1
            stopped = StoppedEarly(code)
            stopped.state = final
            raise stopped
        if data.test_batches_factory is not None and final.iteration >= settings.train_iters:
            from nvlcore.training.trainer import evaluate

            loss_sum, sup = evaluate(model, data.test_batches_factory(), ctx=ctx, autocast_dtype=settings.autocast_dtype,
                                     num_batches=cfg.validation.eval_iters * data.num_microbatches)
            test_loss = loss_sum / sup if sup > 0 else float("nan")
            say(f"nvl finetune: test loss {test_loss:.4f} over {sup:,.0f} supervised tokens")
            for lg in loggers:
                lg.log({"iteration": final.iteration, "test_loss": test_loss, "test_tokens": sup}, step=final.iteration)
        return final
    finally:
        for close in closers:
            close()
        for lg in loggers:
            try:
                lg.close()
            except Exception as exc:  # a failing sink must not hide the training error
                say(f"nvl finetune: closing logger {type(lg).__name__} failed: {exc}")
        destroy_parallel(ctx)


def moment_dtypes(cfg: "NvlConfig") -> dict[str, Any]:
    """Where and how Adam keeps its state: the moment dtypes under the precision-aware optimizer, the
    fraction of it in host memory under optimizer_cpu_offload (arguments of ``optim.build_optimizer``)."""
    o = cfg.optimizer
    out: dict[str, Any] = {}
    if o.optimizer_cpu_offload:
        out["offload_fraction"] = o.optimizer_offload_fraction
    if o.use_precision_aware_optimizer:
        out |= {"exp_avg_dtype": o.exp_avg_dtype, "exp_avg_sq_dtype": o.exp_avg_sq_dtype}
    return out


def describe_optimizer(opt: Any, named: Any, cfg: "NvlConfig", ctx: "ParallelContext") -> str:
    """One line: the optimizer kind and where its state lives (sharded over data-parallel ranks or not)."""
    from nvlcore.training import optim

    o = cfg.optimizer
    kind = "AdamW" if o.optimizer == "adam" else f"SGD (momentum {o.sgd_momentum:g})"
    per_param = 4 * len(optim.state_names(opt))  # fp32 state tensors per parameter element
    dts = {k: v for k, v in moment_dtypes(cfg).items() if k.endswith("_dtype")}
    if o.optimizer_cpu_offload:
        kind += f"; state of {o.optimizer_offload_fraction:.0%} of the parameter values in host memory"
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
    return f"{kind}; state replicated on each of {ctx.dp_size} data-parallel rank(s) ({n_all * per_param / 2**20:.1f} MiB each)"


def describe_state_bytes(opt: Any, ctx: "ParallelContext") -> str:
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


def load_pretrained(model: "torch.nn.Module", src: str, *, bridge: Any, ctx: "ParallelContext") -> None:
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
                             ctx: "ParallelContext") -> list[list[int]] | None:
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


def save(root: str, st: TrainState, *, model: Any, optimizer: Any, bridge: Any, ctx: "ParallelContext", cfg: "NvlConfig",
         run_config: Mapping[str, Any], adapter_only: bool, num_samples: int, async_group: Any = None,
         packing_positions: list[list[int]] | None = None) -> Any:
    """Write one training checkpoint (collective over all ranks): the ``iter_N`` path, or with
    ``checkpoint.async_save`` a :class:`~nvlcore.checkpoint.PendingSave` whose ``wait()`` publishes it."""
    from nvlcore.checkpoint import capture_rng_state, save_checkpoint
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
        overwrite=True,
        most_recent_k=cfg.checkpoint.most_recent_k,
        spread_replicated_writes=cfg.checkpoint.fully_parallel_save,
        async_write=cfg.checkpoint.async_save,
        async_group=async_group,
    )


def restore(iter_dir: Path, *, model: Any, optimizer: Any, named: Any, bridge: Any, ctx: "ParallelContext",
            cfg: "NvlConfig", adapter_only: bool) -> TrainState:
    """Load weights, optimizer, RNG and train state of a training checkpoint (collective)."""
    from nvlcore.checkpoint import open_checkpoint, restore_rng_state
    from nvlcore.training import checkpointing as tck

    ckpt = open_checkpoint(iter_dir)
    extra = ckpt.extra_state() or {}
    if bool(extra.get("adapter_only")) != adapter_only:
        raise ValueError(
            f"{iter_dir} is {'an adapter-only (PEFT)' if extra.get('adapter_only') else 'a full'} checkpoint but this run "
            f"is {'PEFT' if adapter_only else 'full fine-tuning'}; use the same peft settings, or start from it with "
            "--pretrained-checkpoint"
        )
    tck.load_model_weights(model, iter_dir, bridge=bridge, ctx=ctx, only_trainable=adapter_only)
    if cfg.checkpoint.load_optim:
        tck.load_optimizer_state(optimizer, named, iter_dir, adam_step=int(extra.get("adam_step", 0)), bridge=bridge, ctx=ctx)
    state = TrainState.from_dict(ckpt.train_state())
    data = extra.get("data") or {}
    if data.get("seed") is not None and data["seed"] != cfg.rng.seed:
        raise ValueError(f"{iter_dir} was trained with rng.seed={data['seed']}, this run has {cfg.rng.seed}: the data order would change")
    if cfg.checkpoint.load_rng:
        layout = extra.get("layout") or {}
        rank_state = ckpt.rank_state(ctx.rank) if layout.get("world_size") == ctx.world_size else None
        if rank_state is not None and "rng" in rank_state:
            restore_rng_state(rank_state["rng"])
        elif ctx.is_main:
            print(f"nvl finetune: {iter_dir} was saved by {layout.get('world_size')} process(es), this run has "
                  f"{ctx.world_size}; RNG states are re-seeded instead of restored")
    return state
