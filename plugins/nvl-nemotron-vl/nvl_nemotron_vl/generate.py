"""Generation with Nemotron Nano V2 VL: the model's processor and cached decoder around a loaded model
(:func:`generator_for_model`, the bridge's ``generator_for_model``). Building and loading the model is
the core's (:mod:`nvlcore.inference`); :func:`nvl_nemotron_vl.load_generator` is the path-based
shortcut over both.

::

    from nvl_nemotron_vl import load_generator
    from nvlcore.generation import build_conversation

    gen = load_generator("/models/nano-vl")                       # or megatron_model_path="ckpts/run1"
    [res] = gen.generate([build_conversation("Describe this image.", images=["cat.png"],
                                             system_prompt="/no_think")], max_new_tokens=100)
    print(res.text, res.decode_tokens_per_s)

This module takes the bridge it works with and never imports :mod:`.bridge` (which imports this one). The model decodes
with its layers' caches (:mod:`.model.cache`, driven by :mod:`.model.decode`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from nvlcore.generation import Generator


def generator_for_model(
    bridge: Any,
    model: torch.nn.Module,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    processor_options: Mapping[str, Any] | None = None,
    video_pruning_rate: float | None = None,
) -> Generator:
    """A :class:`~nvlcore.generation.Generator` over a model that is already built and loaded (by
    :mod:`nvlcore.inference`, or the trainer's for generation-based validation); the model is used
    as it is (call ``model.eval()`` around generation).

    :param device: where the inputs go (default: the model's).
    :param dtype: dtype of the media tensors (default: the model's parameters').
    :param cuda_graph: replay the decode step as a CUDA graph (default: on for CUDA).
    :param compile: ``torch.compile`` the decode step as well.
    :param processor_options: overrides of the processor's options (e.g. ``max_num_tiles``,
        ``video_num_frames``, ``video_fps``).
    :param video_pruning_rate: EVS pruning rate for videos, in [0, 1) (``None``: the config's
        ``video_pruning_rate``; 0 turns EVS off); sets the model's config.
    """
    import dataclasses

    import torch

    from nvlcore.generation import Generator

    from .model.decode import NemotronVLDecoder

    if video_pruning_rate is not None:
        if not 0.0 <= float(video_pruning_rate) < 1.0:
            raise ValueError(f"video pruning rate must be in [0, 1), got {video_pruning_rate}")
        model.config = dataclasses.replace(model.config, video_pruning_rate=float(video_pruning_rate))
    device = torch.device(device) if device is not None else next(model.parameters()).device
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
        device=device, media_dtype=dtype, max_length=model.config.llm.max_position_embeddings,
    )

