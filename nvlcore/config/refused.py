"""Config values nvl accepts in the schema (Megatron-Bridge's keys) but does not implement: refused at load.

Every key of the schema is either read by the code or listed here with the values nvl implements
and what to use instead (tests/test_config_conformance.py checks both). A refused key keeps its
default, which is what nvl does; any other value fails when the config is loaded, with one line that
names the key, the value and what to do instead, instead of being silently ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from nvlcore.config.schema import NvlConfig

_MOMENTS = ("nvl stores Adam's moments in torch.float32, torch.bfloat16 or torch.uint8 (8-bit, with "
            "optimizer.use_precision_aware_optimizer=true); use torch.bfloat16")
MISSING_MARK = "???"
_FP16 = "fp16 with loss scaling is not implemented by nvl (it trains in bf16 or fp32); remove it"


@attrs.frozen
class Refusal:
    """``key`` may only hold one of ``supported`` (its default is among them); else ``instead`` says what to do."""

    key: str
    supported: tuple[Any, ...]
    instead: str
    #: value -> its own reason and what to use (instead of ``instead``)
    reasons: dict[Any, str] = attrs.field(factory=dict)

    def message(self, value: Any) -> str:
        only = " or ".join(repr(v) for v in self.supported)
        why = self.reasons.get(value, self.instead) if isinstance(value, str) else self.instead
        return f"{self.key}={value!r} is not supported by nvl (only {only}): {why}"


#: Megatron-Bridge's FP8 recipe names nvl does not run, each with its reason (nvlcore.training.fp8 runs
#: bf16_with_fp8_current_scaling_mixed).
FP8_REFUSED: dict[Any, str] = {
    "bf16_with_fp8_delayed_scaling_mixed": (
        "delayed scaling (an amax history) is not in a maintained library nvl uses (torchao removed it); use "
        "bf16_with_fp8_current_scaling_mixed (per-tensor current scaling)"),
    "bf16_with_mxfp8_mixed": (
        "MXFP8 needs Blackwell GPUs and torchao's prototype MX formats; use bf16_with_fp8_current_scaling_mixed"),
    "bf16_with_fp8_subchannel_scaling_mixed": (
        "128x128/1x128 blockwise scaling is only in torchao's prototype; use bf16_with_fp8_current_scaling_mixed"),
    "fp16_with_fp8_delayed_scaling_mixed": "fp16 is not implemented by nvl; use bf16_with_fp8_current_scaling_mixed",
    "fp16_with_mxfp8_mixed": "fp16 is not implemented by nvl; use bf16_with_fp8_current_scaling_mixed",
    "fp16_with_fp8_current_scaling_mixed": "fp16 is not implemented by nvl; use bf16_with_fp8_current_scaling_mixed",
    "fp16_with_fp8_subchannel_scaling_mixed": "fp16 is not implemented by nvl; use "
                                              "bf16_with_fp8_current_scaling_mixed",
}


REFUSED: tuple[Refusal, ...] = (
    Refusal("model.pipeline_model_parallel_size", (1,),
            "nvl has no pipeline parallelism; use model.tensor_model_parallel_size and data parallelism"),
    Refusal("model.context_parallel_size", (1,),
            "nvl has no context parallelism; raise model.tensor_model_parallel_size or use "
            "model.recompute_granularity"),
    Refusal("model.cpu_offloading_weights", (False,),
            "nvl offloads activations only (model.cpu_offloading); keep the weights on the GPU or shard them with "
            "model.tensor_model_parallel_size"),
    Refusal("model.cpu_offloading_activations", (True,),
            "activations are what model.cpu_offloading offloads; set model.cpu_offloading=false instead"),
    Refusal("optimizer.fp16", (False,), _FP16),
    Refusal("optimizer.loss_scale", (None,), _FP16),
    Refusal("optimizer.initial_loss_scale", (4294967296.0,), _FP16),
    Refusal("optimizer.min_loss_scale", (1.0,), _FP16),
    Refusal("optimizer.loss_scale_window", (1000.0,), _FP16),
    Refusal("optimizer.hysteresis", (2,), _FP16),
    Refusal("optimizer.exp_avg_dtype", ("torch.float32", "torch.bfloat16", "torch.uint8"), _MOMENTS),
    Refusal("optimizer.exp_avg_sq_dtype", ("torch.float32", "torch.bfloat16", "torch.uint8"), _MOMENTS),
    Refusal("optimizer.main_params_dtype", ("torch.float32",),
            "nvl's trainable parameters are fp32 master weights (compute runs in bf16 under autocast); remove it"),
    Refusal("mixed_precision", ("bf16_mixed", "fp32", None, "bf16_with_fp8_current_scaling_mixed"),
            "fp16 is not implemented by nvl; use bf16_mixed or fp32", reasons=FP8_REFUSED),
    Refusal("checkpoint.ckpt_format", ("torch_dist",), "nvl writes PyTorch DCP (torch_dist) checkpoints only"),
    Refusal("checkpoint.fully_parallel_load", (False,),
            "every rank already reads only its own shards through torch.distributed.checkpoint; remove it"),
    Refusal("dataset.data_sharding", (True,),
            "nvl always splits one global shuffled sample stream over the data-parallel ranks "
            "(docs/finetune.md, 'Data'); remove it"),
    Refusal("dist.use_megatron_fsdp", (False,),
            "nvl shards optimizer state (ddp.use_distributed_optimizer) and weights by tensor parallelism, not FSDP"),
    Refusal("dist.use_torch_fsdp2", (False,),
            "nvl shards optimizer state (ddp.use_distributed_optimizer) and weights by tensor parallelism, not FSDP"),
    Refusal("ddp.grad_reduce_in_fp32", (True,),
            "nvl's trainable parameters and gradients are fp32 (the master weights) and always reduced in fp32"),
    Refusal("ddp.overlap_grad_reduce", (False,),
            "gradients are all-reduced after the backward pass (in buckets of ddp.bucket_size elements); remove it"),
    Refusal("ddp.overlap_param_gather", (False,),
            "the distributed optimizer broadcasts the updated parameters after each step, without overlap; remove it"),
    Refusal("ddp.average_in_collective", (False,),
            "nvl sums gradients over ranks and divides by the global number of supervised tokens; remove it"),
)

#: key -> its refusal.
REFUSED_KEYS: dict[str, Refusal] = {r.key: r for r in REFUSED}


def config_value(cfg: NvlConfig, key: str) -> Any:
    """The value at a dotted key of ``cfg`` (``section.field`` or a top-level field)."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _same(value: Any, supported: Any) -> bool:
    if isinstance(value, bool) or isinstance(supported, bool) or value is None or supported is None:
        return value is supported
    return value == supported


def _check_sequence_parallel(cfg: NvlConfig) -> None:
    """``model.sequence_parallel=true`` splits the sequence over the tensor-parallel ranks: it needs more
    than one (megatron-core raises the same), and PEFT adapters, which hook a layer's input as the layer
    receives it, would see only a shard of the sequence."""
    from nvlcore.config.structure import ConfigError, is_missing

    m = cfg.model
    if m.sequence_parallel is not True:
        return
    tp = m.tensor_model_parallel_size
    if not is_missing(tp) and tp < 2:
        raise ConfigError(f"model.sequence_parallel=true needs model.tensor_model_parallel_size > 1 (it is {tp}): "
                          "the sequence is split over the tensor-parallel ranks; set it false or raise the TP size",
                          key="model.sequence_parallel")
    if cfg.peft.method is not None and not is_missing(cfg.peft.method):
        raise ConfigError(f"model.sequence_parallel=true is for full fine-tuning: PEFT adapters "
                          f"(peft.method={cfg.peft.method}) would see a sequence shard of their layer's input; "
                          "set it false", key="model.sequence_parallel")
    if cfg.mixed_precision is not None and "fp8" in str(cfg.mixed_precision):
        # the sequence-parallel linears run their own matmul (gather / reduce-scatter around F.linear), which
        # the FP8 conversion does not reach: refused rather than silently run in bf16
        raise ConfigError(f"model.sequence_parallel=true does not run FP8 matmuls yet (mixed_precision="
                          f"{cfg.mixed_precision}); use one of the two", key="model.sequence_parallel")


def cuda_graph_scopes(value: Any) -> list[str]:
    """``model.cuda_graph_scope`` as a list of names (megatron-core's reading: a comma-separated string or a
    list; an empty list means the whole layer, as ``full`` does)."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    return [str(n).strip() for n in names if str(n).strip()]


def check_cuda_graph_settings(cfg: NvlConfig) -> None:
    """``model.cuda_graph_impl=local``: per-layer graphs (nvlcore.training.cuda_graphs) replay fixed shapes
    and a fixed sequence of kernels, so every setting that makes either vary, or that nvl has not run under
    a graph, is refused here in one line; the scopes are checked against the model bridge's at setup."""
    from nvlcore.config.structure import ConfigError, is_missing

    m = cfg.model
    impl = m.cuda_graph_impl
    if is_missing(impl):
        return
    if impl == "transformer_engine":
        raise ConfigError("model.cuda_graph_impl='transformer_engine' is not supported by nvl (no Transformer Engine "
                          "layers); use model.cuda_graph_impl=local (PyTorch's make_graphed_callables)",
                          key="model.cuda_graph_impl")
    scopes = [] if is_missing(m.cuda_graph_scope) else cuda_graph_scopes(m.cuda_graph_scope)
    if impl == "none":
        if scopes != ["full"]:
            raise ConfigError(f"model.cuda_graph_scope={m.cuda_graph_scope!r} has no effect without "
                              "model.cuda_graph_impl=local; set it, or remove the scope", key="model.cuda_graph_scope")
        if m.cuda_graph_warmup_steps not in (3, MISSING_MARK):
            raise ConfigError(f"model.cuda_graph_warmup_steps={m.cuda_graph_warmup_steps} has no effect without "
                              "model.cuda_graph_impl=local; set it, or remove the step count",
                              key="model.cuda_graph_warmup_steps")
        return
    # the scope names are the model bridge's (checked against its cuda_graph_scopes when the run starts)
    if not scopes or "full" in scopes or "full_iteration" in scopes:
        raise ConfigError(f"model.cuda_graph_scope={m.cuda_graph_scope!r} is not supported by nvl (whole layers of "
                          "every kind, or the whole iteration, include packed attention, whose sample offsets vary in "
                          "shape); name the model bridge's scopes (docs/finetune.md#cuda-graphs)",
                          key="model.cuda_graph_scope")
    if not is_missing(m.cuda_graph_warmup_steps) and m.cuda_graph_warmup_steps < 1:
        raise ConfigError(f"model.cuda_graph_warmup_steps={m.cuda_graph_warmup_steps}: nvl needs at least 1 eager "
                          "step before capture (it records the layers' input shapes)",
                          key="model.cuda_graph_warmup_steps")
    # settings whose kernels or tensors a replayed graph cannot follow, or that nvl has not run under one
    clashes = [
        ("model.recompute_granularity", m.recompute_granularity is not None,
         "recomputation reruns a layer's forward inside its backward, outside the captured pair"),
        ("model.cpu_offloading", m.cpu_offloading is True,
         "offloading moves saved activations through hooks a captured layer does not run"),
        ("model.sequence_parallel", m.sequence_parallel is True,
         "nvl has not run sequence-parallel collectives inside a graph"),
        ("model.tensor_model_parallel_size", not is_missing(m.tensor_model_parallel_size)
         and m.tensor_model_parallel_size > 1,
         "nvl has not run tensor-parallel all-reduces inside a graph; use tensor_model_parallel_size=1"),
        ("mixed_precision", cfg.mixed_precision is not None and "fp8" in str(cfg.mixed_precision),
         "nvl has not run FP8 matmuls inside a graph"),
    ]
    for key, clash, why in clashes:
        if clash:
            raise ConfigError(f"model.cuda_graph_impl=local cannot be combined with {key} ({why}); use one of the two",
                              key=key)
    ds = cfg.dataset
    packed = ds.packing not in ("none", MISSING_MARK) or ds.enable_in_batch_packing is True
    if not packed and ds.pad_to_max_length is not True:
        raise ConfigError("model.cuda_graph_impl=local needs fixed-shape batches: set dataset.pad_to_max_length=true "
                          "(every row padded to dataset.seq_length) or pack rows (dataset.packing=best_fit)",
                          key="dataset.pad_to_max_length")


def check_refused(cfg: NvlConfig) -> None:
    """Raise :class:`~nvlcore.config.ConfigError` on the first refused value, on ``peft.*`` settings
    given without a PEFT method, or on ``optimizer.bf16=false`` under ``mixed_precision=bf16_mixed``
    (they would be ignored).

    Values still ``"???"`` are skipped (a run fails on them later anyway).
    """
    from nvlcore.config.schema import PeftConfig
    from nvlcore.config.structure import ConfigError, init_fields, is_missing

    for r in REFUSED:
        value = config_value(cfg, r.key)
        if is_missing(value):
            continue
        if not any(_same(value, v) for v in r.supported):
            raise ConfigError(r.message(value), key=r.key)
    sc = cfg.scheduler
    if sc.lr_decay_style == "WSD" and sc.lr_wsd_decay_iters is None:
        raise ConfigError("scheduler.lr_decay_style=WSD needs scheduler.lr_wsd_decay_iters (the updates of its final "
                          "decay)", key="scheduler.lr_wsd_decay_iters")
    if sc.override_opt_param_scheduler is True and sc.use_checkpoint_opt_param_scheduler is True:
        raise ConfigError(
            "scheduler.use_checkpoint_opt_param_scheduler=True needs scheduler.override_opt_param_scheduler=false "
            "(both set: which schedule should a resume use?)",
            key="scheduler.use_checkpoint_opt_param_scheduler",
        )
    _check_precision_aware(cfg)
    m = cfg.model
    _check_sequence_parallel(cfg)
    check_cuda_graph_settings(cfg)
    if m.cpu_offloading is not True and m.cpu_offloading_num_layers not in (0, MISSING_MARK):
        raise ConfigError(f"model.cpu_offloading_num_layers={m.cpu_offloading_num_layers} has no effect without "
                          "model.cpu_offloading=true; set it, or remove the layer count",
                          key="model.cpu_offloading_num_layers")
    if m.cpu_offloading is True and m.cpu_offloading_num_layers == 0:
        raise ConfigError("model.cpu_offloading=true needs model.cpu_offloading_num_layers >= 1 (the first decoder "
                          "layers to offload)", key="model.cpu_offloading_num_layers")
    mp, bf16 = cfg.mixed_precision, cfg.optimizer.bf16
    if mp is not None and mp.startswith("bf16_") and bf16 is False:
        raise ConfigError(
            f"optimizer.bf16=False has no effect: mixed_precision={mp} decides the precision; set "
            "mixed_precision=fp32 for fp32 training (or mixed_precision=null to follow optimizer.bf16)",
            key="optimizer.bf16",
        )
    if cfg.peft.method is None:
        default = PeftConfig()
        for f in init_fields(PeftConfig):
            if f.name in ("method", "options"):
                continue
            value = getattr(cfg.peft, f.name)
            if not is_missing(value) and value != getattr(default, f.name):
                raise ConfigError(
                    f"peft.{f.name}={value!r} has no effect: peft.method is null (full fine-tuning); set "
                    "peft.method to a registered PEFT method (`nvl plugins list --all`), or remove it",
                    key=f"peft.{f.name}",
                )
        if cfg.peft.options:
            name = next(iter(cfg.peft.options))
            raise ConfigError(f"peft.{name} has no effect: peft.method is null (full fine-tuning); set peft.method "
                              "or remove it", key=f"peft.{name}")


def _check_precision_aware(cfg: NvlConfig) -> None:
    """megatron-core's rule: moment dtypes other than fp32 need the precision-aware optimizer, which is Adam's."""
    from nvlcore.config.structure import ConfigError

    o = cfg.optimizer
    for key in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        value = getattr(o, key)
        if value != "torch.float32" and o.use_precision_aware_optimizer is not True:
            raise ConfigError(f"optimizer.{key}={value} needs optimizer.use_precision_aware_optimizer=true (as in "
                              "megatron-core); set it, or remove the dtype", key=f"optimizer.{key}")
    if o.optimizer_cpu_offload is True:
        if not 0.0 < o.optimizer_offload_fraction <= 1.0:
            raise ConfigError("optimizer.optimizer_cpu_offload=true needs optimizer.optimizer_offload_fraction in (0, "
                              f"1] (the share of the state kept in host memory), not {o.optimizer_offload_fraction}",
                              key="optimizer.optimizer_offload_fraction")
        lean_moments = (o.exp_avg_dtype, o.exp_avg_sq_dtype) != ("torch.float32", "torch.float32")
        if o.optimizer != "adam" or lean_moments:
            raise ConfigError("optimizer.optimizer_cpu_offload=true works with optimizer.optimizer=adam and fp32 "
                              "moments in nvl; choose one of them", key="optimizer.optimizer_cpu_offload")
    elif o.optimizer_offload_fraction not in (0.0, 0, MISSING_MARK):
        raise ConfigError(f"optimizer.optimizer_offload_fraction={o.optimizer_offload_fraction} has no effect without "
                          "optimizer.optimizer_cpu_offload=true; set it, or remove the fraction",
                          key="optimizer.optimizer_offload_fraction")
    if bf16_device_params(o):
        _check_bf16_params(cfg)
    if o.use_precision_aware_optimizer is True and o.optimizer != "adam":
        raise ConfigError("optimizer.use_precision_aware_optimizer=true needs optimizer.optimizer=adam (it stores "
                          f"Adam's moments), not {o.optimizer!r}", key="optimizer.use_precision_aware_optimizer")


def bf16_device_params(optimizer: Any) -> bool:
    """Whether the ``optimizer`` section keeps trainable weights in bf16 on the GPU, their fp32 masters in host
    memory: the precision-aware optimizer fully offloaded (megatron-core's HybridDeviceOptimizer layouts), with
    fp32 main gradients or, under ``optimizer.main_grads_dtype=torch.bfloat16``, bf16 ones."""
    o = optimizer
    return (getattr(o, "main_grads_dtype", None) == "torch.bfloat16"
            or bool(getattr(o, "use_precision_aware_optimizer", False) and getattr(o, "optimizer_cpu_offload", False)))


def _check_bf16_params(cfg: NvlConfig) -> None:
    """megatron-core's HybridDeviceOptimizer layouts, and only those: the precision-aware optimizer fully in
    host memory keeps bf16 weights on the GPU and their fp32 masters and Adam moments on the host, with fp32
    main gradients on the GPU (``main_grads_dtype`` torch.float32, its default) or bf16 ones
    (``optimizer.main_grads_dtype=torch.bfloat16``)."""
    from nvlcore.config.structure import ConfigError

    o = cfg.optimizer
    if o.main_grads_dtype == "torch.bfloat16":
        what, undo = ("optimizer.main_grads_dtype=torch.bfloat16 (bf16 parameters and gradients on the GPU, fp32 "
                      "masters and Adam moments on the host)"), "remove main_grads_dtype"
        key = "optimizer.main_grads_dtype"
    else:
        what = ("optimizer.use_precision_aware_optimizer=true with optimizer.optimizer_cpu_offload=true (bf16 "
                "parameters and fp32 main gradients on the GPU, fp32 masters and Adam moments on the host)")
        undo, key = "set optimizer.use_precision_aware_optimizer=false", "optimizer.use_precision_aware_optimizer"
    need = [("optimizer.use_precision_aware_optimizer", o.use_precision_aware_optimizer is True, "true"),
            ("optimizer.optimizer_cpu_offload", o.optimizer_cpu_offload is True, "true"),
            ("optimizer.optimizer_offload_fraction", o.optimizer_offload_fraction in (1.0, 1), "1.0"),
            ("optimizer.exp_avg_dtype", o.exp_avg_dtype == "torch.float32", "torch.float32"),
            ("optimizer.exp_avg_sq_dtype", o.exp_avg_sq_dtype == "torch.float32", "torch.float32")]
    for need_key, ok, value in need:
        if not ok:
            raise ConfigError(f"{what} needs {need_key}={value}; set it, or {undo}", key=need_key)
    precision = cfg.mixed_precision or ("bf16_mixed" if o.bf16 else "fp32")
    if not precision.startswith("bf16_"):  # bf16_mixed and the bf16 FP8 recipes compute in bf16
        raise ConfigError(f"{what} needs a bf16 mixed precision, not {precision}; set mixed_precision=bf16_mixed, or "
                          f"{undo}", key=key)


__all__ = ["REFUSED", "REFUSED_KEYS", "Refusal", "bf16_device_params", "check_cuda_graph_settings", "check_refused",
           "config_value", "cuda_graph_scopes"]
