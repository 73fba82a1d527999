"""The memory plan: per-GPU bytes of a fine-tuning run, estimated from the config and the bridge before
the model is built, compared with the card, and what to change when it does not fit.

What one rank holds (docs/memory.md gives the calibration against measured peaks):

* **weights**: frozen parameters in their storage dtype (the compute dtype under bf16, or NF4 with
  ``peft.base_dtype=nf4``), trainable ones as fp32 masters (``optimizer.main_params_dtype``);
* **gradients**: fp32 per trainable parameter (Megatron's main grads); with the precision-aware optimizer
  fully offloaded, the linear layers' trainable weights are bf16 on the device (2 bytes, no cast copy) with
  fp32 main grads, their fp32 masters on the host; with ``optimizer.main_grads_dtype=torch.bfloat16`` every
  trainable weight of >= 2 dims and its gradient are bf16 (2 + 2 bytes);
* **optimizer state**: two Adam moments (``optimizer.exp_avg_dtype`` / ``exp_avg_sq_dtype``) or one SGD
  momentum per trainable parameter, sharded over data-parallel ranks with ``ddp.use_distributed_optimizer``,
  minus the fraction ``optimizer.optimizer_offload_fraction`` kept on the host;
* **cast cache**: bf16 autocast keeps a bf16 copy of every fp32 trainable weight for the whole forward;
* **activations**: what the bridge says one micro-batch keeps for backward (:meth:`ModelBridge.activation_bytes`);
* **host memory** (per rank): the offloaded optimizer state (fp32 masters, pinned, and moments), its pinned
  gradient buffers, the offloaded layers' activations (pinned), or the model built in host memory, whichever
  is larger; pinned allocations counted as PyTorch's pinned-memory allocator makes them (a power of two);
* **build**: the model as built, each parameter in its storage dtype (:mod:`nvlcore.training.storage`:
  frozen weights in the compute dtype, what trains in fp32; an NF4 base is built and loaded in host memory
  and quantized onto the GPU one weight at a time, ``model.use_cpu_initialization``),
  plus the largest tensor's temporaries, a peak of its own.

The peak is the larger of the build and the training step, plus :data:`RUNTIME_OVERHEAD_BYTES` (CUDA
context, cuBLAS/NCCL workspaces) and :data:`FRAGMENTATION` of the caching allocator.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from nvlcore.training.host_memory import offload_host_bytes

if TYPE_CHECKING:
    from nvlcore.bridge import ModelBridge

GB = 1e9
#: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers and kernel modules: memory the card loses that the
#: caching allocator does not count. Measured as the driver's peak minus ``torch.cuda.max_memory_reserved`` in
#: 12 runs on H100s and H200s (visits G to K of issue 22: 2.4 to 3.1 GB, most near 3.0; docs/memory.md).
RUNTIME_OVERHEAD_BYTES = int(3.0 * GB)
#: The caching allocator's reserved-but-unused share on top of the allocated peak.
FRAGMENTATION = 0.05
#: bytes per element of the dtype names the optimizer keys take (8-bit states carry a small scale on top)
DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0,
               "fp8": 1.0, "uint8": 1.0, "int8": 1.0}
#: offloaded activations in pinned host memory, per byte the GPU no longer holds: each saved tensor's host copy
#: is a pinned allocation rounded up to a power of two, so up to twice its size (the plan counts that bound)
PINNED_ACTIVATION_FACTOR = 2.0
#: NF4 storage: 4 bits per weight plus a bf16 scale per block of 64 and its double quantisation
NF4_BYTES_PER_PARAM = 0.5625
#: bytes per parameter of one quantized weight while it is dequantized for a matmul: the bf16 weight the
#: PEFT method's decode writes (compiled into one kernel on a GPU: no other temporary)
DEQUANT_BYTES_PER_PARAM = 2.0
MODES = ("off", "check", "auto")


class MemoryPlanError(ValueError):
    """A run that cannot fit the card; the message is one line naming the options that would make it fit."""


def _dtype_bytes(value: Any, default: float, key: str) -> float:
    if value is None:
        return default
    name = str(value).removeprefix("torch.").lower()
    if name not in DTYPE_BYTES:
        raise ValueError(f"{key}={value!r}: the memory plan knows {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[name]


@attrs.frozen
class PlanInputs:
    """The settings a plan depends on; :meth:`from_config` reads them (keys other branches add are read with
    ``getattr(..., default)``, so the plan works with or without them)."""

    tp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 4096
    packed: bool = False
    recompute: str | None = None
    autocast: bool = True
    peft: bool = False
    target_modules: tuple[str, ...] = ()
    adapter_dim: int = 16
    #: group -> frozen (the model's freeze flags and the PEFT method's, resolved)
    frozen_groups: Mapping[str, bool] = attrs.field(factory=dict)
    freeze_other: bool = False
    optimizer: str = "adam"
    distributed_optimizer: bool = True
    base_bytes: float | None = None  # frozen linear weights' storage (None = the compute dtype)
    main_params_bytes: float = 4.0
    exp_avg_bytes: float = 4.0
    exp_avg_sq_bytes: float = 4.0
    optimizer_offload_fraction: float = 0.0
    #: 2.0 under ``optimizer.main_grads_dtype=torch.bfloat16``: trainable weights of >= 2 dims and their
    #: gradients in bf16 on the device (fp32 masters on the host, no autocast cast copy). Not one of ``auto``'s
    #: choices: it changes numerics
    main_grads_bytes: float = 4.0
    #: the precision-aware optimizer fully offloaded: trainable weights stored bf16 on the device, fp32 masters
    #: on the host (with fp32 main grads, :meth:`ModelBridge.matmul_weights` only: the update is unchanged)
    bf16_device_params: bool = False
    activation_offload_layers: int = 0
    #: ``model.recompute_modules`` under selective recomputation (None: the bridge's default)
    recompute_modules: tuple[str, ...] | None = None
    #: ``model.sequence_parallel``: the bridge's activation count splits what lies between the TP regions
    sequence_parallel: bool = False
    #: (LM tokens, image tiles) of one micro-batch; None = the bridge's upper bound for the config
    workload: tuple[int, int] | None = None
    #: bytes per frozen parameter while the model is built and its weights loaded; None: its storage dtype
    #: (what nvl does since 2026-12-07); 4.0: the fp32 build of earlier code (its recorded peaks)
    build_bytes_per_param: float | None = None
    #: the model built and loaded in host memory, moved to the GPU once its frozen base is stored
    #: (``model.use_cpu_initialization``; by default when the base is quantized)
    host_build: bool = False
    #: host buffers are pinned (a GPU run; PyTorch rounds each pinned allocation up to a power of two)
    pinned_host: bool = True

    @classmethod
    def from_config(cls, cfg: Any, *, world_size: int = 1, **overrides: Any) -> PlanInputs:
        """The plan's inputs from an :class:`~nvlcore.config.NvlConfig` on ``world_size`` ranks."""
        from nvlcore.config.refused import bf16_device_params
        from nvlcore.training.fp8 import is_bf16_precision

        m, o, p = cfg.model, cfg.optimizer, cfg.peft
        tp = int(m.tensor_model_parallel_size)
        opts = dict(getattr(p, "options", {}) or {})
        peft = bool(p.method)
        frozen = {g: bool(v) for g, v in dict(m.freeze).items()}
        if peft:  # the method's own freeze_<group> options add to model.freeze_<group>
            for key, value in opts.items():
                if key.startswith("freeze_") and key != "freeze_other":
                    g = key[len("freeze_"):]
                    frozen[g] = frozen.get(g, False) or bool(value)
        precise = bool(getattr(o, "use_precision_aware_optimizer", False))
        base = getattr(p, "base_dtype", None) or opts.get("base_dtype")
        offload = bool(getattr(o, "optimizer_cpu_offload", False))
        values = dict(
            tp=tp, dp=max(1, world_size // tp), micro_batch_size=int(cfg.train.micro_batch_size),
            global_batch_size=int(cfg.train.global_batch_size), seq_length=int(cfg.dataset.seq_length),
            packed=cfg.dataset.packing != "none" or bool(cfg.dataset.enable_in_batch_packing),
            recompute=m.recompute_granularity, autocast=bool(o.bf16) or is_bf16_precision(cfg.mixed_precision),
            peft=peft, target_modules=tuple(p.target_modules), adapter_dim=int(p.dim), frozen_groups=frozen,
            freeze_other=peft and bool(opts.get("freeze_other", True)), optimizer=o.optimizer,
            distributed_optimizer=bool(cfg.ddp.use_distributed_optimizer),
            base_bytes=NF4_BYTES_PER_PARAM if str(base).lower() == "nf4" else None,
            main_params_bytes=_dtype_bytes(getattr(o, "main_params_dtype", None) if precise else None, 4.0,
                                           "optimizer.main_params_dtype"),
            exp_avg_bytes=_dtype_bytes(getattr(o, "exp_avg_dtype", None) if precise else None, 4.0,
                                       "optimizer.exp_avg_dtype"),
            exp_avg_sq_bytes=_dtype_bytes(getattr(o, "exp_avg_sq_dtype", None) if precise else None, 4.0,
                                          "optimizer.exp_avg_sq_dtype"),
            optimizer_offload_fraction=float(getattr(o, "optimizer_offload_fraction", 1.0)) if offload else 0.0,
            main_grads_bytes=2.0 if getattr(o, "main_grads_dtype", None) == "torch.bfloat16" else 4.0,
            bf16_device_params=bf16_device_params(o),
            activation_offload_layers=int(getattr(m, "cpu_offloading_num_layers", 0) or 0)
            if getattr(m, "cpu_offloading", False) else 0,
            recompute_modules=tuple(m.recompute_modules) if getattr(m, "recompute_modules", None) else None,
            sequence_parallel=bool(getattr(m, "sequence_parallel", False)),
        )
        on_host = getattr(m, "use_cpu_initialization", None)
        values["host_build"] = bool(on_host) if on_host is not None else values["base_bytes"] is not None
        values.update(overrides)
        return cls(**values)


@attrs.frozen
class MemoryEstimate:
    """Bytes one rank needs, by part (see the module docstring)."""

    frozen_weights: float
    trainable_weights: float
    gradients: float
    optimizer: float
    cast_cache: float
    activations: Mapping[str, float]
    build: float
    workload: tuple[int, int]
    trainable_params: int
    frozen_params: int
    #: a quantized base's largest weight dequantized for its matmul, with the dequantization's temporaries
    dequantized: float = 0.0
    #: host memory this rank needs (the module docstring's "host memory")
    host: float = 0.0

    @property
    def step(self) -> float:
        """The training step's peak allocated bytes."""
        return (self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer + self.cast_cache
                + sum(self.activations.values()) + self.dequantized)

    @property
    def allocated(self) -> float:
        """Peak allocated bytes (what ``torch.cuda.max_memory_allocated`` reports)."""
        return max(self.step, self.build)

    @property
    def card(self) -> float:
        """What the card must have free: the allocated peak plus fragmentation and the runtime's own memory."""
        return self.allocated * (1 + FRAGMENTATION) + RUNTIME_OVERHEAD_BYTES

    def describe(self) -> str:
        acts = ", ".join(f"{k} {_fmt(v)}" for k, v in self.activations.items()) or "unknown"
        tokens, tiles = self.workload
        return (f"~{_fmt(self.card)} per GPU (allocated peak {_fmt(self.allocated)}: weights "
                f"{_fmt(self.frozen_weights + self.trainable_weights)}, gradients {_fmt(self.gradients)}, optimizer "
                f"{_fmt(self.optimizer)}, bf16 weight copies {_fmt(self.cast_cache)}"
                + (f", a dequantized weight {_fmt(self.dequantized)}" if self.dequantized else "")
                + f", activations [{acts}] for "
                f"{tokens} tokens and {tiles} image tiles per micro-batch; build {_fmt(self.build)}; + "
                f"{FRAGMENTATION:.0%} allocator and {_fmt(RUNTIME_OVERHEAD_BYTES)} runtime)"
                + (f"; host memory ~{_fmt(self.host)} per rank" if self.host else ""))


def _fmt(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _group_of(name: str, groups: Mapping[str, str]) -> str:
    return next((g for g, pre in groups.items() if name == pre or name.startswith(pre + ".")), "other")


def _adapter_target(module: str, patterns: tuple[str, ...]) -> bool:
    last = module.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(module, p) if ("*" in p or "." in p) else last == p for p in patterns)


def estimate(bridge: ModelBridge, inputs: PlanInputs) -> MemoryEstimate:
    """Per-rank bytes of the run ``inputs`` describes, from the bridge's parameter shapes and activation model."""
    shapes = bridge.parameter_shapes(inputs.tp)
    layouts = bridge.linear_layouts()
    frozen_b = trainable_n = frozen_n = adapters = low_n = 0.0
    # (values, gradient bytes, stays fp32 on the device) in the optimizer's order: decayed first
    decay: list[tuple[int, float, bool]] = []
    plain: list[tuple[int, float, bool]] = []
    lean_grads = inputs.main_grads_bytes == 2.0  # every trainable tensor of >= 2 dims is bf16, gradient too
    matmul = bridge.matmul_weights() if inputs.bf16_device_params and not lean_grads else frozenset()
    largest = largest_quantised = 0
    adapted: dict[str, bool] = {}
    compute_bytes = 2.0 if inputs.autocast else 4.0
    for name, (shape, numel) in shapes.items():
        group = _group_of(name, bridge.freeze_groups)
        frozen = inputs.freeze_other if group == "other" else bool(inputs.frozen_groups.get(group))
        largest = max(largest, numel)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        is_linear = module in layouts and len(shape) == 2
        if frozen:
            frozen_n += numel
            quantised = inputs.base_bytes is not None and is_linear and bridge.quantize_module_filter(module)
            frozen_b += numel * (inputs.base_bytes if quantised else compute_bytes)
            largest_quantised = max(largest_quantised, numel if quantised else 0)
        else:
            trainable_n += numel
            low = (lean_grads and len(shape) >= 2) or name in matmul
            low_n += numel if low else 0
            grad_bytes = 2.0 if lean_grads and len(shape) >= 2 else 4.0
            (plain if name.endswith(".bias") or len(shape) <= 1 else decay).append((numel, grad_bytes, not low))
        if inputs.peft and is_linear and _adapter_target(module, inputs.target_modules):
            adapters += inputs.adapter_dim * (shape[0] + shape[1])
            adapted[group] = True
            grad_bytes = 2.0 if lean_grads else 4.0
            decay += [(inputs.adapter_dim * shape[1], grad_bytes, not lean_grads),
                      (shape[0] * inputs.adapter_dim, grad_bytes, not lean_grads)]
    trainable_n += adapters
    low_n += adapters if lean_grads else 0  # the fp32-main-grads layout keeps a PEFT method's adapters fp32
    trained = {g: not inputs.frozen_groups.get(g, False) for g in bridge.freeze_groups}
    tokens, tiles = inputs.workload or bridge.workload_upper_bound(
        seq_length=inputs.seq_length, micro_batch_size=inputs.micro_batch_size, packed=inputs.packed)
    extra: dict[str, Any] = {} if inputs.recompute_modules is None else {"recompute_modules": inputs.recompute_modules}
    if inputs.sequence_parallel:  # only then: a bridge without sequence parallelism refuses the key anyway
        extra["sequence_parallel"] = True
    acts = bridge.activation_bytes(tokens=tokens, tiles=tiles, recompute=inputs.recompute, tp_size=inputs.tp,
                                   trained=trained, offload_layers=inputs.activation_offload_layers,
                                   adapted=adapted, **extra) or {}
    host_acts = 0.0
    if inputs.activation_offload_layers:  # what the offloaded layers keep, in pinned host memory instead
        kept = bridge.activation_bytes(tokens=tokens, tiles=tiles, recompute=inputs.recompute, tp_size=inputs.tp,
                                       trained=trained, offload_layers=0, adapted=adapted, **extra) or {}
        host_acts = PINNED_ACTIVATION_FACTOR * max(0.0, sum(kept.values()) - sum(acts.values()))
    moments = inputs.exp_avg_bytes + inputs.exp_avg_sq_bytes if inputs.optimizer == "adam" else 4.0
    shard = inputs.dp if inputs.distributed_optimizer else 1
    optimizer = trainable_n * moments / shard * (1.0 - inputs.optimizer_offload_fraction)
    high_n = trainable_n - low_n  # the rest: fp32 masters on the device, each cast to bf16 once a forward
    casts = high_n * 2.0 if inputs.autocast and inputs.main_params_bytes > 2 else 0.0
    host = offload_host_bytes(decay + plain, inputs.optimizer_offload_fraction,
                              pinned=inputs.pinned_host) if inputs.optimizer_offload_fraction else 0
    host += host_acts
    if inputs.host_build:  # the GPU receives the stored model, one (bf16) weight in flight while quantized
        build = frozen_b + 4.0 * trainable_n + 4.0 * largest
        host = max(host, compute_bytes * frozen_n + 4.0 * trainable_n)  # the model as built in host memory
    else:  # the model as built + two fp32 temporaries of the largest tensor while it is initialised/loaded
        per_frozen = compute_bytes if inputs.build_bytes_per_param is None else inputs.build_bytes_per_param
        build = per_frozen * frozen_n + 4.0 * trainable_n + 8.0 * largest
    return MemoryEstimate(
        frozen_weights=frozen_b, trainable_weights=low_n * 2.0 + high_n * inputs.main_params_bytes,
        gradients=low_n * inputs.main_grads_bytes + high_n * 4.0, optimizer=optimizer, cast_cache=casts,
        activations=dict(acts),
        build=build, workload=(tokens, tiles), trainable_params=int(trainable_n), frozen_params=int(frozen_n),
        dequantized=DEQUANT_BYTES_PER_PARAM * largest_quantised, host=float(host),
    )


# ----------------------------------------------------------------------------------- fitting the card
@attrs.frozen
class Option:
    """One change that lowers memory: the plan inputs it changes and the config overrides that spell it."""

    changes: Mapping[str, Any]
    overrides: tuple[str, ...]
    #: needs more GPUs than the run has (suggested in a refusal, never picked by ``auto``)
    more_gpus: bool = False


def _micro_batches(inputs: PlanInputs) -> list[int]:
    """Smaller micro-batch sizes that still divide the global batch over the data-parallel ranks."""
    return [m for m in range(inputs.micro_batch_size - 1, 0, -1)
            if inputs.global_batch_size % (m * inputs.dp) == 0]


def _peft_key(cfg: Any, key: str) -> bool:
    """The PEFT section (or the selected method's options) has ``key``."""
    return hasattr(cfg.peft, key) or key in (getattr(cfg.peft, "options", None) or {})


def _offload_counts(bridge: Any) -> list[int]:
    """``model.cpu_offloading_num_layers`` values the plan tries (fewer layers first; never the last layer)."""
    layers = bridge.num_decoder_layers() if bridge is not None else None
    if not layers:
        return [8]
    return sorted({n for n in (8, 16, 24, 32, 48) if n < layers} | ({layers - 1} if layers > 1 else set()))


def _selective_all(cfg: Any, inputs: PlanInputs, bridge: Any, offloads: list[Option]) -> list[Option]:
    """Selective recomputation of more of the modules the bridge can recompute (``recompute_modules`` lists
    them cheapest first): the default with each next one added, then every module with activation offload of
    more and more layers, then with the optimizer state on the host as well: cheaper in speed than full
    recomputation of the language model, which these come before."""
    every = tuple(bridge.recompute_modules) if bridge is not None else ()
    default = tuple(bridge.default_recompute_modules) if bridge is not None else ()
    have = set(inputs.recompute_modules or default)
    if inputs.recompute == "full" or not every or have >= set(every):
        return []

    def selective(modules: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
        return ({"recompute": "selective", "recompute_modules": modules},
                ("model.recompute_granularity=selective", f"model.recompute_modules=[{','.join(modules)}]"))

    growing = [tuple(m for m in every if m in have or m in every[:i + 1]) for i in range(len(every))]
    out = [Option(*selective(mods)) for i, mods in enumerate(growing)
           if not set(mods) <= have and mods not in growing[:i]]
    base, keys = selective(every)
    acts = [] if inputs.activation_offload_layers or not hasattr(cfg.model, "cpu_offloading") else [
        ({"activation_offload_layers": n}, ("model.cpu_offloading=true", f"model.cpu_offloading_num_layers={n}"))
        for n in _offload_counts(bridge)]
    out += [Option({**base, **ch}, keys + k) for ch, k in acts]
    opt = [o for o in offloads if "activation_offload_layers" not in o.changes and "optimizer_offload_fraction"
           in o.changes]
    for o in opt:
        out.append(Option({**base, **o.changes}, keys + o.overrides))
        out += [Option({**base, **ch, **o.changes}, keys + k + o.overrides) for ch, k in acts]
    return out


def _optimizer_offload(cfg: Any, inputs: PlanInputs) -> Option | None:
    """Adam's state in host memory (fp32 moments only). Under bf16 autocast with one data-parallel rank (or
    no distributed optimizer) as megatron-core does it: the precision-aware optimizer, which also stores the
    linear layers' weights as the bf16 they are computed in, their fp32 masters on the host (exact)."""
    fp32_moments = (inputs.exp_avg_bytes, inputs.exp_avg_sq_bytes) == (4.0, 4.0)
    if (not hasattr(cfg.optimizer, "optimizer_cpu_offload") or inputs.optimizer_offload_fraction
            or inputs.optimizer != "adam" or not fp32_moments):
        return None
    keys = ("optimizer.optimizer_cpu_offload=true", "optimizer.optimizer_offload_fraction=1.0")
    if (inputs.autocast and (inputs.dp == 1 or not inputs.distributed_optimizer)
            and hasattr(cfg.optimizer, "use_precision_aware_optimizer")):
        return Option({"optimizer_offload_fraction": 1.0, "bf16_device_params": True},
                      ("optimizer.use_precision_aware_optimizer=true", *keys))
    return Option({"optimizer_offload_fraction": 1.0}, keys)


def options_for(cfg: Any, inputs: PlanInputs, bridge: Any = None) -> list[Option]:
    """The memory options this config can take, cheapest in speed first (``auto`` tries them in this order).

    Offloading and 4-bit storage are offered only where the config has their keys; recomputing a
    tower's layers selectively (``model.recompute_modules``) and offloading more decoder layers only
    where ``bridge`` says what it can recompute and how many layers it has.
    """
    recomputes = ["selective",
                  "full"] if inputs.recompute is None else ["full"] if inputs.recompute == "selective" else []
    mbs = _micro_batches(inputs)
    ladder = [Option({"recompute": r}, (f"model.recompute_granularity={r}",)) for r in recomputes[:1]]
    ladder += [Option({"micro_batch_size": m}, (f"train.micro_batch_size={m}",)) for m in mbs]
    for r in recomputes:
        ladder += [Option({"recompute": r, "micro_batch_size": m},
                          (f"model.recompute_granularity={r}", f"train.micro_batch_size={m}")) for m in mbs]
    ladder += [Option({"recompute": r}, (f"model.recompute_granularity={r}",)) for r in recomputes[1:]]
    ladder.sort(key=lambda o: (o.changes.get("recompute") == "full", o.changes.get("recompute") is not None,
                               -o.changes.get("micro_batch_size", inputs.micro_batch_size)))
    deep: dict[str, Any] = {}
    deep_keys: tuple[str, ...] = ()
    if recomputes:
        deep["recompute"] = recomputes[-1]
        deep_keys += (f"model.recompute_granularity={recomputes[-1]}",)
    if mbs:
        deep["micro_batch_size"] = mbs[-1]
        deep_keys += (f"train.micro_batch_size={mbs[-1]}",)
    deepest = Option(deep, deep_keys)
    # exact options first (offloading moves state, the numbers stay); a 4-bit base changes what the
    # adapters train against, so auto takes it only when nothing exact fits
    offloads = []
    opt = _optimizer_offload(cfg, inputs)
    if opt is not None:
        offloads.append(opt)
    if hasattr(cfg.model, "cpu_offloading") and not inputs.activation_offload_layers:
        n = 8
        offloads.append(Option({"activation_offload_layers": n},
                               ("model.cpu_offloading=true", f"model.cpu_offloading_num_layers={n}")))
    if len(offloads) == 2:
        offloads.append(Option({**offloads[0].changes, **offloads[1].changes},
                               offloads[0].overrides + offloads[1].overrides))
    first_full = next((i for i, o in enumerate(ladder) if o.changes.get("recompute") == "full"), len(ladder))
    ladder[first_full:first_full] = _selective_all(cfg, inputs, bridge, offloads)
    ladder += [Option({**deepest.changes, **o.changes}, deepest.overrides + o.overrides) for o in offloads]
    if inputs.peft and inputs.base_bytes is None and _peft_key(cfg, "base_dtype"):
        host = getattr(cfg.model, "use_cpu_initialization", None) is not False  # its default with a 4-bit base
        ladder.append(Option({**deepest.changes, "base_bytes": NF4_BYTES_PER_PARAM, "host_build": host},
                             deepest.overrides + ("peft.base_dtype=nf4",)))
    tp2 = inputs.tp * 2
    ladder.append(Option({"tp": tp2}, (f"model.tensor_model_parallel_size={tp2} on {tp2 * inputs.dp} GPUs",),
                         more_gpus=True))
    return ladder


@attrs.frozen
class Decision:
    """What :func:`plan_run` found: the estimate of the run as configured (or as ``auto`` changed it)."""

    estimate: MemoryEstimate
    available: float | None
    chosen: Option | None = None
    #: host memory this rank may use (None: not checked)
    host_available: float | None = None

    @property
    def fits(self) -> bool:
        return _fits(self.estimate, self.available, self.host_available)


def _fits(e: MemoryEstimate, available: float | None, host_available: float | None) -> bool:
    return ((available is None or e.card <= available)
            and (host_available is None or e.host <= host_available))


def fit(bridge: ModelBridge, cfg: Any, inputs: PlanInputs, available: float | None, *,
        mode: str, host_available: float | None = None) -> Decision:
    """The plan for ``inputs``; under ``auto`` the first option of :func:`options_for` that fits the card
    (``available`` bytes) and the host memory (``host_available`` bytes per rank; None: not checked).

    :raises MemoryPlanError: (``check``/``auto``) nothing fits; the one-line message names the options that
        would (or the closest one).
    """
    est = estimate(bridge, inputs)
    if _fits(est, available, host_available) or mode == "off":
        return Decision(est, available, host_available=host_available)
    tried = [(o, estimate(bridge, attrs.evolve(inputs, **o.changes))) for o in options_for(cfg, inputs, bridge)]
    if mode == "auto":
        for o, e in tried:
            if not o.more_gpus and _fits(e, available, host_available):
                return Decision(e, available, o, host_available)
    fitting = [(o, e) for o, e in tried if _fits(e, available, host_available)][:3]
    shown = fitting or sorted(tried, key=lambda t: (t[1].card, t[1].host))[:1]
    names = "; or ".join(f"{' '.join(o.overrides)} (~{_fmt(e.card)}{_host_note(e, host_available)})"
                         for o, e in shown)
    gpu_ok = available is None or est.card <= available
    need = (f"~{_fmt(est.host)} of host memory per rank and {_fmt(host_available)} are available to each rank"
            if gpu_ok else f"~{_fmt(est.card)} per GPU and {_fmt(available)} are available")
    raise MemoryPlanError(
        f"memory plan: this run needs {need}: "
        f"it cannot fit. {'Options that fit' if fitting else 'Nothing tried fits; the smallest is'}: {names}"
        f"{'' if mode == 'auto' else ' (or train.memory_plan=auto to pick)'}; train.memory_plan=off runs it anyway"
    )


def _host_note(e: MemoryEstimate, host_available: float | None) -> str:
    return f", host ~{_fmt(e.host)}" if host_available is not None and e.host else ""


def apply_option(cfg: Any, option: Option) -> None:
    """Write an ``auto`` choice into the config (the settings the rest of the run reads)."""
    ch = option.changes
    if "recompute" in ch:
        cfg.model.recompute_granularity = ch["recompute"]
    if "micro_batch_size" in ch:
        cfg.train.micro_batch_size = ch["micro_batch_size"]
    if ch.get("recompute_modules"):
        cfg.model.recompute_modules = list(ch["recompute_modules"])
    if ch.get("base_bytes") is not None:
        if hasattr(cfg.peft, "base_dtype"):
            cfg.peft.base_dtype = "nf4"
        else:  # the PEFT method's own field (a PEFT plugin's), read when the method is applied
            cfg.peft.options["base_dtype"] = "nf4"
    if ch.get("optimizer_offload_fraction"):
        if ch.get("bf16_device_params"):
            cfg.optimizer.use_precision_aware_optimizer = True
        cfg.optimizer.optimizer_cpu_offload = True
        cfg.optimizer.optimizer_offload_fraction = ch["optimizer_offload_fraction"]
    if ch.get("activation_offload_layers"):
        cfg.model.cpu_offloading = True
        cfg.model.cpu_offloading_num_layers = ch["activation_offload_layers"]


def available_bytes(cfg: Any, ctx: Any) -> tuple[float | None, str]:
    """Bytes the run may use on each rank and where the figure comes from: the smallest free memory over the
    ranks' GPUs (``torch.cuda.mem_get_info``), or ``train.memory_budget_gb`` where that is smaller (on a CPU,
    the budget alone), else None (a CPU without a budget)."""
    budget = cfg.train.memory_budget_gb
    said = None if budget is None else (float(budget) * GB, f"train.memory_budget_gb={budget:g}")
    if ctx.device.type != "cuda":
        return said or (None, "no GPU (set train.memory_budget_gb to check against a card)")
    import torch

    free = float(torch.cuda.mem_get_info(ctx.device)[0])
    if ctx.world_size > 1:
        import torch.distributed as dist

        smallest = torch.tensor([free], device=ctx.device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        free = float(smallest.item())
    card = free, f"free on {torch.cuda.get_device_name(ctx.device)}"
    if said is None or said[0] <= card[0]:
        return said or card
    return card[0], f"{card[1]}, less than train.memory_budget_gb={budget:g}"


def host_available_bytes(ctx: Any) -> tuple[float | None, str]:
    """Host memory each rank may use on a GPU run: the node's available memory (psutil) over the ranks that
    share the node (``LOCAL_WORLD_SIZE``, as torchrun sets it), the smallest over all ranks so that every rank
    decides alike; (None, why) on a CPU run or without psutil."""
    if ctx.device.type != "cuda":
        return None, "a CPU run"
    try:
        import psutil
    except ImportError:
        return None, "psutil is not installed"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    node = float(psutil.virtual_memory().available)
    mine = node / local
    if ctx.world_size > 1:
        import torch
        import torch.distributed as dist

        smallest = torch.tensor([mine], device=ctx.device, dtype=torch.float64)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        mine = float(smallest.item())
    return mine, f"host memory: {_fmt(node)} available on this node, for {local} rank(s)"


def allocator_cap_bytes(budget_gb: float) -> float:
    """What ``train.memory_budget_gb`` leaves PyTorch's caching allocator: the budget less
    :data:`RUNTIME_OVERHEAD_BYTES`, which the driver counts beside it."""
    return float(budget_gb) * GB - RUNTIME_OVERHEAD_BYTES


def hold_to_budget(cfg: Any, ctx: Any, say: Callable[[str], None]) -> float | None:
    """``train.memory_budget_gb`` on a GPU is a limit, not only the plan's target: the caching allocator may
    reserve the budget less :data:`RUNTIME_OVERHEAD_BYTES` (what the driver counts beside it), so the card's
    peak stays within the budget. Without the cap the allocator caches whatever the card has free, and a run
    planned for 22 GB showed 22.8 GB on the driver (issue 22, visit L). A lower cap already set in the process
    (``torch.cuda.set_per_process_memory_fraction``) is kept. Returns the bytes the allocator may reserve, or
    None (no budget, or not a GPU). An allocation past the cap is an out-of-memory, reported as one."""
    budget = cfg.train.memory_budget_gb
    if budget is None or ctx.device.type != "cuda":
        return None
    import torch

    from nvlcore.config import ConfigError

    limit = allocator_cap_bytes(budget)
    if limit <= 0:
        raise ConfigError(f"train.memory_budget_gb={budget:g} leaves nothing for the run: the CUDA runtime "
                          f"itself takes ~{_fmt(RUNTIME_OVERHEAD_BYTES)} of a card; give a larger budget",
                          key="train.memory_budget_gb")
    total = float(torch.cuda.get_device_properties(ctx.device).total_memory)
    fraction = min(1.0, limit / total)
    current = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.9
    held = current(ctx.device) if current is not None else 1.0
    if held < fraction:
        say(f"nvl finetune: memory budget: the caching allocator keeps its lower cap of {_fmt(held * total)} "
            f"(train.memory_budget_gb={budget:g})")
        return held * total
    torch.cuda.set_per_process_memory_fraction(fraction, ctx.device)
    note = "" if float(budget) * GB <= total else f"; the card itself has only {_fmt(total)}"
    say(f"nvl finetune: memory budget: the caching allocator may reserve {_fmt(fraction * total)} "
        f"(train.memory_budget_gb={budget:g} less ~{_fmt(RUNTIME_OVERHEAD_BYTES)} for the CUDA runtime){note}")
    return fraction * total


def sample_workload(cfg: Any, bridge: ModelBridge, manager: Any, *, samples: int = 8) -> tuple[int, int] | None:
    """``(tokens, image tiles)`` of one micro-batch from ``samples`` training examples spread over the split: unpacked,
    ``micro_batch_size`` x the longest (rows pad to it); packed, full rows of ``seq_length`` holding as many
    tiles as that many average samples carry. None when the data cannot be read here (the plan then uses
    the bridge's upper bound)."""
    import random

    import numpy as np
    import torch

    ds = cfg.dataset
    seq = int(ds.seq_length or cfg.model.seq_length)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # the run's draws stay as they were
    try:
        made = manager.registry("dataset_maker").get(ds.maker_name)(split="train", **dict(ds.maker_kwargs))
        processor = bridge.processor(seq_length=seq)
        n = min(samples, len(made))
        shapes = []
        for i in range(n):
            out = processor(made[i * len(made) // n])
            pv = out.get("pixel_values")
            shapes.append((int(len(out["input_ids"])), 0 if pv is None else int(pv.shape[0])))
    except Exception:  # a plan is advice: an unreadable sample leaves it to the upper bound, the run reports it
        return None
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    if not shapes:
        return None
    mbs = int(cfg.train.micro_batch_size)
    if ds.packing == "none" and not ds.enable_in_batch_packing:
        longest = seq if ds.pad_to_max_length else max(t for t, _ in shapes)
        return mbs * min(seq, longest), mbs * max(k for _, k in shapes)
    mean_tokens = sum(t for t, _ in shapes) / len(shapes)
    mean_tiles = sum(k for _, k in shapes) / len(shapes)
    return mbs * seq, mbs * int(round(seq / max(1.0, mean_tokens) * mean_tiles + 0.5))


def plan_run(cfg: Any, bridge: ModelBridge, ctx: Any, say: Callable[[str], None], *,
             manager: Any = None) -> Decision | None:
    """``train.memory_plan``: print the plan before any weights load; ``check`` refuses a run that cannot
    fit, ``auto`` changes micro-batch, recompute and offload settings in ``cfg`` until it fits.

    The workload (tokens and tiles per micro-batch) is read from a few training samples when
    ``manager`` is given, else the bridge's upper bound is used.
    """
    mode = cfg.train.memory_plan
    if mode == "off":
        return None
    workload = sample_workload(cfg, bridge, manager) if manager is not None else None
    inputs = PlanInputs.from_config(cfg, world_size=ctx.world_size, workload=workload,
                                    pinned_host=ctx.device.type == "cuda")
    available, source = available_bytes(cfg, ctx)
    host_available, host_source = host_available_bytes(ctx)
    try:
        decision = fit(bridge, cfg, inputs, available, mode=mode, host_available=host_available)
    except MemoryPlanError:
        raise
    except Exception as exc:  # a bridge that cannot describe its parameters without weights: no plan, say why
        say(f"nvl finetune: memory plan: not available for bridge {bridge.name!r} ({type(exc).__name__}: {exc})")
        return None
    if decision.chosen is not None:
        apply_option(cfg, decision.chosen)
        say(f"nvl finetune: memory plan (auto): chose {' '.join(decision.chosen.overrides)} to fit")
    room = "" if available is None else f"; {_fmt(available)} available ({source})"
    room += "" if host_available is None else f"; {host_source}"
    basis = "workload from training samples" if workload else "workload: upper bound, full rows"
    say(f"nvl finetune: memory plan: {decision.estimate.describe()} ({basis}){room}")
    return decision
