"""The trainer's side of checkpoints: what goes in, what comes back, and which checkpoint to resume.

Storage is :mod:`nvlcore.checkpoint` (Megatron-Bridge layout, PyTorch DCP). A training checkpoint holds:

- the model weights as *logical* tensors: the bridge's component keys where the bridge maps the
  parameter (``bridge.checkpoint_entries`` / ``bridge.assemble_from_entries``), else one tensor per
  parameter with tensor-parallel shards saved as DTensor ``Shard(partition_dim)``; each rank writes
  its own rows, and a checkpoint written at one TP size loads at another;
- ``optimizer/<key>.exp_avg`` and ``.exp_avg_sq`` (Adam's moments) or ``.momentum_buffer`` (SGD),
  keyed and sharded exactly like the weights (so they reshard the same way). With the distributed
  optimizer (``ddp.use_distributed_optimizer``) each data-parallel rank writes the state of the
  parameters it owns: the checkpoint is the same, whichever data-parallel size or optimizer sharding
  wrote or reads it;
- ``extra_state.pt``: the Adam step count, the data position and seed, the layout it was saved at;
- ``rank_states/rank_N.pt``: each rank's Python, NumPy, torch and CUDA RNG states;
- ``train_state.pt``: :class:`~nvlcore.training.trainer.TrainState`;
- ``run_config.yaml``: the resolved run config.

Under PEFT only the trainable parameters (adapters, plus whatever the method leaves trainable) and
their optimizer state are saved; ``run_config.yaml`` records ``checkpoint.pretrained_checkpoint``, the
base the adapters apply to.

Resume rules (:func:`decide_resume`): ``checkpoint.load`` resumes explicitly. Without it, a
``checkpoint.save`` directory that already holds checkpoints is resumed only when its
``run_config.yaml`` describes the same run (the same command restarted, e.g. after preemption);
otherwise the run refuses to start and says how to resume on purpose or where to save instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

    from nvlcore.parallel import ParallelContext

#: Config keys that do not change what is trained: a restarted run may differ in them.
RUN_IDENTITY_IGNORED = (
    "checkpoint.load", "checkpoint.save", "checkpoint.save_interval", "checkpoint.most_recent_k",
    "checkpoint.async_save", "checkpoint.fully_parallel_save", "checkpoint.fully_parallel_load",
    "checkpoint.exit_on_missing_checkpoint", "checkpoint.ckpt_step", "checkpoint.save_tokenizer_assets",
    "logger", "validation", "train.exit_interval", "train.exit_duration_in_mins", "train.manual_gc",
    "train.manual_gc_interval", "train.manual_gc_eval", "dataset.num_workers", "dataset.pin_memory",
    "dataset.persistent_workers", "dist.distributed_timeout_minutes", "dist.distributed_backend",
    "dataset.skip_test", "dataset.test_maker_kwargs", "ddp.use_distributed_optimizer", "ddp.bucket_size",
    "ddp.check_for_nan_in_grad",
)


class ResumeRefused(RuntimeError):
    """``checkpoint.save`` holds another run's checkpoints and ``checkpoint.load`` is not set."""


@attrs.frozen
class ResumeDecision:
    """Which checkpoint to resume (``iter_dir``), or none, and why (printed on rank 0)."""

    iter_dir: Path | None
    reason: str


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not key.startswith(("dataset.maker_kwargs", "peft.options")):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _yaml_round_trip(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` as it reads back from ``run_config.yaml`` (tuples become lists, paths strings...)."""
    import yaml

    from nvlcore.checkpoint.save import _plain

    return yaml.safe_load(yaml.safe_dump(_plain(dict(d)), sort_keys=False)) or {}


def run_config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two run configs, ignoring :data:`RUN_IDENTITY_IGNORED`."""
    a, b = _flatten(_yaml_round_trip(saved)), _flatten(_yaml_round_trip(current))

    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in RUN_IDENTITY_IGNORED)

    keys = sorted(k for k in set(a) | set(b) if not ignored(k))
    return [k for k in keys if a.get(k) != b.get(k)]


def decide_resume(*, load: str | None, save: str | None, ckpt_step: int | None, run_config: Mapping[str, Any],
                  exit_on_missing_checkpoint: bool = False) -> ResumeDecision:
    """Apply the resume rules (module docstring).

    :raises ResumeRefused: ``save`` holds checkpoints of a different run and ``load`` is not set.
    :raises FileNotFoundError: ``load`` holds no checkpoint and ``exit_on_missing_checkpoint`` is set,
        or ``ckpt_step`` names an iteration that is not there.
    """
    from nvlcore.checkpoint import (
        CheckpointNotFoundError,
        iter_dir_name,
        list_iterations,
        open_checkpoint,
        resolve_checkpoint_dir,
    )
    from nvlcore.checkpoint.layout import is_iteration_dir

    def pick(path: str) -> Path | None:
        p = Path(path).expanduser()
        if ckpt_step is not None and not is_iteration_dir(p):
            target = p / iter_dir_name(ckpt_step)
            if not target.is_dir():
                raise FileNotFoundError(
                    f"checkpoint.ckpt_step={ckpt_step}: {target} does not exist "
                    f"(iterations there: {list_iterations(p) or 'none'})"
                )
            return target
        try:
            return resolve_checkpoint_dir(p)
        except CheckpointNotFoundError:
            return None

    if load:
        found = pick(load)
        if found is None:
            if exit_on_missing_checkpoint:
                raise FileNotFoundError(
                    f"checkpoint.load={load}: no checkpoint there and checkpoint.exit_on_missing_checkpoint is set"
                )
            return ResumeDecision(None, f"checkpoint.load={load} holds no checkpoint yet; starting from iteration 0")
        ckpt = open_checkpoint(found)
        if not (found / "train_state.pt").is_file() or ckpt.extra_state() is None:
            raise ValueError(
                f"checkpoint.load={load}: {found} holds weights only (an import?), not a training state to resume; "
                f"pass it as --pretrained-checkpoint {found} instead"
            )
        diffs = run_config_differences(ckpt.run_config() or {}, run_config)
        note = f" (run config differs in: {', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''})" if diffs else ""
        return ResumeDecision(found, f"resuming {found} (checkpoint.load){note}")
    if save and Path(save).expanduser().is_dir() and list_iterations(Path(save).expanduser()):
        found = pick(save)
        if found is None:
            return ResumeDecision(None, "starting from iteration 0")
        saved_cfg = open_checkpoint(found).run_config() or {}
        diffs = run_config_differences(saved_cfg, run_config)
        if diffs:
            shown = ", ".join(f"{k} ({_flatten(saved_cfg).get(k)!r} -> {_flatten(dict(run_config)).get(k)!r})"
                              for k in diffs[:6])
            raise ResumeRefused(
                f"checkpoint.save={save} already holds checkpoints of a different run (latest {found.name}; "
                f"differs in {shown}{' ...' if len(diffs) > 6 else ''}). Choose a new checkpoint.save directory, "
                f"or resume that run on purpose with checkpoint.load={save}"
            )
        return ResumeDecision(found, f"resuming {found}: checkpoint.save holds this same run (identical run config)")
    return ResumeDecision(None, "starting from iteration 0")


# -- state dicts ---------------------------------------------------------------------------------
TensorMap = Callable[[str, "torch.Tensor", "torch.nn.Parameter"], dict[str, Any]]


def generic_param_entries(ctx: ParallelContext) -> TensorMap:
    """One logical tensor per parameter: TP shards as DTensor ``Shard(partition_dim)``, the rest whole."""

    def entries(name: str, tensor: torch.Tensor, param: torch.nn.Parameter) -> dict[str, Any]:
        from nvlcore.checkpoint import shard_tensor

        if ctx.tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            return {name: shard_tensor(tensor, int(getattr(param, "partition_dim", 0)), ctx.tp_group)}
        return {name: tensor}

    return entries


def _entries_fn(bridge: Any, ctx: ParallelContext) -> TensorMap:
    """The bridge's component layout (``bridge.checkpoint_entries``) for the parameters in its mapping
    table, else (adapters, or no bridge) the generic one."""
    generic = generic_param_entries(ctx)
    if bridge is None:
        return generic

    def entries(name: str, tensor: torch.Tensor, param: torch.nn.Parameter) -> dict[str, Any]:
        got = bridge.checkpoint_entries(name, tensor, tp_group=ctx.tp_group, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
        return generic(name, tensor, param) if got is None else got

    return entries


def _assemble(bridge: Any, name: str, loaded: Mapping[str, Any], target: torch.Tensor, ctx: ParallelContext) -> None:
    """Write the loaded entries of one parameter back into ``target`` (in place)."""
    import torch
    from torch.distributed.tensor import DTensor

    local = {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in loaded.items()}
    if bridge is not None and bridge.assemble_from_entries(name, local, target, tp_rank=ctx.tp_rank,
                                                           tp_size=ctx.tp_size):
        return
    (value,) = local.values()
    if value.data_ptr() != target.data_ptr():
        with torch.no_grad():
            target.copy_(value)


def saved_parameters(model: torch.nn.Module, *, adapter_only: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """All parameters, or (PEFT) only the trainable ones."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad or not adapter_only]


def model_and_optimizer_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    bridge: Any,
    ctx: ParallelContext,
    adapter_only: bool,
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``(model_state, optimizer_state, adam_step)`` ready for :func:`nvlcore.checkpoint.save_checkpoint`.

    With a sharded optimizer state only the parameters this rank owns contribute optimizer entries,
    and the step count is agreed over all ranks (collective).
    """
    from nvlcore.training import optim

    entries = _entries_fn(bridge, ctx)
    model_state: dict[str, Any] = {}
    optim_state: dict[str, Any] = {}
    steps: set[float] = set()
    names = optim.state_names(optimizer)
    local = optim.local_optimizer(optimizer)
    for name, p in saved_parameters(model, adapter_only=adapter_only):
        model_state.update(entries(name, p.detach(), p))
        st = local.state.get(p)
        if st and names and all(m in st for m in names):
            for moment in names:
                for suffix, value in optim.moment_entries(st[moment]).items():
                    for k, v in entries(name, value, p).items():
                        optim_state[f"{k}.{moment}{suffix}"] = v
            if "step" in st:
                steps.add(float(st["step"]))
    if len(steps) > 1:
        raise RuntimeError(f"Adam step counts differ between parameters ({sorted(steps)}); cannot save one count")
    step = int(steps.pop()) if steps else 0
    if optim.is_sharded(optimizer) and ctx.world_size > 1:
        import torch
        import torch.distributed as dist

        t = torch.tensor([step], dtype=torch.int64, device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a rank may own no parameter yet hold the count
        step = int(t.item())
    return model_state, optim_state, step


def load_model_weights(
    model: torch.nn.Module,
    iter_dir: Path,
    *,
    bridge: Any,
    ctx: ParallelContext,
    only_trainable: bool = False,
    strict: bool = True,
) -> list[str]:
    """Load weights saved by :func:`model_and_optimizer_state` (any TP size) into ``model`` in place.

    :returns: parameter names that were not in the checkpoint (an error when ``strict``).
    """
    from nvlcore.checkpoint import open_checkpoint

    ckpt = open_checkpoint(iter_dir)
    entries = _entries_fn(bridge, ctx)
    have = set(ckpt.keys())
    template: dict[str, Any] = {}
    owners: dict[str, tuple[str, Any, list[str]]] = {}
    missing: list[str] = []
    for name, p in model.named_parameters():
        if only_trainable and not p.requires_grad:
            continue
        ent = entries(name, p.data, p)
        if not set(ent) <= have:
            missing.append(name)
            continue
        template.update(ent)
        owners[name] = (name, p, list(ent))
    if missing and strict:
        raise KeyError(
            f"{iter_dir}: {len(missing)} parameter(s) of the model are not in the checkpoint, e.g. {missing[:5]}"
        )
    loaded = ckpt.load(template, group=None)
    for name, p, keys in owners.values():
        _assemble(bridge, name, {k: loaded[k] for k in keys}, p.data, ctx)
    return missing


#: Key suffix of an 8-bit moment's block scales (nvlcore.training.lean_adam.BLOCK_SCALE, without importing torchao).
_BLOCK_SCALE = ".block_scale"
#: The host fp32 master of a bf16 trainable weight (optimizer.main_grads_dtype=torch.bfloat16), beside its moments.
_MAIN_PARAM = "main_param"


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    iter_dir: Path,
    *,
    adam_step: int,
    bridge: Any,
    ctx: ParallelContext,
) -> None:
    """Restore the optimizer state (Adam's moments and step count, or SGD's momentum), resharded like
    the weights, into ``optimizer``; with a sharded optimizer state each rank reads only the state of
    the parameters it owns."""
    import torch

    from nvlcore.checkpoint import open_checkpoint
    from nvlcore.training import optim

    ckpt = open_checkpoint(iter_dir)
    entries = _entries_fn(bridge, ctx)
    names = optim.state_names(optimizer)
    have = set(ckpt.keys("optimizer"))
    template: dict[str, Any] = {}
    per_param: list[tuple[str, torch.nn.Parameter, dict[str, list[str]], dict[str, torch.Tensor]]] = []
    # the masters a checkpoint without them (an fp32-weight run's) still has, as its saved weights
    from_weights: list[tuple[str, torch.nn.Parameter, list[str], torch.Tensor]] = []
    weights_template: dict[str, Any] = {}
    for name, p in named_params:
        if not names or not optim.owns_parameter(optimizer, p):
            continue
        # fp32 like the saved state, also for a bf16 parameter (its moments and master stay fp32); a checkpoint
        # of an fp32 run has no masters: its saved fp32 weight is the master (read below)
        bufs = {m: torch.zeros_like(p.data, dtype=torch.float32) for m in names
                if m != _MAIN_PARAM or all(f"{k}.{m}" in have for k in entries(name, p.data, p))}
        if _MAIN_PARAM in names and _MAIN_PARAM not in bufs:
            master = torch.zeros_like(p.data, dtype=torch.float32)
            ent = entries(name, master, p)
            from_weights.append((name, p, list(ent), master))
            weights_template.update(ent)
        # an 8-bit moment's block scales, where the checkpoint has them (an 8-bit run wrote it): exact resume
        bufs |= {f"{m}{_BLOCK_SCALE}": torch.zeros_like(p.data, dtype=torch.float32)
                 for m in optim.quantized_moments(optimizer, p)
                 if all(f"{k}.{m}{_BLOCK_SCALE}" in have for k in entries(name, p.data, p))}
        keys: dict[str, list[str]] = {}
        for m, buf in bufs.items():
            ent = entries(name, buf, p)
            keys[m] = [f"{k}.{m}" for k in ent]
            template.update({f"{k}.{m}": v for k, v in ent.items()})
        per_param.append((name, p, keys, bufs))
    if not template:
        return
    absent = [k for k in template if k not in have]
    if absent:
        raise KeyError(
            f"{iter_dir}: optimizer state for {len(absent)} tensor(s) is missing, e.g. {absent[:3]}; the trainable "
            "parameters differ from the saved run (freeze/PEFT settings?). Set checkpoint.load_optim=false to "
            "resume with a fresh optimizer"
        )
    loaded = ckpt.load(template, state="optimizer")
    masters: dict[int, torch.Tensor] = {}
    if from_weights:  # read as fp32: an fp32 run's weight is exactly the master it stepped
        weights = ckpt.load(weights_template)
        for name, p, keys_w, master in from_weights:
            _assemble(bridge, name, {k: weights[k] for k in keys_w}, master, ctx)
            masters[id(p)] = master
    # the optimizer holding this rank's state: the wrapped one of a sharded (ZeRO) optimizer, whose
    # param_groups list only the parameters this rank owns; load_state_dict places each value as the
    # optimizer kind wants it (a fused Adam's step on the GPU, say)
    target = optim.local_optimizer(optimizer)
    adam = "exp_avg" in names
    sd = target.state_dict()
    index = {id(p): i for i, p in enumerate(pp for g in target.param_groups for pp in g["params"])}
    state: dict[int, Any] = {}
    scales: dict[Any, dict[str, torch.Tensor]] = {}
    for name, p, keys, bufs in per_param:
        for m, buf in bufs.items():
            _assemble(bridge, name, {k[: -len(m) - 1]: loaded[k] for k in keys[m]}, buf, ctx)
        scales[p] = {m[: -len(_BLOCK_SCALE)]: b for m, b in bufs.items() if m.endswith(_BLOCK_SCALE)}
        moments = {m: b for m, b in bufs.items() if not m.endswith(_BLOCK_SCALE)}
        if id(p) in masters:
            moments[_MAIN_PARAM] = masters[id(p)]
        state[index[id(p)]] = ({"step": torch.tensor(float(adam_step), dtype=torch.float32)} if adam else {}) | moments
    sd["state"] = state
    target.load_state_dict(sd)
    optim.adopt_loaded_moments(target, scales)


def estimate_checkpoint_bytes(model: torch.nn.Module, ctx: ParallelContext, *, adapter_only: bool,
                              save_optim: bool) -> int:
    """About how many bytes one training checkpoint takes: the saved weights plus (``save_optim``) Adam's two
    fp32 moments per trainable value (and the fp32 master of a bf16 one), summed over the tensor-parallel
    shards (replicated tensors are counted once per TP rank: an upper bound). The same figure on every rank."""
    import torch
    import torch.distributed as dist

    total = 0
    for _, p in saved_parameters(model, adapter_only=adapter_only):
        total += p.numel() * p.element_size()
        if save_optim and p.requires_grad:
            # a bf16 trainable weight (optimizer.main_grads_dtype=torch.bfloat16) saves its fp32 master too
            total += (2 if p.dtype == torch.float32 else 3) * p.numel() * 4
    t = torch.tensor([float(total)], dtype=torch.float64, device=ctx.device)
    if ctx.tp_size > 1 and dist.is_initialized():
        dist.all_reduce(t, group=ctx.tp_group)
    return int(t.item())


def check_checkpoint_space(cfg: Any, need: int, ctx: ParallelContext, *, start_iteration: int,
                           say: Any = print) -> None:
    """Refuse to train when the file system of ``checkpoint.save`` cannot hold one checkpoint; warn when it
    cannot hold all that the run keeps (``checkpoint.save_interval``, ``most_recent_k``).

    The free space is the smallest any rank sees, so every rank decides the same.
    :raises ValueError: one line naming the directory, the device, the size needed and the space free.
    """
    import math

    import torch
    import torch.distributed as dist

    from nvlcore.checkpoint.save import free_bytes, human_bytes, mount_point

    save = cfg.checkpoint.save
    if not save or need <= 0:
        return
    t = torch.tensor([float(free_bytes(save))], dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1 and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    free = int(t.item())
    gb = human_bytes
    device = mount_point(save)
    if free < need:
        raise ValueError(
            f"checkpoint.save={save}: one checkpoint needs about {gb(need)} but {device} has {gb(free)} free; "
            "free some space, save elsewhere, or save less (checkpoint.save_optim=false, PEFT)"
        )
    remaining = max(cfg.train.train_iters - start_iteration, 0)
    interval = cfg.checkpoint.save_interval
    saves = max(math.ceil(remaining / interval) if interval else 1, 1)  # the last one included
    k = cfg.checkpoint.most_recent_k
    kept = min(saves, k + 1) if k and k > 0 else saves  # a new save lands before the oldest goes
    if free < kept * need:
        say(f"nvl finetune: WARNING: {device} has {gb(free)} free; this run keeps up to {kept} checkpoints of about "
            f"{gb(need)} (checkpoint.save_interval={interval}, checkpoint.most_recent_k={k}): saves will fail "
            "once the disk is full; raise save_interval or set checkpoint.most_recent_k")
