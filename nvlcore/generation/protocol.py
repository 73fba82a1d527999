"""What a model must implement to be decoded by :func:`nvlcore.generation.generate_tokens`.

The protocol is three methods on the model (or on a thin wrapper around it):

``allocate_cache(batch_size, max_length, *, dtype, device) -> cache``
    Allocate whatever per-sequence state decoding needs for ``batch_size`` rows of at most
    ``max_length`` tokens (prompt + generated). For a hybrid state-space/attention model: a key/value
    buffer per attention layer and a convolution + SSM state per state-space layer. The cache object
    is opaque to the loop.
``prefill(input_ids, *, attention_mask, cache, **model_inputs) -> logits``
    Run the whole prompt once (``input_ids [B, L]``, **left**-padded, ``attention_mask [B, L]``
    with 0 on padding; ``model_inputs`` are the processor's other outputs such as
    ``pixel_values``), fill ``cache`` with the exact state after the last prompt token and return
    the next-token logits of the last position, ``[B, V]`` over the **full** vocabulary (a
    tensor-parallel model gathers its vocabulary shards).
``decode_step(token_ids, cache) -> logits``
    Append one token per row (``token_ids [B]``) and return the next-token logits ``[B, V]``.
    Constant work per state-space layer; attention reads the cached keys/values.

Left padding keeps the newest token of every row in the same column, so one decode step serves
the whole batch; the model is responsible for making padding invisible (padded keys masked in
attention, padded positions zeroed before a state-space layer's state sees them).

:class:`NoCacheReference` implements the same protocol on top of a plain full-sequence forward
by recomputing the whole prefix at every step: the slow, obviously-correct reference the cached
path is tested against (it is what the original Megatron-Bridge generate script does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class DecodableModel(Protocol):
    """A model that can be decoded token by token with a cache (see the module docstring)."""

    def allocate_cache(
        self, batch_size: int, max_length: int, *, dtype: torch.dtype, device: torch.device
    ) -> Any: ...

    def prefill(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor, cache: Any, **model_inputs: Any
    ) -> torch.Tensor: ...

    def decode_step(self, token_ids: torch.Tensor, cache: Any) -> torch.Tensor: ...


ForwardLogits = Callable[..., "torch.Tensor"]
"""``forward(input_ids [B, L], attention_mask [B, L], **model_inputs) -> logits [B, L, V]``."""


class NoCacheReference:
    """The decode protocol without a cache: every step re-runs ``forward`` on the whole prefix.

    :param forward: full-sequence logits function, called as
        ``forward(input_ids, attention_mask=mask, **model_inputs)`` and returning ``[B, L, V]``
        full-vocabulary logits (the model's own training-face forward at TP=1).
    """

    def __init__(self, forward: ForwardLogits) -> None:
        self.forward = forward

    def allocate_cache(self, batch_size: int, max_length: int, *, dtype: Any = None, device: Any = None) -> dict:
        return {"max_length": max_length}

    def _run(self, cache: dict) -> torch.Tensor:
        logits = self.forward(cache["input_ids"], attention_mask=cache["attention_mask"], **cache["model_inputs"])
        return logits[:, -1, :]

    def prefill(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor, cache: dict, **model_inputs: Any
    ) -> torch.Tensor:
        cache.update(input_ids=input_ids, attention_mask=attention_mask, model_inputs=model_inputs)
        return self._run(cache)

    def decode_step(self, token_ids: torch.Tensor, cache: dict) -> torch.Tensor:
        import torch

        if cache["input_ids"].shape[1] >= cache["max_length"]:
            raise RuntimeError(f"decode past the allocated length {cache['max_length']}")
        cache["input_ids"] = torch.cat([cache["input_ids"], token_ids[:, None]], dim=1)
        cache["attention_mask"] = torch.cat(
            [cache["attention_mask"], torch.ones_like(cache["attention_mask"][:, :1])], dim=1
        )
        return self._run(cache)
