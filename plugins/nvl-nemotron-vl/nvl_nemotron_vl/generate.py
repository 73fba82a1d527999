"""Generation with Nemotron Nano V2 VL: a ready :class:`nvlcore.generation.Generator` from a bridge's HF
directory (optionally with the weights of a Megatron-style checkpoint).

::

    from nvl_nemotron_vl import load_generator
    from nvlcore.generation import build_conversation

    gen = load_generator("/models/nano-vl")                       # or megatron_model_path="ckpts/run1"
    [res] = gen.generate([build_conversation("Describe this image.", images=["cat.png"],
                                             system_prompt="/no_think")], max_new_tokens=100)
    print(res.text, res.decode_tokens_per_s)

``nvl generate`` calls :func:`build_generator` through :meth:`NemotronVLBridge.generator`. This module
takes the bridge it works with and never imports :mod:`.bridge` (which imports this one). The model
decodes with its layers' caches (:mod:`.model.cache`, driven by :mod:`.model.decode`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch

    from nvlcore.generation import Generator


def _groups_ready(tensor_parallel_size: int) -> bool:
    """The caller already set up TP x DP groups of this TP size (``nvl eval --tp N --nproc-per-node M``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    return (dist.is_initialized() and parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel_size)


def init_tensor_parallel(tensor_parallel_size: int, device: "torch.device") -> None:
    """Set up the process groups for ``tensor_parallel_size`` ranks (the core's
    :func:`nvlcore.parallel.init_parallel`).

    TP=1 needs nothing from the caller. TP>1 needs one process per rank started by ``torchrun``
    (``torchrun --nproc-per-node N $(which nvl) generate --tp N ...``); anything else is refused with
    that instruction.
    """
    import torch.distributed as dist

    from nvlcore.parallel import init_parallel

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel_size > 1 and world != tensor_parallel_size and not _groups_ready(tensor_parallel_size):
        raise ValueError(
            f"--tp {tensor_parallel_size} needs {tensor_parallel_size} processes, one per rank (this run has "
            f"{world}); launch with `torchrun --nproc-per-node {tensor_parallel_size} $(which nvl) generate "
            f"--tp {tensor_parallel_size} ...`"
        )
    try:
        init_parallel(tensor_parallel_size, device_type=device.type)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot set up tensor parallelism {tensor_parallel_size}: {exc}") from exc


def build_generator(
    bridge: Any,
    *,
    megatron_model_path: str | os.PathLike[str] | None = None,
    tensor_parallel_size: int = 1,
    device: "torch.device | str | None" = None,
    dtype: "torch.dtype | None" = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    processor_options: Mapping[str, Any] | None = None,
    adapter_checkpoint: str | os.PathLike[str] | None = None,
    video_pruning_rate: float | None = None,
    plugin_manager: Any = None,
    say: Any = None,
    model_transform: "Callable[[torch.nn.Module], Any] | None" = None,
    lora_checkpoint: str | os.PathLike[str] | None = None,
) -> "Generator":
    """Load the model and processor of ``bridge``'s HF directory and wrap them for generation.

    :param bridge: a :class:`~nvl_nemotron_vl.bridge.NemotronVLBridge` made with ``from_hf_dir`` (config,
        tokenizer; weights unless a Megatron path is given).
    :param megatron_model_path: a checkpoint (base or ``iter_N`` dir) whose weights to use instead.
    :param tensor_parallel_size: TP ranks (see :func:`init_tensor_parallel`).
    :param device: default ``cuda`` (this rank's GPU) when available, else ``cpu``.
    :param dtype: weights dtype; default bf16 on GPU, fp32 on CPU.
    :param cuda_graph: replay the decode step as a CUDA graph (default: on for CUDA).
    :param compile: ``torch.compile`` the decode step as well.
    :param processor_options: overrides of the processor's options (e.g. ``max_num_tiles``,
        ``video_num_frames``, ``video_fps``).
    :param adapter_checkpoint: a PEFT run's checkpoint (``nvl finetune --lora-on-*``): its PEFT method
        (from its ``run_config.yaml``, through the ``peft_method`` registry) is applied to the model and
        its adapters and fully trained tensors are loaded, unmerged (see :func:`apply_peft_checkpoint`).
        The base weights are ``megatron_model_path`` if given, else the run's recorded
        ``checkpoint.pretrained_checkpoint`` if it exists, else the HF directory's.
    :param video_pruning_rate: EVS pruning rate for videos (``None``: the config's
        ``video_pruning_rate``; 0 turns EVS off).
    :param plugin_manager: the plugin manager whose ``peft_method`` registry applies ``adapter_checkpoint``.
    :param say: callable for one-line progress notes (default: silent).
    :param model_transform: called with the loaded model before it is wrapped for decoding
        (``nvl eval --adapter-checkpoint`` adds and merges a PEFT run's adapters there).
    :param lora_checkpoint: the former name of ``adapter_checkpoint`` (accepted; give one of them).
    """
    import torch

    from nvlcore.bridge import is_hf_dir

    if bridge.hf_dir is None:
        raise ValueError("a generator needs a bridge made with from_hf_dir (it reads the tokenizer)")
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_tensor_parallel(tensor_parallel_size, device)

    run = None
    if lora_checkpoint is not None:
        if adapter_checkpoint is not None:
            raise TypeError("load_generator: give adapter_checkpoint or its former name lora_checkpoint, not both")
        adapter_checkpoint = lora_checkpoint
    if adapter_checkpoint is not None:
        run = _open_peft_run(adapter_checkpoint)
        if megatron_model_path is None:
            recorded = (run.run_config().get("checkpoint") or {}).get("pretrained_checkpoint")
            if recorded and Path(recorded).exists() and not is_hf_dir(Path(recorded)):
                megatron_model_path = recorded
                (say or (lambda s: None))(f"base weights: {recorded} (the PEFT run's checkpoint.pretrained_checkpoint)")
    if megatron_model_path is None:
        model = bridge.build_model(dtype=dtype, device=device, load_weights=True)
    else:
        if run is None:
            _refuse_peft_run_as_weights(megatron_model_path)
        model = bridge.build_model(dtype=dtype, device=device, init="none")
        load_checkpoint_into(bridge, model, megatron_model_path)
    if run is not None:
        apply_peft_checkpoint(bridge, model, run, plugin_manager=plugin_manager)
    if video_pruning_rate is not None:
        import dataclasses

        if not 0.0 <= float(video_pruning_rate) < 1.0:
            raise ValueError(f"video pruning rate must be in [0, 1), got {video_pruning_rate}")
        model.config = dataclasses.replace(model.config, video_pruning_rate=float(video_pruning_rate))
    if model_transform is not None:
        model_transform(model)
    model.eval()
    return generator_for_model(bridge, model, device=device, dtype=dtype, cuda_graph=cuda_graph, compile=compile,
                               processor_options=processor_options)


def generator_for_model(
    bridge: Any,
    model: "torch.nn.Module",
    *,
    device: "torch.device | str",
    dtype: "torch.dtype | None" = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    processor_options: Mapping[str, Any] | None = None,
) -> "Generator":
    """A :class:`~nvlcore.generation.Generator` over a model that is already built and loaded (the
    trainer's, for generation-based validation); the model is used as it is (call ``model.eval()``
    around generation).

    :param dtype: dtype of the media tensors (default: the model's parameters').
    """
    import torch

    from nvlcore.generation import Generator

    from .model.decode import NemotronVLDecoder

    device = torch.device(device)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    processor = bridge.processor(**dict(processor_options or {}))
    decoder = NemotronVLDecoder(
        model, cuda_graph=device.type == "cuda" if cuda_graph is None else cuda_graph, compile=compile
    )

    def prepare(conversation: Mapping[str, Any]) -> dict[str, Any]:
        sample = processor(conversation, add_generation_prompt=True)
        out: dict[str, Any] = {"input_ids": sample["input_ids"]}
        if sample.get("pixel_values") is not None:
            out["pixel_values"] = sample["pixel_values"]
        if sample.get("num_frames"):
            out["num_frames"] = list(sample["num_frames"])
        return out

    stops = {processor.eos_id}
    tokenizer = processor.tokenizer
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return Generator(
        decoder, tokenizer, prepare, stop_token_ids=sorted(stops), pad_token_id=processor.pad_token_id,
        device=device, media_dtype=dtype,
    )


def load_checkpoint_into(bridge: Any, model: Any, megatron_model_path: str | os.PathLike[str]) -> None:
    """Fill ``model`` (this rank's shards) from a Megatron-style checkpoint (base dir: its latest
    iteration; or an ``iter_N`` dir) through the bridge's weight mapping, at any TP size."""
    from nvlcore.checkpoint import resolve_checkpoint_dir

    try:
        iter_dir = resolve_checkpoint_dir(megatron_model_path)
    except Exception as exc:  # the checkpoint layer's errors say what is missing where
        raise FileNotFoundError(f"--megatron-model-path {megatron_model_path}: {exc}") from exc
    bridge.load_checkpoint_weights(model, iter_dir)


def _refuse_peft_run_as_weights(path: str | os.PathLike[str]) -> None:
    """A PEFT run's (adapter-only) checkpoint given as full weights: say what to type instead."""
    from nvlcore.checkpoint import open_checkpoint

    try:
        rc = open_checkpoint(path).run_config() or {}
    except Exception:  # not a checkpoint: load_checkpoint_into reports it
        return
    method = (rc.get("peft") or {}).get("method")
    if method:
        raise ValueError(
            f"--megatron-model-path {path} is a {method} run's adapter checkpoint, not full weights; give it as "
            f"--adapter-checkpoint {path} (the base comes from --megatron-model-path BASE, the run's recorded "
            "pretrained checkpoint, or the HF directory)"
        )


def _open_peft_run(path: str | os.PathLike[str]) -> Any:
    """The checkpoint of a PEFT run; errors say what is missing where."""
    from nvlcore.checkpoint import open_checkpoint

    try:
        ck = open_checkpoint(path)
    except Exception as exc:  # the checkpoint layer's errors name the file
        raise FileNotFoundError(f"--adapter-checkpoint {path}: {exc}") from exc
    rc = ck.run_config() or {}
    if not (rc.get("peft") or {}).get("method"):
        raise ValueError(
            f"--adapter-checkpoint {ck.path}: its run_config.yaml has no peft.method, so it is not a PEFT run's "
            "checkpoint; give a full checkpoint as --megatron-model-path instead"
        )
    return ck


def apply_peft_checkpoint(bridge: Any, model: Any, ck: Any, *, plugin_manager: Any = None) -> Any:
    """Apply a PEFT run's adapters to ``model`` (base weights already loaded), unmerged.

    The run's fully trained tensors (e.g. the ViT and projector of ``--lora-on-language-model``) are
    loaded through the weight mapping first, then the PEFT method named in its ``run_config.yaml`` is
    looked up in the ``peft_method`` registry, applied with the recorded settings, and given the
    adapter tensors. Returns the method object.
    """
    if plugin_manager is None:
        from nvlcore.plugins import get_plugin_manager

        plugin_manager = get_plugin_manager()
    peft = dict((ck.run_config() or {}).get("peft") or {})
    name = peft.pop("method")
    try:
        target = plugin_manager.registry("peft_method").get(name)
    except Exception as exc:
        raise ValueError(f"{ck.path}: peft.method={name!r} is not installed ({exc})") from None
    options = dict(peft.pop("options", None) or {})
    peft.update(options)
    bridge.load_checkpoint_weights(model, ck, strict=False)  # fully trained tensors; adapters are not mapped
    method = target() if isinstance(target, type) else target
    method.apply(model, bridge=bridge, **peft)
    saved = set(ck.keys())
    keys = [k for k in method.adapter_parameters(model) if k in saved]
    if not keys:
        raise ValueError(f"{ck.path} holds none of peft.method={name!r}'s adapter tensors")
    method.load_trainable_state_dict(model, ck.load(keys))
    return method
