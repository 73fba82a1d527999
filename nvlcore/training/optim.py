"""Optimizer, gradient reduction and clipping for tensor x data parallel training.

Precision (see docs/finetune.md, "Precision"): trainable parameters are fp32 (they are the master
weights), gradients are accumulated and reduced in fp32, and Adam's moments are fp32. On a GPU the
forward and backward run under ``torch.autocast(bfloat16)``, so every matmul runs in bf16 on the
tensor cores while the optimizer only ever sees fp32. This costs 16 bytes per trainable parameter
(4 param + 4 grad + 8 Adam), the same as bf16 params with separate fp32 master copies and bf16
gradients, and less than bf16 params + fp32 masters + fp32 main-grad buffers (18 bytes). With the
distributed optimizer (``ddp.use_distributed_optimizer``, data parallel > 1) the Adam state is sharded
over the data-parallel ranks (``ZeroRedundancyOptimizer``): 8/DP bytes instead of 8. With
``optimizer.main_grads_dtype=torch.bfloat16`` (state fully in host memory) trainable parameters of >= 2 dims
and their gradients are bf16 on the device and their fp32 masters live on the host (:mod:`~nvlcore.training.
host_offload`): 4 device bytes per such parameter; the gradient norm is then computed in fp32. With the
precision-aware optimizer fully offloaded and fp32 main grads (megatron-core's default layout for it) the linear
layers' weights are bf16 on the device with an fp32 ``main_grad`` each (:func:`~nvlcore.training.grads.
grad_of`), their masters on the host: 6 device bytes per such value, and the same update as fp32 weights under
autocast.

Gradient norm across ranks: a parameter that Megatron marks ``tensor_model_parallel`` is a distinct
shard on each TP rank and counts on every rank; a replicated parameter (layer norms, biases of
row-parallel layers, ...) has the same gradient on every TP rank and counts on TP rank 0 only. The
sum of squares is then all-reduced over the TP group. Gradients are already identical across DP
ranks after the data-parallel reduction, so nothing is reduced over DP.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nvlcore.training.grads import grad_of

if TYPE_CHECKING:
    import torch

#: Gradients are all-reduced in flat buckets of at most this many bytes.
BUCKET_BYTES = 128 * 1024 * 1024


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's rule: biases and 1-D parameters (norm weights, state-space ``D``/``dt_bias``...) get no decay."""
    return name.endswith(".bias") or param.dim() <= 1


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer updates, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    device_type: str = "cpu",
    optimizer: str = "adam",
    sgd_momentum: float = 0.9,
    distributed: bool = False,
    dp_group: Any = None,
    dp_size: int = 1,
    exp_avg_dtype: str = "torch.float32",
    exp_avg_sq_dtype: str = "torch.float32",
    offload_fraction: float = 0.0,
    main_grads_dtype: str = "torch.float32",
    bf16_params: Collection[str] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, as Megatron's ``adam``) or SGD with momentum (``sgd``, as
    Megatron's: ``torch.optim.SGD``, coupled weight decay) over two groups: decayed and not.

    Each group carries ``wd_mult`` (1.0 or 0.0); the trainer sets ``lr`` and ``weight_decay`` of every
    group before each update from the schedules.

    ``distributed`` (``ddp.use_distributed_optimizer``) with ``dp_size > 1`` shards the optimizer
    state over the data-parallel ranks with ``torch.distributed.optim.ZeroRedundancyOptimizer``: each
    rank keeps the state of, and updates, about ``1/dp_size`` of the parameters, then broadcasts them.

    ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` (megatron-core's precision-aware optimizer; ``"torch.bfloat16"``
    or the default ``"torch.float32"``) store Adam's moments in that dtype (:class:`~nvlcore.training.lean_adam.
    LeanAdamW`, torchao's update); the parameters and gradients stay fp32.

    ``offload_fraction`` > 0 (``optimizer.optimizer_cpu_offload``) keeps Adam's state of that fraction of
    the parameter values in host memory and updates them there (:class:`~nvlcore.training.host_offload.
    HostOffloadAdamW`).

    ``main_grads_dtype="torch.bfloat16"`` (with ``offload_fraction=1.0``; megatron-core's HybridDeviceOptimizer
    layout) then stores every trainable parameter of >= 2 dims in bf16 on the device, so its gradients are bf16
    too: the fp32 masters captured here and Adam's moments live only in host memory
    (:meth:`~nvlcore.training.host_offload.HostOffloadAdamW.store_params_in`); 1-D parameters stay fp32.

    ``bf16_params`` (``optimizer.use_precision_aware_optimizer=true`` with the state fully offloaded and fp32
    main grads, megatron-core's default layout for it): the named parameters (weights only ever used by a
    matmul, which autocast would round to bf16 anyway) are stored in bf16 on the device with an fp32 main
    gradient each, their fp32 masters and moments in host memory: 6 device bytes per such parameter instead of
    10 (fp32 value, fp32 gradient, the forward's bf16 copy), and the same update.
    """
    import torch

    if not named_params:
        raise ValueError(
            "no trainable parameters: every parameter is frozen (check model.freeze_* and the PEFT settings)"
        )
    decay = [p for n, p in named_params if not no_weight_decay(n, p)]
    plain = [p for n, p in named_params if no_weight_decay(n, p)]
    for n, p in named_params:
        if p.dtype != torch.float32:
            raise TypeError(
                f"trainable parameter {n} is {p.dtype}; the trainer keeps fp32 master weights, build the model in "
                "float32"
            )
    groups = [g for g in (
        {"params": decay, "wd_mult": 1.0, "weight_decay": weight_decay},
        {"params": plain, "wd_mult": 0.0, "weight_decay": 0.0},
    ) if g["params"]]
    cls: Any
    lean = (exp_avg_dtype, exp_avg_sq_dtype) != ("torch.float32", "torch.float32")
    if optimizer == "adam" and lean:
        try:
            from nvlcore.training.lean_adam import MOMENT_DTYPES, LeanAdamW
        except ImportError as exc:
            from nvlcore.config import ConfigError

            raise ConfigError("optimizer.exp_avg_dtype / exp_avg_sq_dtype other than torch.float32 need torchao "
                              f"({exc}); pip install 'nvl[memory]'", key="optimizer.exp_avg_dtype") from None

        cls = LeanAdamW
        kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps, "exp_avg_dtype": MOMENT_DTYPES[exp_avg_dtype],
                                  "exp_avg_sq_dtype": MOMENT_DTYPES[exp_avg_sq_dtype]}
    elif optimizer == "adam" and offload_fraction > 0:
        from nvlcore.training.host_offload import HostOffloadAdamW

        cls = HostOffloadAdamW
        # the bf16 layouts pin only the masters of what stays fp32 on the device (store_params_in)
        lean_params = main_grads_dtype == "torch.bfloat16" or bf16_params is not None
        kwargs = {"lr": lr, "betas": betas, "eps": eps, "offload_fraction": offload_fraction,
                  "pin_masters": not lean_params}
    elif optimizer == "adam":
        cls = torch.optim.AdamW
        kwargs = {"lr": lr, "betas": betas, "eps": eps}
    elif optimizer == "sgd":
        cls = torch.optim.SGD
        kwargs = {"lr": lr, "momentum": sgd_momentum}
    else:
        raise ValueError(f"optimizer.optimizer={optimizer!r}: choose adam or sgd")
    if lean or cls.__name__ == "HostOffloadAdamW":
        pass  # their own kernels: torchao's compiled update; the host/device split picks per part
    elif device_type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    if main_grads_dtype == "torch.bfloat16" or bf16_params is not None:
        return _bf16_layout(cls(groups, **kwargs), named_params, bf16_params, offload_fraction,
                            distributed and dp_size > 1)
    if distributed and dp_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=dp_group, **kwargs)
    return cls(groups, **kwargs)


def _bf16_layout(host: Any, named_params: Sequence[tuple[str, torch.nn.Parameter]], names: Collection[str] | None,
                 offload_fraction: float, sharded: bool) -> Any:
    """The precision-aware optimizer fully in host memory (``host`` captured the fp32 masters): with ``names``,
    those parameters stored bf16 with fp32 main gradients; without (``optimizer.main_grads_dtype=
    torch.bfloat16``), every parameter of >= 2 dims stored bf16 with bf16 gradients."""
    import torch

    from nvlcore.config import ConfigError

    what = ("optimizer.main_grads_dtype=torch.bfloat16" if names is None else
            "optimizer.use_precision_aware_optimizer=true with optimizer.optimizer_cpu_offload=true")
    if type(host).__name__ != "HostOffloadAdamW" or offload_fraction != 1.0:
        raise ConfigError(f"{what} needs optimizer.optimizer=adam with fp32 moments, optimizer.optimizer_cpu_offload="
                          "true and optimizer_offload_fraction=1.0", key="optimizer.optimizer_offload_fraction")
    if sharded:
        raise ConfigError(f"{what} keeps the whole optimizer state in host memory and is not implemented with the "
                          "distributed optimizer over several data-parallel ranks; set "
                          "ddp.use_distributed_optimizer=false", key="ddp.use_distributed_optimizer")
    if names is None:
        host.store_params_in(torch.bfloat16)
    else:
        chosen = {id(p) for n, p in named_params if n in set(names)}
        host.store_params_in(torch.bfloat16, keep=lambda p: id(p) not in chosen, main_grads=True)
    return host


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: the wrapped one of a ``ZeroRedundancyOptimizer``."""
    return getattr(optimizer, "optim", optimizer) if is_sharded(optimizer) else optimizer


def is_sharded(optimizer: Any) -> bool:
    """Whether the optimizer state is sharded over data-parallel ranks (``ZeroRedundancyOptimizer``)."""
    # Importing torch.distributed.optim costs seconds of CPU; an optimizer built as a
    # ZeroRedundancyOptimizer has imported it already, so an absent module means "not sharded".
    zero = sys.modules.get("torch.distributed.optim")
    return zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer)


def owns_parameter(optimizer: Any, param: torch.Tensor) -> bool:
    """Whether this rank keeps ``param``'s optimizer state (always, unless the state is sharded)."""
    if not is_sharded(optimizer):
        return True
    return optimizer._param_to_rank[param] == optimizer.rank


def state_names(optimizer: Any) -> tuple[str, ...]:
    """The per-parameter state tensors of the optimizer kind (shaped like the parameter)."""
    import torch

    inner = local_optimizer(optimizer)
    if isinstance(inner, torch.optim.SGD):
        return ("momentum_buffer",) if inner.defaults.get("momentum", 0) else ()
    if getattr(inner, "keeps_main_params", False):  # the host fp32 masters of bf16 device parameters
        return ("exp_avg", "exp_avg_sq", "main_param")
    return ("exp_avg", "exp_avg_sq")


def moment_entries(value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A moment as checkpoints keep it: fp32 values under the moment's own key (``""``; bf16 widens exactly),
    and for an 8-bit moment its block scales too (key suffix ``.block_scale``: an exact resume)."""
    import torch

    if type(value) is not torch.Tensor:  # a quantized state tensor (torchao's)
        from nvlcore.training.lean_adam import export_moment

        return export_moment(value)
    return {"": value if value.dtype == torch.float32 else value.float()}


def quantized_moments(optimizer: Any, param: torch.Tensor) -> tuple[str, ...]:
    """The moments of ``param`` this optimizer stores in 8 bits (their block scales are checkpointed)."""
    import torch

    inner = local_optimizer(optimizer)
    dtypes = getattr(inner, "moment_dtypes", None)
    if not dtypes or param.numel() < inner.min_quantized_size or param.numel() % inner.block_size:
        return ()
    return tuple(m for m, signed in (("exp_avg", True), ("exp_avg_sq", False)) if dtypes[signed] is torch.uint8)


def adopt_loaded_moments(optimizer: Any, block_scales: dict[Any, dict[str, torch.Tensor]] | None = None) -> None:
    """After ``load_state_dict`` put fp32 moments back, turn them into the optimizer's storage dtypes."""
    inner = local_optimizer(optimizer)
    adopt = getattr(inner, "adopt_fp32_moments", None)
    if adopt is not None:
        adopt(block_scales)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state tensors held by this rank (after the first update created them)."""
    import torch

    total = 0
    for st in local_optimizer(optimizer).state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if type(v) is not torch.Tensor:  # a quantized state tensor (torchao's)
                    from nvlcore.training.lean_adam import state_bytes

                    total += state_bytes(v)
                else:
                    total += v.numel() * v.element_size()
    return total


def set_hyperparameters(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float) -> None:
    """Apply this update's learning rate and weight decay to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def materialize_grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Give every trainable parameter a gradient (zeros where the forward did not use it).

    A text-only micro-batch leaves the vision tower without gradients on one rank while another rank
    has them; every rank must reduce the same list of tensors, and the update must not depend on
    how the global batch was split over ranks.
    """
    import torch

    grads = []
    for p in params:
        g = grad_of(p)
        if g is None:
            g = p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
        grads.append(g)
    return grads


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    cur: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if cur and (size + nbytes > limit or t.dtype != cur[0].dtype):
            out.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes
    if cur:
        out.append(cur)
    return out


def reduce_gradients(
    grads: Sequence[torch.Tensor], *, group: Any, group_size: int, scale: float, bucket_bytes: int | None = None
) -> None:
    """Sum gradients over the data-parallel group (fp32), then multiply by ``scale``.

    The all-reduce runs on flat buckets of at most ``bucket_bytes`` (default :data:`BUCKET_BYTES`;
    ``ddp.bucket_size`` elements x 4 bytes when set).

    The trainer back-propagates the *sum* of token losses and passes ``scale = 1 / supervised tokens
    of the global batch``, which makes the update token-weighted however the batch is split.
    """
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if group_size > 1:
        for bucket in _buckets(grads, bucket_bytes or BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                g.copy_(synced)
    if grads:
        torch._foreach_mul_(list(grads), scale)


def grad_norm_and_clip(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    *,
    max_norm: float,
    tp_group: Any,
    tp_size: int,
    tp_rank: int,
) -> float:
    """The global L2 norm of all gradients (each TP shard once, replicated params once), clipping to ``max_norm``.

    Nothing is clipped when ``max_norm <= 0`` or the norm is not finite (the step is then skipped).
    """
    import torch
    import torch.distributed as dist

    grads = [(p, grad_of(p)) for _, p in named_params]
    counted = [g for p, g in grads if g is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)]
    if counted:
        norms = torch._foreach_norm(counted, 2.0, dtype=torch.float32)  # bf16 gradients: the norm in fp32
        total_sq = torch.stack(list(norms)).pow(2).sum()
    else:
        device = named_params[0][1].device if named_params else "cpu"
        total_sq = torch.zeros((), dtype=torch.float32, device=device)
    if tp_size > 1:
        dist.all_reduce(total_sq, group=tp_group)
    norm = float(total_sq.sqrt().item())
    if max_norm > 0 and norm == norm and norm != float("inf"):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            all_grads = [g for _, g in grads if g is not None]
            torch._foreach_mul_(all_grads, coef)
    return norm


def check_replicated_parameters(
    named_params: Sequence[tuple[str, torch.Tensor]], *, tp_group: Any, tp_size: int
) -> None:
    """Fail if a parameter not marked ``tensor_model_parallel`` holds different values on TP ranks.

    Such a parameter is really a shard (the gradient norm would count it wrongly) or was loaded
    differently on each rank; either way training would silently diverge between ranks.
    """
    import torch
    import torch.distributed as dist

    if tp_size <= 1:
        return
    names = [n for n, p in named_params if not getattr(p, "tensor_model_parallel", False)]
    tensors = [p for n, p in named_params if not getattr(p, "tensor_model_parallel", False)]
    if not tensors:
        return
    device = tensors[0].device
    fp = torch.stack([
        torch.stack([t.detach().double().sum(), t.detach().double().square().sum(),
                     torch.tensor(float(t.numel()), dtype=torch.float64, device=device)])
        for t in tensors
    ]).to(device)
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=tp_group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=tp_group)
    bad = [names[i] for i in range(len(names)) if not torch.equal(hi[i], lo[i])]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RuntimeError(
            f"parameters differ across tensor-parallel ranks but are not marked tensor_model_parallel: {shown}. "
            "The model bridge must mark sharded parameters (megatron.core.tensor_parallel."
            "set_tensor_model_parallel_attributes) and load replicated ones identically on every rank."
        )


def broadcast_parameters(params: Iterable[torch.Tensor], *, src_global_rank: int, group: Any, group_size: int) -> None:
    """Make data-parallel replicas start from the same weights (as DDP does at construction)."""
    import torch.distributed as dist

    if group_size <= 1:
        return
    for p in params:
        dist.broadcast(p.data, src=src_global_rank, group=group)


# ------------------------------------------------------------------------------ precision, memory
def store_frozen_in_(model: torch.nn.Module, dtype: torch.dtype,
                     keep_fp32: Callable[[str, torch.Tensor], bool] | None = None) -> int:
    """Convert every frozen floating-point parameter of ``model`` to ``dtype`` in place; trainable ones
    stay fp32 (the optimizer's masters). Returns the number of parameters converted.

    ``keep_fp32(name, param)`` (the model bridge's :meth:`~nvlcore.bridge.ModelBridge.keeps_fp32`)
    names frozen parameters that stay as they are, so the base the adapters train against is the one
    the checkpoint, merge and inference use. A parameter already stored in a tensor subclass (a PEFT
    method's quantized base, see :func:`is_packed`) is left alone. Call it after freezing and PEFT:
    which parameters train is known only then.
    """
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad or not p.is_floating_point() or p.dtype == dtype or is_packed(p):
            continue
        if keep_fp32 is not None and keep_fp32(name, p):
            continue
        p.data = p.data.to(dtype)
        n += p.numel()
    return n


def is_packed(p: torch.Tensor) -> bool:
    """Whether ``p`` holds a tensor subclass that stores its values in other tensors (a quantized
    weight such as torchao's NF4): its bytes are its inner tensors', not ``numel x element_size``."""
    return hasattr(p.data if hasattr(p, "data") else p, "__tensor_flatten__")


def stored_bytes(p: torch.Tensor) -> int:
    """The bytes ``p`` really holds (the inner tensors of a packed one, see :func:`is_packed`)."""
    t = p.data if hasattr(p, "data") else p
    if not is_packed(t):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(stored_bytes(getattr(t, a)) for a in names)


def describe_storage(model: torch.nn.Module) -> str:
    """How the frozen parameters are stored, for the run's first lines: count and bytes per storage
    (a dtype, or the class of a packed tensor), e.g. ``NF4Tensor 84 tensors 1.20 GB; bfloat16 ...``."""
    groups: dict[str, list[int]] = {}
    for p in model.parameters():
        if p.requires_grad:
            continue
        kind = type(p.data).__name__ if is_packed(p) else str(p.dtype).replace("torch.", "")
        g = groups.setdefault(kind, [0, 0])
        g[0] += 1
        g[1] += stored_bytes(p)
    if not groups:
        return "no frozen parameters"
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return "; ".join(f"{k} {n} tensors {_size(b)}" for k, (n, b) in ranked)


@attrs.define
class MemoryPlan:
    """Bytes this rank holds for parameters, gradients and optimizer state (activations come on top)."""

    frozen_bytes: int
    trainable_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    frozen_params: int
    trainable_params: int

    def describe(self) -> str:
        total = self.frozen_bytes + self.trainable_bytes + self.grad_bytes + self.optimizer_bytes
        return (f"frozen weights {_size(self.frozen_bytes)} ({self.frozen_params:,} params), "
                f"trainable fp32 masters {_size(self.trainable_bytes)} ({self.trainable_params:,}), "
                f"gradients {_size(self.grad_bytes)}, Adam moments {_size(self.optimizer_bytes)}; "
                f"{_size(total)} before activations")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def memory_plan(model: torch.nn.Module) -> MemoryPlan:
    """The static memory of this rank's shard of ``model`` (fp32 gradients and two Adam moments per
    trainable parameter)."""
    frozen = trainable = grads = fz_n = tr_n = 0
    for p in model.parameters():
        b = stored_bytes(p)
        if p.requires_grad:
            trainable += b
            grads += b  # a gradient has its parameter's dtype (bf16 under optimizer.main_grads_dtype=torch.bfloat16)
            tr_n += p.numel()
        else:
            frozen += b
            fz_n += p.numel()
    return MemoryPlan(frozen_bytes=frozen, trainable_bytes=trainable, grad_bytes=grads, optimizer_bytes=tr_n * 8,
                      frozen_params=fz_n, trainable_params=tr_n)
