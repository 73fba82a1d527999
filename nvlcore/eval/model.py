"""Loading the model ``nvl eval`` answers with: an HF directory, a Megatron-style checkpoint, and
optionally a PEFT run's adapters (added and merged in memory, as merging them into the weights would)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from nvlcore.eval.runner import EvalError


def adapter_run(adapter_checkpoint: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(iter_dir, run_config)`` of an adapter-only checkpoint written by ``nvl finetune`` with ``peft.method`` set.

    :raises EvalError: naming the file when it is not one.
    """
    from nvlcore.checkpoint import open_checkpoint

    try:
        ck = open_checkpoint(adapter_checkpoint)
    except Exception as exc:
        raise EvalError(f"--adapter-checkpoint {adapter_checkpoint}: {exc}") from exc
    rc = ck.run_config()
    if rc is None:
        raise EvalError(f"--adapter-checkpoint: {ck.path}/run_config.yaml is missing (is this a `nvl finetune` checkpoint?)")
    extra = ck.extra_state() or {}
    method = (rc.get("peft") or {}).get("method")
    if not method or not extra.get("adapter_only", True):
        raise EvalError(
            f"--adapter-checkpoint: {ck.path}/run_config.yaml has no peft.method, so it holds full weights; "
            "pass it as --megatron-model-path instead"
        )
    return Path(ck.path), rc


def adapter_transform(adapter_checkpoint: str | Path, *, bridge: Any, manager: Any) -> tuple[Callable[[Any], None], dict[str, Any]]:
    """A function that adds the run's adapters to a loaded base model, loads the checkpoint's
    trained tensors (adapters, and what the run trained fully) and merges the adapters; and the
    run's config."""
    iter_dir, rc = adapter_run(adapter_checkpoint)

    def transform(model: Any) -> None:
        from nvlcore.config import load_config
        from nvlcore.parallel import ParallelContext
        from nvlcore.training import checkpointing as tck
        from nvlcore.training.finetune import apply_freeze_flags, apply_peft

        try:
            cfg = load_config([], [], base=rc, plugins=manager)
        except Exception as exc:
            raise EvalError(f"--adapter-checkpoint: {iter_dir}/run_config.yaml: {exc}") from exc
        apply_freeze_flags(model, cfg, bridge)
        method = apply_peft(model, cfg, manager, bridge)
        import torch.distributed as dist
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        ctx = ParallelContext(
            rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=0, tp_size=tp,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(), dp_rank=parallel_state.get_data_parallel_rank(),
            device=next(model.parameters()).device, backend=dist.get_backend(),
        )
        try:
            tck.load_model_weights(model, iter_dir, bridge=bridge, ctx=ctx, only_trainable=True)
        except KeyError as exc:
            raise EvalError(f"--adapter-checkpoint {iter_dir}: {exc.args[0] if exc.args else exc}") from exc
        method.merge(model)
        for p in model.parameters():
            p.requires_grad_(False)

    return transform, rc


def recorded_base(rc: dict[str, Any]) -> Path | None:
    """The PEFT run's starting checkpoint when it is a Megatron-style checkpoint that still exists."""
    src = (rc.get("checkpoint") or {}).get("pretrained_checkpoint")
    if not src:
        return None
    p = Path(src).expanduser()
    if not p.exists() or (p / "config.json").is_file():
        return None  # gone, or an HF directory (its weights are the --hf-model-path ones)
    return p


def load_eval_generator(
    *,
    hf_model_path: Path,
    megatron_model_path: Path | None,
    adapter_checkpoint: Path | None,
    tensor_parallel_size: int,
    device: Any,
    dtype: Any,
    manager: Any,
    bridge_name: str | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> Any:
    """The bridge's generator for these weights (see ``nvl eval --help``)."""
    from nvlcore.cli.generate import resolve_bridge

    bridge = resolve_bridge(hf_model_path, bridge_name, manager)
    options: dict[str, Any] = dict(megatron_model_path=megatron_model_path, tensor_parallel_size=tensor_parallel_size,
                                   device=device, dtype=dtype)
    if adapter_checkpoint is not None:
        transform, rc = adapter_transform(adapter_checkpoint, bridge=bridge, manager=manager)
        options["model_transform"] = transform
        if megatron_model_path is None:
            base = recorded_base(rc)
            if base is not None:
                options["megatron_model_path"] = base
        say(f"nvl eval: base weights from {options['megatron_model_path'] or hf_model_path}, "
            f"adapters from {adapter_checkpoint} (merged in memory)")
    return bridge.generator(**options)
