"""Optimizer, gradient reduction and clipping for tensor x data parallel training.

Precision (see docs/finetune.md, "Precision"): trainable parameters are fp32 (they are the master
weights), gradients are accumulated and reduced in fp32, and Adam's moments are fp32. On a GPU the
forward and backward run under ``torch.autocast(bfloat16)``, so every matmul runs in bf16 on the
tensor cores while the optimizer only ever sees fp32. This costs 16 bytes per trainable parameter
(4 param + 4 grad + 8 Adam), the same as bf16 params with separate fp32 master copies and bf16
gradients, and less than bf16 params + fp32 masters + fp32 main-grad buffers (18 bytes). With the
distributed optimizer (``ddp.use_distributed_optimizer``, data parallel > 1) the Adam state is sharded
over the data-parallel ranks (``ZeroRedundancyOptimizer``): 8/DP bytes instead of 8.

Gradient norm across ranks: a parameter that Megatron marks ``tensor_model_parallel`` is a distinct
shard on each TP rank and counts on every rank; a replicated parameter (layer norms, biases of
row-parallel layers, ...) has the same gradient on every TP rank and counts on TP rank 0 only. The
sum of squares is then all-reduced over the TP group. Gradients are already identical across DP
ranks after the data-parallel reduction, so nothing is reduced over DP.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Iterable, Sequence
import attrs

if TYPE_CHECKING:
    import torch

#: Gradients are all-reduced in flat buckets of at most this many bytes.
BUCKET_BYTES = 128 * 1024 * 1024


def no_weight_decay(name: str, param: "torch.Tensor") -> bool:
    """Megatron's rule: biases and 1-D parameters (norm weights, state-space ``D``/``dt_bias``...) get no decay."""
    return name.endswith(".bias") or param.dim() <= 1


def trainable_named_parameters(model: "torch.nn.Module") -> list[tuple[str, "torch.nn.Parameter"]]:
    """The parameters the optimizer updates, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(
    named_params: Sequence[tuple[str, "torch.nn.Parameter"]],
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
) -> "torch.optim.Optimizer":
    """AdamW (decoupled weight decay, as Megatron's ``adam``) or SGD with momentum (``sgd``, as
    Megatron's: ``torch.optim.SGD``, coupled weight decay) over two groups: decayed and not.

    Each group carries ``wd_mult`` (1.0 or 0.0); the trainer sets ``lr`` and ``weight_decay`` of every
    group before each update from the schedules.

    ``distributed`` (``ddp.use_distributed_optimizer``) with ``dp_size > 1`` shards the optimizer
    state over the data-parallel ranks with ``torch.distributed.optim.ZeroRedundancyOptimizer``: each
    rank keeps the state of, and updates, about ``1/dp_size`` of the parameters, then broadcasts them.
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
                f"trainable parameter {n} is {p.dtype}; the trainer keeps fp32 master weights, build the model in float32"
            )
    groups = [g for g in (
        {"params": decay, "wd_mult": 1.0, "weight_decay": weight_decay},
        {"params": plain, "wd_mult": 0.0, "weight_decay": 0.0},
    ) if g["params"]]
    cls: Any
    if optimizer == "adam":
        cls = torch.optim.AdamW
        kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    elif optimizer == "sgd":
        cls = torch.optim.SGD
        kwargs = {"lr": lr, "momentum": sgd_momentum}
    else:
        raise ValueError(f"optimizer.optimizer={optimizer!r}: choose adam or sgd")
    if device_type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    if distributed and dp_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=dp_group, **kwargs)
    return cls(groups, **kwargs)


def local_optimizer(optimizer: "torch.optim.Optimizer") -> "torch.optim.Optimizer":
    """The optimizer that holds this rank's state: the wrapped one of a ``ZeroRedundancyOptimizer``."""
    return getattr(optimizer, "optim", optimizer) if is_sharded(optimizer) else optimizer


def is_sharded(optimizer: Any) -> bool:
    """Whether the optimizer state is sharded over data-parallel ranks (``ZeroRedundancyOptimizer``)."""
    # Importing torch.distributed.optim costs seconds of CPU; an optimizer built as a
    # ZeroRedundancyOptimizer has imported it already, so an absent module means "not sharded".
    zero = sys.modules.get("torch.distributed.optim")
    return zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer)


def owns_parameter(optimizer: Any, param: "torch.Tensor") -> bool:
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
    return ("exp_avg", "exp_avg_sq")


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state tensors held by this rank (after the first update created them)."""
    import torch

    total = 0
    for st in local_optimizer(optimizer).state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def set_hyperparameters(optimizer: "torch.optim.Optimizer", *, lr: float, weight_decay: float) -> None:
    """Apply this update's learning rate and weight decay to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def materialize_grads(params: Iterable["torch.nn.Parameter"]) -> list["torch.Tensor"]:
    """Give every trainable parameter a gradient (zeros where the forward did not use it).

    A text-only micro-batch leaves the vision tower without gradients on one rank while another rank
    has them; every rank must reduce the same list of tensors, and the update must not depend on
    how the global batch was split over ranks.
    """
    import torch

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
        grads.append(p.grad)
    return grads


def _buckets(tensors: Sequence["torch.Tensor"], limit: int) -> list[list["torch.Tensor"]]:
    out: list[list["torch.Tensor"]] = []
    cur: list["torch.Tensor"] = []
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
    grads: Sequence["torch.Tensor"], *, group: Any, group_size: int, scale: float, bucket_bytes: int | None = None
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
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)
    if grads:
        torch._foreach_mul_(list(grads), scale)


def grad_norm_and_clip(
    named_params: Sequence[tuple[str, "torch.nn.Parameter"]],
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

    counted = [
        p.grad for _, p in named_params
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    ]
    if counted:
        norms = torch._foreach_norm(counted, 2.0)
        total_sq = torch.stack([n.float() for n in norms]).pow(2).sum()
    else:
        device = named_params[0][1].device if named_params else "cpu"
        total_sq = torch.zeros((), dtype=torch.float32, device=device)
    if tp_size > 1:
        dist.all_reduce(total_sq, group=tp_group)
    norm = float(total_sq.sqrt().item())
    if max_norm > 0 and norm == norm and norm != float("inf"):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            all_grads = [p.grad for _, p in named_params if p.grad is not None]
            torch._foreach_mul_(all_grads, coef)
    return norm


def check_replicated_parameters(
    named_params: Sequence[tuple[str, "torch.Tensor"]], *, tp_group: Any, tp_size: int
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
        torch.stack([t.detach().double().sum(), t.detach().double().square().sum(), torch.tensor(float(t.numel()), dtype=torch.float64, device=device)])
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


def broadcast_parameters(params: Iterable["torch.Tensor"], *, src_global_rank: int, group: Any, group_size: int) -> None:
    """Make data-parallel replicas start from the same weights (as DDP does at construction)."""
    import torch.distributed as dist

    if group_size <= 1:
        return
    for p in params:
        dist.broadcast(p.data, src=src_global_rank, group=group)


# ------------------------------------------------------------------------------ precision, memory
def store_frozen_in_(model: "torch.nn.Module", dtype: "torch.dtype") -> int:
    """Convert every frozen floating-point parameter of ``model`` to ``dtype`` in place; trainable ones
    stay fp32 (the optimizer's masters). Returns the number of parameters converted.

    Call it after freezing and PEFT: which parameters train is known only then.
    """
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


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


def memory_plan(model: "torch.nn.Module") -> MemoryPlan:
    """The static memory of this rank's shard of ``model`` (fp32 gradients and two Adam moments per
    trainable parameter)."""
    frozen = trainable = fz_n = tr_n = 0
    for p in model.parameters():
        b = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += b
            tr_n += p.numel()
        else:
            frozen += b
            fz_n += p.numel()
    return MemoryPlan(frozen_bytes=frozen, trainable_bytes=trainable, grad_bytes=tr_n * 4, optimizer_bytes=tr_n * 8,
                      frozen_params=fz_n, trainable_params=tr_n)
