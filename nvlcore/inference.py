"""Building a model for inference: the one path ``nvl generate``, ``nvl eval``, the quickstart and the
Python API take, for every model bridge.

bridge -> process groups for ``tensor_parallel_size`` -> :meth:`~nvlcore.bridge.ModelBridge.build_model`
-> weights (the HF directory's, or an nvl checkpoint's) -> a PEFT run's adapters and trained tensors
(unmerged, or merged in memory) -> eval mode -> :meth:`~nvlcore.bridge.ModelBridge.generator_for_model`,
which wraps the model with its processor and decoder.

::

    from nvlcore.bridge import resolve_bridge
    from nvlcore.inference import load_generator

    gen = load_generator(resolve_bridge("/models/my-model"), adapter_checkpoint="runs/peft")

Importing this module is cheap; torch is imported inside the functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

    from nvlcore.generation import Generator
    from nvlcore.parallel import ParallelContext


@attrs.frozen
class InferenceModel:
    """A model built and loaded for inference (:func:`load_model`).

    :param model: the bridge's model, in eval mode, no parameter requiring gradients.
    :param bridge: the model bridge that built it.
    :param ctx: the process groups it is built over.
    :param device: where it computes.
    :param dtype: its weights' dtype.
    :param peft: the PEFT method applied from ``adapter_checkpoint`` (None without one).
    """

    model: Any
    bridge: Any
    ctx: ParallelContext
    device: torch.device
    dtype: torch.dtype
    peft: Any = None


def default_device_and_dtype(device: Any = None, dtype: Any = None) -> tuple[torch.device, torch.dtype]:
    """``device`` (default: this rank's GPU when one is visible, else the CPU) and ``dtype`` (default:
    bf16 on a GPU, fp32 on the CPU)."""
    import torch

    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def init_inference_parallel(tensor_parallel_size: int, device: torch.device) -> ParallelContext:
    """The process groups for ``tensor_parallel_size`` ranks (:func:`nvlcore.parallel.init_parallel`).

    TP=1 needs nothing from the caller. TP>1 needs one process per rank started by ``torchrun``, or
    groups the caller already set up at that size; anything else is refused with that instruction.
    """
    import torch.distributed as dist

    from nvlcore.parallel import init_parallel

    tp = int(tensor_parallel_size)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if tp > 1 and world % tp:
        raise ValueError(
            f"--tp {tp} needs {tp} processes, one per rank (this run has {world}); launch with "
            f"`torchrun --nproc-per-node {tp} $(which nvl) generate --tp {tp} ...` (nvl eval: --nproc-per-node {tp})"
        )
    try:
        return init_parallel(tp, device_type=device.type)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot set up tensor parallelism {tp}: {exc}") from exc


def load_model(
    bridge: Any,
    *,
    megatron_model_path: str | os.PathLike[str] | None = None,
    adapter_checkpoint: str | os.PathLike[str] | None = None,
    merge_adapters: bool = False,
    tensor_parallel_size: int = 1,
    device: Any = None,
    dtype: Any = None,
    manager: Any = None,
    say: Callable[[str], None] | None = None,
) -> InferenceModel:
    """Build ``bridge``'s model over ``tensor_parallel_size`` ranks and load it for inference.

    :param bridge: a :class:`~nvlcore.bridge.ModelBridge` made from an HF directory (config, tokenizer,
        and the weights unless another source is given).
    :param megatron_model_path: an nvl checkpoint (base dir: its latest iteration; or ``iter_N``)
        whose weights to use instead of the HF directory's.
    :param adapter_checkpoint: a PEFT run's checkpoint: its method is applied as the run applied it and
        the tensors it trained are loaded (:func:`nvlcore.training.peft.apply_peft_run`). The base
        weights are ``megatron_model_path`` if given, else the run's recorded
        ``checkpoint.pretrained_checkpoint`` if it is an nvl checkpoint that exists, else the HF weights.
    :param merge_adapters: fold the adapters into the weights in memory (faster decoding, the merged
        export's numbers); otherwise they run unmerged.
    :param device: default: this rank's GPU when one is visible, else the CPU.
    :param dtype: weights dtype; default bf16 on GPU, fp32 on CPU.
    :param manager: the plugin manager whose ``peft_method`` registry applies the run (default: the process's).
    :param say: one-line progress notes (default: silent).
    :raises ValueError: (or ``FileNotFoundError``) naming the option and file at fault.
    """
    from nvlcore.training.peft import apply_peft_run, open_peft_run

    if bridge.hf_dir is None:
        raise ValueError("an inference model needs a bridge made from an HF directory (it reads the tokenizer)")
    device, dtype = default_device_and_dtype(device, dtype)
    if manager is None:
        from nvlcore.plugins import get_plugin_manager

        manager = get_plugin_manager()
    ctx = init_inference_parallel(tensor_parallel_size, device)
    run = None if adapter_checkpoint is None else open_peft_run(adapter_checkpoint)
    if run is not None and megatron_model_path is None:
        megatron_model_path = run.recorded_base()
        if megatron_model_path is not None and say is not None:
            say(f"base weights: {megatron_model_path} (the PEFT run's checkpoint.pretrained_checkpoint)")
    model = bridge.build_model(dtype=dtype, device=device, init="none")
    if megatron_model_path is None:
        bridge.load_hf_weights(model, bridge.hf_dir)
    else:
        _load_checkpoint_weights(bridge, model, megatron_model_path, peft_run_given=run is not None)
    peft = None
    if run is not None:
        peft = apply_peft_run(model, run, bridge=bridge, manager=manager, ctx=ctx, merge=merge_adapters)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return InferenceModel(model=model, bridge=bridge, ctx=ctx, device=device, dtype=dtype, peft=peft)


def _load_checkpoint_weights(bridge: Any, model: Any, path: str | os.PathLike[str], *, peft_run_given: bool) -> None:
    """Fill ``model`` from an nvl checkpoint at any TP size; a PEFT run's checkpoint is refused with
    what to type instead."""
    from nvlcore.checkpoint import resolve_checkpoint_dir
    from nvlcore.training.peft import refuse_peft_run_as_weights

    if not peft_run_given:
        refuse_peft_run_as_weights(path)
    try:
        iter_dir = resolve_checkpoint_dir(path)
    except Exception as exc:  # the checkpoint layer's errors say what is missing where
        raise FileNotFoundError(f"--megatron-model-path {path}: {exc}") from exc
    bridge.load_checkpoint_weights(model, iter_dir)


def load_generator(bridge: Any, *, generator_options: Mapping[str, Any] | None = None,
                   **model_options: Any) -> Generator:
    """A :class:`~nvlcore.generation.Generator` over :func:`load_model`'s model.

    :param generator_options: the bridge's own generation options, passed to
        :meth:`~nvlcore.bridge.ModelBridge.generator_for_model` (``nvl generate``'s model-specific
        options arrive here from the model plugin's command options).
    :param model_options: :func:`load_model`'s keyword arguments.
    """
    loaded = load_model(bridge, **model_options)
    return bridge.generator_for_model(loaded.model, device=loaded.device, dtype=loaded.dtype,
                                      **dict(generator_options or {}))

