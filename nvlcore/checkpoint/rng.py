"""RNG states in a form that reloads with ``torch.load(weights_only=True)``.

numpy's state holds an ndarray (refused by ``weights_only``); it is stored as a tensor and rebuilt.
"""

from __future__ import annotations

import random
from typing import Any


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, numpy, torch (CPU and CUDA) and Megatron tensor-parallel RNG states."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_tracker()
    if tracker is not None:
        states = tracker.get_states()
        if states:
            state["megatron_tracker"] = dict(states)
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (missing parts are left alone)."""
    import torch

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        tracker = _megatron_tracker()
        if tracker is not None:
            tracker.set_states(state["megatron_tracker"])


def _megatron_tracker() -> Any:
    try:
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker()
    except Exception:  # megatron-core absent or not set up: nothing to capture
        return None
