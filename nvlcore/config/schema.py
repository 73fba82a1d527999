"""The typed config schema: one attrs class per section, Megatron-Bridge's section and field names.

Defaults are Megatron-Bridge's where it gives one (see docs/config.md); a model bridge's ``recipe()`` returns a nested
mapping that :func:`nvlcore.config.load_config` merges over these defaults (``base=``), then the YAML files, then the
command-line overrides.

Any field may hold the mandatory marker ``"???"`` (:data:`MISSING`) until the config is resolved for
a run (:func:`nvlcore.config.resolve_config`), exactly as in OmegaConf/Megatron-Bridge YAML files.

Each field carries its help text in ``metadata["help"]``; ``nvl config keys`` and docs/config.md are
generated from it.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

#: The mandatory-value marker of OmegaConf YAML files: a field holding it must be set before a run.
MISSING = "???"


def _f(default: Any = attrs.NOTHING, help: str = "", *, factory: Any = None) -> Any:
    if factory is not None:
        return attrs.field(factory=factory, metadata={"help": help})
    return attrs.field(default=default, metadata={"help": help})


@attrs.define
class ModelConfig:
    """``model``: the model provider's settings (parallelism, freezing, sequence length)."""

    seq_length: int = _f(4096, "Maximum language-model sequence length (tokens after image/video expansion).")
    tensor_model_parallel_size: int = _f(4, "Tensor-parallel size (recipe: 4 for full fine-tuning, 2 for PEFT).")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size. Only 1 is supported by nvl.")
    context_parallel_size: int = _f(1, "Context-parallel size. Only 1 is supported by nvl.")
    sequence_parallel: bool = _f(
        False, "Megatron sequence parallelism for tensor_model_parallel_size > 1 (full fine-tuning): activations "
        "between the tensor-parallel regions (residual stream, norms) are split along the sequence over the TP ranks; "
        "row-parallel outputs are reduce-scattered, column-parallel inputs all-gathered. Refused at TP=1 and with "
        "a PEFT method.")
    freeze: dict[str, bool] = _f(
        help="Frozen parameter groups, written `model.freeze_<group>: true` (Megatron-Bridge's spelling); the "
        "groups are the model bridge's `freeze_groups` (docs/model.md lists this model's), and a group it "
        "does not declare is refused when set true.",
        factory=dict,
    )
    bridge: str | None = _f(None, "Model bridge name; default: picked from the HF config's `architectures`.")
    hf_model_path: str | None = _f(None, "HF model directory the bridge reads (config.json, tokenizer, processor).")
    recompute_granularity: Literal["selective", "full"] | None = _f(
        None,
        "Activation recomputation: selective (the parts the model bridge picks), full (whole layers), null (none)."
    )
    recompute_modules: list[str] | None = _f(
        None,
        "Under recompute_granularity=selective, the parts recomputed, in the model bridge's names (megatron-core's "
        "key; docs/memory.md lists this model's). null: the bridge's default. Refused under "
        "another granularity.",
    )
    cpu_offloading: bool = _f(
        False, "Offload saved activations of the first cpu_offloading_num_layers decoder layers to pinned host "
        "memory in the forward, copied back (overlapped) for their backward."
    )
    cpu_offloading_num_layers: int = _f(0, "Decoder layers whose activations are offloaded (cpu_offloading).")
    cpu_offloading_activations: bool = _f(True, "Offload activations under cpu_offloading (must be true).")
    cpu_offloading_weights: bool = _f(False,
                                      "Offload weights under cpu_offloading. Not supported by nvl (must be false).")
    use_cpu_initialization: bool | None = _f(
        None,
        "Build the model and load its starting weights in host memory; parameters move to the GPU once the "
        "frozen base is stored (a PEFT method that quantizes the base moves each weight as it quantizes it), so "
        "the GPU never holds the unquantized base. null: true when the PEFT method quantizes the frozen base "
        "(peft.base_dtype=nf4), else false. Needs host memory for the rank's share of the model in the compute "
        "dtype.",
    )
    cuda_graph_impl: Literal["none", "local", "transformer_engine"] = _f(
        "none",
        "CUDA graphs for the training step (megatron-core's key): local = PyTorch's own "
        "torch.cuda.make_graphed_callables, one graph per layer of cuda_graph_scope, captured after "
        "cuda_graph_warmup_steps eager steps at the first micro-batch's shape (docs/finetune.md#cuda-graphs); "
        "transformer_engine is not supported by nvl; none = off.",
    )
    cuda_graph_scope: str | list[str] = _f(
        "full",
        "Layers graphed under cuda_graph_impl=local, megatron-core's names (a list, or a comma-separated string): "
        "the model bridge lists its scopes (docs/finetune.md#cuda-graphs). full (megatron-core's default: whole "
        "layers of every kind) and full_iteration are refused by nvl; name the scopes.",
    )
    cuda_graph_warmup_steps: int = _f(
        3, "Eager training steps before the layers are captured (cuda_graph_impl=local; at least 1: the first "
        "step records the layers' input shapes).")
    kernels: str = _f(
        "auto",
        "Implementations of the model's hot ops (the bridge lists its choices): auto = fused GPU kernels where "
        "installed and on CUDA, else the plain-PyTorch reference; reference forces the reference path.",
    )


@attrs.define
class TrainConfig:
    """``train``: iterations and batch sizes."""

    train_iters: int = _f(2000, "Number of optimizer steps.")
    global_batch_size: int = _f(32, "Samples per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = _f(1, "Samples per forward/backward on one data-parallel rank.")
    exit_interval: int | None = _f(None, "Stop after this many iterations of this run (for testing).")
    exit_duration_in_mins: float | None = _f(None, "Stop (after a checkpoint) once this many minutes have passed.")
    manual_gc: bool = _f(True, "Disable Python's automatic GC and collect every manual_gc_interval steps.")
    manual_gc_interval: int = _f(100, "Steps between manual garbage collections (0 = never).")
    manual_gc_eval: bool = _f(True, "Collect garbage before and after validation when manual_gc is on.")
    memory_plan: Literal["off", "check", "auto"] = _f(
        "check",
        "Per-GPU memory plan made before the model is built (docs/memory.md): check = print it and refuse a run "
        "that cannot fit the card, auto = also pick micro-batch, recompute and offload settings that fit, off = none.",
    )
    memory_budget_gb: float | None = _f(
        None,
        "GB per GPU the run may use: the memory plan fits it (or the card's free memory where smaller), and on a "
        "GPU the caching allocator is capped at it less the plan's 3.0 GB runtime allowance (default: the card's "
        "free memory, no cap; on CPU, no check).",
    )


@attrs.define
class ValidationConfig:
    """``validation``: periodic evaluation. ``train.eval_iters`` is a deprecated alias of ``eval_iters``."""

    eval_interval: int | None = _f(500, "Steps between validations (null = never).")
    eval_iters: int = _f(0, "Validation batches per evaluation; 0 disables validation and test splits.")
    generate_eval_interval: int | None = _f(
        None, "Steps between generation-based evaluations: answer validation examples and score them with the "
        "dataset maker's metrics, as nvl eval does (null = never)."
    )
    generate_eval_samples: int = _f(32, "Validation examples (the first N) answered per generation-based evaluation.")


@attrs.define
class OptimizerConfig:
    """``optimizer``: Megatron-Core OptimizerConfig names."""

    optimizer: Literal["adam", "sgd"] = _f("adam", "Optimizer: adam (AdamW: decoupled weight decay) or sgd.")
    lr: float = _f(2e-5, "Peak learning rate.")
    min_lr: float = _f(2e-6, "Learning rate at the end of the decay.")
    weight_decay: float = _f(0.1, "Weight decay (the scheduler's start/end_weight_decay win when set).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.95, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    sgd_momentum: float = _f(0.9, "SGD momentum (optimizer=sgd).")
    clip_grad: float = _f(1.0, "Clip the global gradient norm to this value (0 = no clipping).")
    bf16: bool = _f(True, "Compute in bfloat16 (main params and grads stay fp32).")
    fp16: bool = _f(False, "Compute in float16 with loss scaling. Not supported by nvl (must be false).")
    loss_scale: float | None = _f(None, "Static loss scale for fp16. Not supported by nvl (must be null).")
    initial_loss_scale: float = _f(4294967296.0, "Initial dynamic loss scale (fp16: not supported, keep the default).")
    min_loss_scale: float = _f(1.0, "Minimum dynamic loss scale (fp16: not supported, keep the default).")
    loss_scale_window: float = _f(1000.0,
                                  "Steps before the dynamic loss scale grows (fp16: not supported, keep the default).")
    hysteresis: int = _f(2, "Overflows before the loss scale shrinks (fp16: not supported, keep the default).")
    use_precision_aware_optimizer: bool = _f(
        False, "Let exp_avg_dtype / exp_avg_sq_dtype store Adam's moments in lower precision (optimizer=adam). With "
        "optimizer_cpu_offload and optimizer_offload_fraction=1.0 (megatron-core's HybridDeviceOptimizer, bf16 "
        "mixed precision on a GPU): the linear layers' trainable weights are stored in bf16 on the GPU with fp32 "
        "main grads, their fp32 masters in host memory (6 GPU bytes a value instead of 10; the same update)."
    )
    exp_avg_dtype: Literal["torch.float32", "torch.bfloat16", "torch.float16", "torch.uint8"] = _f(
        "torch.float32", "Storage dtype of Adam's first moment: torch.float32, torch.bfloat16 or torch.uint8 "
        "(8-bit blocks) (needs use_precision_aware_optimizer; float16 is not supported by nvl)."
    )
    exp_avg_sq_dtype: Literal["torch.float32", "torch.bfloat16", "torch.float16", "torch.uint8"] = _f(
        "torch.float32", "Storage dtype of Adam's second moment: torch.float32, torch.bfloat16 or torch.uint8 "
        "(8-bit blocks) (needs use_precision_aware_optimizer; float16 is not supported by nvl)."
    )
    main_params_dtype: Literal["torch.float32", "torch.float16"] = _f(
        "torch.float32", "Dtype of the master weights. Only torch.float32 is supported by nvl."
    )
    main_grads_dtype: Literal["torch.float32", "torch.bfloat16"] = _f(
        "torch.float32", "Dtype of the main gradients. torch.bfloat16 (full fine-tuning on a GPU; needs "
        "use_precision_aware_optimizer, optimizer_cpu_offload with optimizer_offload_fraction=1.0 and fp32 moments) "
        "stores trainable weights of >= 2 dims and their gradients in bf16 on the GPU, fp32 masters on the host."
    )
    optimizer_cpu_offload: bool = _f(
        False, "Keep Adam's state of optimizer_offload_fraction of the parameters in host memory, updated there."
    )
    optimizer_offload_fraction: float = _f(
        0.0, "Fraction of the parameter values whose optimizer state lives in host memory (optimizer_cpu_offload)."
    )


@attrs.define
class SchedulerConfig:
    """``scheduler``: learning-rate and weight-decay schedules (Megatron OptimizerParamScheduler)."""

    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = _f(
        "cosine", "Learning-rate decay after warm-up (WSD: constant, then the final lr_wsd_decay_iters decay)."
    )
    lr_decay_iters: int | None = _f(None, "Steps over which the LR decays (null = train.train_iters).")
    lr_warmup_iters: int = _f(5, "Linear warm-up steps from lr_warmup_init to optimizer.lr.")
    lr_warmup_fraction: float | None = _f(None, "Warm-up as a fraction of lr_decay_iters (instead of iters).")
    lr_warmup_init: float = _f(0.0, "Learning rate at step 0 of the warm-up.")
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = _f(
        "exponential", "Decay style of the WSD schedule's final phase."
    )
    lr_wsd_decay_iters: int | None = _f(None,
                                        "Steps of the WSD schedule's final decay (needed with lr_decay_style=WSD).")
    start_weight_decay: float | None = _f(0.033, "Weight decay at step 0 (null = optimizer.weight_decay).")
    end_weight_decay: float | None = _f(0.033, "Weight decay at the end (null = optimizer.weight_decay).")
    weight_decay_incr_style: Literal["constant", "linear", "cosine"] = _f(
        "constant", "How weight decay moves from start_weight_decay to end_weight_decay."
    )
    override_opt_param_scheduler: bool = _f(True,
                                            "On resume, take the LR/weight-decay schedule from this config, not the "
                                            "checkpoint.")
    use_checkpoint_opt_param_scheduler: bool = _f(False,
                                                  "On resume, take the schedule from the checkpoint (needs "
                                                  "override_opt_param_scheduler=false).")


@attrs.define
class CheckpointConfig:
    """``checkpoint``: saving and loading (Megatron-Bridge layout: ``<dir>/iter_0000200/``, tracker).

    Unlike the Megatron-Bridge recipe (``save = load = ./nemo_experiments/default/checkpoints``, which
    silently resumes an unrelated earlier run started in the same directory), ``save`` and ``load``
    default to null: name them.
    """

    save: str | None = _f(None, "Directory to save checkpoints to (null = no checkpoints).")
    load: str | None = _f(None, "Directory to resume from (model, optimizer, RNG, scheduler, iteration).")
    pretrained_checkpoint: str | None = _f(
        None, "Weights to start fine-tuning from (Megatron base/iter dir or HF dir); iteration starts at 0."
    )
    save_interval: int | None = _f(200, "Steps between checkpoints (a final one is always written).")
    most_recent_k: int = _f(-1, "Keep only the newest k checkpoints (-1 = keep all).")
    save_optim: bool = _f(True, "Save optimizer state.")
    save_rng: bool = _f(True, "Save RNG state.")
    load_optim: bool = _f(True, "Load optimizer state on resume.")
    load_rng: bool = _f(True, "Load RNG state on resume.")
    ckpt_step: int | None = _f(None, "Resume from this iteration instead of the tracker's latest one.")
    ckpt_format: Literal["torch_dist", "zarr", "fsdp_dtensor"] = _f(
        "torch_dist", "Checkpoint format: torch_dist (PyTorch DCP), the only one nvl writes (others are refused)."
    )
    async_save: bool = _f(False,
                          "Write checkpoint tensors in the background (torch.distributed.checkpoint.async_save).")
    fully_parallel_save: bool = _f(True,
                                   "Spread the writes of replicated tensors over ranks (false: the lowest rank writes "
                                   "them).")
    fully_parallel_load: bool = _f(False,
                                   "Spread the read of replicated tensors over ranks. Not supported by nvl (must be "
                                   "false).")
    exit_on_missing_checkpoint: bool = _f(False, "Fail when `load` holds no checkpoint instead of starting fresh.")
    save_tokenizer_assets: bool = _f(True,
                                     "Copy the tokenizer files of model.hf_model_path into each checkpoint's "
                                     "tokenizer/.")


@attrs.define
class DatasetConfig:
    """``dataset``: the data source (a registered dataset maker) and the dataloader.

    ``sequence_length`` is accepted as an alias of ``seq_length`` (the name in Megatron-Bridge <= v0.5.1
    YAML files); ``pack_sequences_in_batch`` as an alias of ``enable_in_batch_packing``.
    ``maker_kwargs`` is validated against the selected maker's ``Kwargs`` schema when it has one.
    """

    maker_name: str = _f("make_cord_v2_dataset", "Registered dataset maker (or alias), e.g. make_raven_dataset.")
    maker_kwargs: dict[str, Any] = _f(help="Keyword arguments for the maker (all splits).", factory=dict)
    val_maker_kwargs: dict[str, Any] = _f(help="Extra maker keyword arguments for the validation split.", factory=dict)
    test_maker_kwargs: dict[str, Any] = _f(help="Extra maker keyword arguments for the test split (evaluated at the "
                                           "end).", factory=dict)
    seq_length: int | None = _f(None, "Sequence length for padding/truncation (null = model.seq_length).")
    num_workers: int = _f(2, "DataLoader worker processes per rank.")
    dataloader_type: Literal["single", "cyclic"] = _f(
        "cyclic", "single: sequential order; cyclic: reshuffled every epoch."
    )
    data_sharding: bool = _f(True,
                             "Each data-parallel rank reads its slice of every global batch (nvl always does: must be "
                             "true).")
    pin_memory: bool = _f(True, "Pin host memory of batches.")
    persistent_workers: bool = _f(False, "Keep DataLoader workers alive between evaluations (with num_workers > 0).")
    pad_to_multiple_of: int = _f(128, "Pad each batch's length up to a multiple of this.")
    pad_to_max_length: bool = _f(False, "Pad every batch to seq_length.")
    enable_in_batch_packing: bool = _f(
        False,
        "Pack several whole samples into each row of seq_length tokens (the original name; true = packing best_fit)."
    )
    packing: Literal["none", "first_fit", "best_fit"] = _f(
        "none", "Sequence packing: none, or first_fit / best_fit over a window of packing_buffer_size samples."
    )
    packing_buffer_size: int = _f(128, "Samples per packing window (the bounded look-ahead buffer).")
    skip_test: bool = _f(False, "Do not evaluate the test split at the end of training.")


@attrs.define
class LoggerConfig:
    """``logger``: console/JSONL/W&B/TensorBoard metrics.

    ``loggers`` names registered metric loggers (``nvl plugins list --all``); ``wandb`` is added when
    ``wandb_project`` is set.
    """

    log_interval: int = _f(10, "Steps between logged (console and metrics) lines.")
    loggers: list[str] = _f(help="Registered metric loggers to enable.", factory=lambda: ["console"])
    jsonl_path: str | None = _f(None, "Metrics JSONL file (null = <checkpoint.save>/metrics.jsonl when saving).")
    tensorboard_dir: str | None = _f(None,
                                     "TensorBoard event directory (null = off); scalars via torch.utils.tensorboard.")
    log_timers_to_tensorboard: bool = _f(True, "Write the timing metrics (step time, throughput, ETA) to TensorBoard.")
    wandb_project: str | None = _f(None, "W&B project; setting it enables the wandb logger.")
    wandb_exp_name: str | None = _f(None, "W&B run name.")
    wandb_entity: str | None = _f(None, "W&B entity (team or user).")
    wandb_save_dir: str | None = _f(None, "W&B local directory (null = <checkpoint.save>/wandb).")


@attrs.define
class PeftConfig:
    """``peft``: parameter-efficient fine-tuning (null ``method`` = full fine-tuning).

    The core fields are those every adapter method shares (Megatron-Bridge's names and defaults). A
    method declares its own fields (initialisation, adapter dtype, which parts of the model it freezes,
    ...) in its ``Config`` class; they are accepted in this section when that method is selected and
    land in ``options``.
    """

    method: str | None = _f(None, "Registered PEFT method (`nvl plugins list --all`); null = full fine-tuning.")
    target_modules: list[str] = _f(
        help="Module names or wildcard patterns (`*decoder*.linear_qkv`) that get adapters.",
        factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
    )
    exclude_modules: list[str] = _f(help="Target every linear layer except these (exclusive with target_modules).",
                                    factory=list)
    dim: int = _f(16, "Adapter rank.")
    alpha: float = _f(32, "Adapter scale numerator: the update is (alpha/dim)·B·A.")
    dropout: float = _f(0.0, "Dropout on the adapter path.")
    dropout_position: Literal["pre", "post"] = _f("pre", "Apply dropout before A (pre) or after B (post).")
    options: dict[str, Any] = _f(help="Method-specific fields (validated by the method's Config).", factory=dict)


@attrs.define
class DistConfig:
    """``dist``: process groups. Megatron FSDP and torch FSDP2 are not supported (must be false)."""

    distributed_backend: Literal["nccl", "gloo"] | None = _f(None, "Backend (null = nccl on GPUs, gloo on CPU).")
    distributed_timeout_minutes: int = _f(10, "Timeout of collective operations.")
    use_megatron_fsdp: bool = _f(False, "Megatron FSDP. Not supported by nvl (must be false).")
    use_torch_fsdp2: bool = _f(False, "torch FSDP2. Not supported by nvl (must be false).")


@attrs.define
class RngConfig:
    """``rng``: seeds."""

    seed: int = _f(1234, "Base random seed (the recipe's; the example YAML sets 42).")
    data_parallel_random_init: bool = _f(False,
                                         "Seed each data-parallel rank's RNGs with seed + 10 x its rank (weights still "
                                         "broadcast from the first).")


@attrs.define
class DDPConfig:
    """``ddp``: data-parallel gradient reduction (Megatron-Core DistributedDataParallelConfig names)."""

    grad_reduce_in_fp32: bool = _f(True, "Accumulate and all-reduce gradients in fp32 (nvl always does: must be true).")
    overlap_grad_reduce: bool = _f(False,
                                   "Overlap the gradient all-reduce with the backward pass. Not supported by nvl (must "
                                   "be false).")
    overlap_param_gather: bool = _f(False,
                                    "Overlap the distributed optimizer's parameter all-gather. Not supported by nvl "
                                    "(must be false).")
    use_distributed_optimizer: bool = _f(True,
                                         "Shard optimizer state over data-parallel ranks (torch "
                                         "ZeroRedundancyOptimizer).")
    average_in_collective: bool = _f(False,
                                     "Average inside the collective. Not supported by nvl (must be false): the loss is "
                                     "token-weighted.")
    check_for_nan_in_grad: bool = _f(True, "Stop the run on a non-finite loss or gradient (false: skip that update).")
    bucket_size: int | None = _f(None, "Gradient all-reduce bucket size in elements (null = 128 MiB of fp32).")


@attrs.define
class NvlConfig:
    """The whole run configuration (Megatron-Bridge ``ConfigContainer`` section names)."""

    model: ModelConfig = attrs.field(factory=ModelConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    validation: ValidationConfig = attrs.field(factory=ValidationConfig)
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    dataset: DatasetConfig = attrs.field(factory=DatasetConfig)
    logger: LoggerConfig = attrs.field(factory=LoggerConfig)
    peft: PeftConfig = attrs.field(factory=PeftConfig)
    dist: DistConfig = attrs.field(factory=DistConfig)
    rng: RngConfig = attrs.field(factory=RngConfig)
    ddp: DDPConfig = attrs.field(factory=DDPConfig)
    mixed_precision: Literal[
        "bf16_mixed", "fp16_mixed", "fp32", "bf16_with_fp8_current_scaling_mixed",
        "bf16_with_fp8_delayed_scaling_mixed", "bf16_with_mxfp8_mixed", "bf16_with_fp8_subchannel_scaling_mixed",
        "fp16_with_fp8_delayed_scaling_mixed", "fp16_with_mxfp8_mixed", "fp16_with_fp8_current_scaling_mixed",
        "fp16_with_fp8_subchannel_scaling_mixed",
    ] | None = attrs.field(
        default="bf16_mixed",
        metadata={"help": "Precision recipe (Megatron-Bridge's names): bf16_mixed, fp32, or "
                  "bf16_with_fp8_current_scaling_mixed (bf16 with FP8 matmuls, per-tensor current scaling, "
                  "first and last decoder layers bf16; CUDA compute capability 8.9+; docs/precision.md). The "
                  "other FP8 recipes and fp16 are refused; null = from optimizer.bf16."},
    )


#: Section name -> class (every top-level field of NvlConfig that is a section).
SECTIONS: dict[str, type] = {
    f.name: f.default.factory for f in attrs.fields(NvlConfig) if isinstance(f.default, attrs.Factory)  # type: ignore[union-attr]
}

#: Old or alternative key -> canonical key, applied to every layer before merging.
ALIASES: dict[str, str] = {
    "train.eval_iters": "validation.eval_iters",
    "train.eval_interval": "validation.eval_interval",
    "dataset.sequence_length": "dataset.seq_length",
    "dataset.pack_sequences_in_batch": "dataset.enable_in_batch_packing",
}

#: Free-form mapping fields, merged key by key; validated by the selected plugin's schema.
PLUGIN_MAPPINGS: tuple[str, ...] = ("dataset.maker_kwargs", "dataset.val_maker_kwargs", "dataset.test_maker_kwargs")
