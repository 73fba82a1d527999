"""The training model (Megatron-style names, tensor-parallel over megatron.core process groups).

Files: ``parallel.py`` (TP linears, norms; the process groups are the core's ``nvlcore.parallel``),
``ssd.py`` (the SSD scan), ``kernels.py`` (the ops' implementations, chosen per model), ``mamba.py``,
``attention.py``, ``mlp.py``, ``lm.py`` (Nemotron-H), ``cache.py`` + ``step_ops.py`` + ``decode.py``
(generation: every layer trains and decodes), ``vit.py`` (RADIO), ``projector.py`` (pixel shuffle +
MLP), ``evs.py``, ``vlm.py`` (the whole model), ``init.py``.
Importing this package imports torch and megatron.core.
"""

from __future__ import annotations

import torch

from nvlcore.megatron_import import import_megatron_core

import_megatron_core()  # before .init / .vlm import megatron.core: skips its import-time torch.compile work

from nvlcore.parallel import TPContext  # noqa: E402

from ..config import NemotronVLConfig  # noqa: E402
from .init import init_parameters  # noqa: E402
from .vlm import NemotronVLModel  # noqa: E402

__all__ = ["NemotronVLModel", "build_model", "init_parameters"]


def build_model(
    cfg: NemotronVLConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    tp: TPContext | None = None,
    init: str = "random",
    seed: int = 1234,
    **options,
) -> NemotronVLModel:
    """Build the model over ``tp`` (default: the current tensor-parallel group; a one-rank group is set up
    through :func:`nvlcore.parallel.init_parallel` when none exists).

    ``init="random"`` fills parameters (see :mod:`.init`); ``"none"`` leaves them for a checkpoint load.
    ``options``: ``pos_embed_mode``, ``pos_embed_align_corners``, ``freeze_language_model``,
    ``freeze_vision_model``, ``freeze_vision_projection``.
    """
    if tp is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            from nvlcore.parallel import init_parallel

            init_parallel(1, device_type=None if device is None else torch.device(device).type)
        tp = TPContext.current()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = NemotronVLModel(cfg, tp, dtype=dtype, device=device, **options)
    if init == "random":
        init_parameters(model, cfg, seed=seed, tp_rank=tp.rank)
    elif init != "none":
        raise ValueError(f"init must be 'random' or 'none', got {init!r}")
    return model
