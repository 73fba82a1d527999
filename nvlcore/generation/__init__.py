"""Model-agnostic generation: the decode loop, sampling, stop tokens and streamed text.

A model plugs in by implementing :class:`DecodableModel` (``allocate_cache``, ``prefill``,
``decode_step``); see ``docs/generate.md``. Importing this package is cheap: torch is imported
inside the functions that need it.
"""

from __future__ import annotations

from nvlcore.generation.api import (
    ContextLengthError,
    GenerationResult,
    Generator,
    build_conversation,
    merge_model_inputs,
)
from nvlcore.generation.loop import GenerationOutput, generate_tokens, left_pad
from nvlcore.generation.protocol import DecodableModel, NoCacheReference
from nvlcore.generation.sampling import SamplingParams, sample_next_token, top_k_filter, top_p_filter
from nvlcore.generation.streaming import IncrementalDetokenizer, TextStreamer

__all__ = [
    "ContextLengthError",
    "DecodableModel",
    "GenerationOutput",
    "GenerationResult",
    "Generator",
    "IncrementalDetokenizer",
    "NoCacheReference",
    "SamplingParams",
    "TextStreamer",
    "build_conversation",
    "generate_tokens",
    "left_pad",
    "merge_model_inputs",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]
