"""An out-of-memory that still happens, reported in one line: that it is one, the phase it happened in
(vision tower, language model, backward, optimizer step...), and the options that would make the run fit.

The phase is tracked cheaply: the trainer names its phases with :func:`set_phase`, and a forward
pre-hook on each of the bridge's towers (:meth:`ModelBridge.memory_phases`) names the tower a forward is
in. PyTorch raises ``torch.OutOfMemoryError``; a collective that cannot allocate raises NCCL's
``DistBackendError`` ("Failed to CUDA calloc async 4 bytes"), which :func:`is_out_of_memory` recognises
so it is not reported as a communication failure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_PHASE = ["setup"]
#: messages of allocation failures that reach Python as other errors (NCCL, cuBLAS, the CUDA runtime)
_ALLOC_FAILURE = re.compile(r"out of memory|CUDA calloc|cudaMalloc\w* failed|CUBLAS_STATUS_ALLOC_FAILED|"
                            r"cudaErrorMemoryAllocation", re.IGNORECASE)


def set_phase(name: str) -> None:
    """Name what this process does now (the report says it)."""
    _PHASE[0] = name


def current_phase() -> str:
    return _PHASE[0]


def install_phase_hooks(model: torch.nn.Module, phases: Mapping[str, str]) -> list[Any]:
    """A forward pre-hook on each module ``phases`` names (prefix -> phase); returns the hook handles."""
    handles = []
    modules = dict(model.named_modules())
    for prefix, name in phases.items():
        module = modules.get(prefix)
        if module is not None:
            handles.append(module.register_forward_pre_hook(lambda *_a, _n=name: set_phase(f"forward, {_n}")))
    return handles


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU allocation failure, whatever raised it (``torch.OutOfMemoryError``, NCCL, cuBLAS)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_ALLOC_FAILURE.search(str(exc)))


#: PyTorch's own account in its out-of-memory message: what its allocator held when the allocation failed
_TORCH_HELD = re.compile(r"Tried to allocate ([0-9.]+ [GMK]iB).*?([0-9.]+ [GMK]iB) is allocated by PyTorch, and "
                         r"([0-9.]+ [GMK]iB) is reserved by PyTorch but unallocated", re.DOTALL)


def describe(exc: BaseException, *, hint: str = "") -> str:
    """The one line: out of memory, in which phase, the original error's gist (with what PyTorch's allocator
    held, which the message's first 160 characters cut off), and what would fit."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    gist = re.sub(r"\s+", " ", first)[:160]
    held = _TORCH_HELD.search(text)
    if held:
        gist = (f"tried to allocate {held.group(1)} with {held.group(2)} allocated and {held.group(3)} reserved "
                "but unallocated by PyTorch")
    return (f"out of GPU memory during {current_phase()} ({type(exc).__name__}: {gist})"
            + (f"; {hint}" if hint else "; lower train.micro_batch_size or set model.recompute_granularity"))


def budget_note(cfg: Any) -> str:
    """With ``train.memory_budget_gb`` the out-of-memory may be the budget's, not the card's: say so, since the
    caching allocator was capped at it (:func:`nvlcore.training.memory.hold_to_budget`). Empty without one."""
    budget = cfg.train.memory_budget_gb
    if budget is None:
        return ""
    from nvlcore.training.memory import GB, allocator_cap_bytes

    return (f"train.memory_budget_gb={budget:g} held PyTorch's allocator to ~{allocator_cap_bytes(budget) / GB:.1f} GB "
            "(raise it if the card has room)")


def fitting_options(cfg: Any, *, world_size: int = 1, limit: int = 3) -> str:
    """The memory plan's cheapest options that lower this config's estimate, as a hint for the report
    (resolves the bridge again; empty when the plan cannot be made)."""
    try:
        import attrs

        from nvlcore.bridge import resolve_bridge
        from nvlcore.training.memory import GB, PlanInputs, estimate, options_for

        bridge = resolve_bridge(cfg.model.hf_model_path, cfg.model.bridge)
        inputs = PlanInputs.from_config(cfg, world_size=world_size)
        now = estimate(bridge, inputs).card
        lower = [(o, estimate(bridge, attrs.evolve(inputs, **o.changes)).card)
                 for o in options_for(cfg, inputs, bridge)]
        lower = [(o, c) for o, c in lower if c < now][:limit]
    except Exception:  # the report must come out even when the plan cannot be made
        return ""
    if not lower:
        return ""
    return ("options that lower it (memory plan, ~GB per GPU): "
            + "; ".join(f"{' '.join(o.overrides)} (~{c / GB:.0f})" for o, c in lower)
            + f" (this run ~{now / GB:.0f})")
