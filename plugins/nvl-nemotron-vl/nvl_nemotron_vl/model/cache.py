"""Decoding state of the hybrid language model: a key/value buffer per attention layer and a
convolution window + SSM state per Mamba layer (MLP layers keep nothing).

Every buffer has a fixed shape for the whole generation (``max_length`` key/value columns), and
the write column and the key-validity mask live on the device, so a decode step is a fixed
sequence of kernels that a CUDA graph can capture once and replay.

Per-layer shapes (TP-local; ``tp`` = tensor-parallel size)::

    attention:  keys, values   [B, kv_heads / tp, max_length, head_dim]   model dtype
    Mamba:      conv           [B, conv_dim / tp, conv_kernel - 1]        model dtype: the last K-1
                                                                         inputs of the causal conv
                ssm            [B, heads / tp, head_dim, state]            fp32

with ``conv_dim = heads*head_dim + 2*groups*state`` in the conv1d weight's ``[x | B | C]`` channel
order. A Mamba layer's state does not grow with the sequence.

The layers own their part: each layer module allocates its state (``allocate_inference_cache``),
fills it when its ``forward`` is given the cache in the ``"prefill"`` phase, and advances it in
``step`` (one token); this module only holds the buffers and the positions shared by all layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionState:
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class MambaState:
    conv: torch.Tensor
    ssm: torch.Tensor


class HybridCache:
    """Per-layer decoding state of one batch (see the module docstring); built by
    :meth:`~nvl_nemotron_vl.model.lm.NemotronHLanguageModel.allocate_inference_cache`.

    * :attr:`layers` -- per decoder layer, what its ``allocate_inference_cache`` returned: an
      :class:`AttentionState`, a :class:`MambaState` or ``None`` (MLP); a layer finds its own entry
      by its ``layer_number``;
    * :attr:`phase` -- ``"prefill"`` until the prompt has run, then ``"decode"``;
    * :attr:`position` -- ``[1]`` int64 device tensor: the column the next token's key/value goes to;
    * :attr:`key_mask` -- ``[B, max_length]`` bool device tensor: columns holding real tokens (left
      padding and unwritten columns are False);
    * :attr:`length` -- host-side count of written columns (prompt + decoded tokens).
    """

    def __init__(self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype) -> None:
        self.batch_size, self.max_length = batch_size, max_length
        self.device, self.dtype = device, dtype
        self.phase = "prefill"
        self.length = 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.layers: list[AttentionState | MambaState | None] = []

    def state_of(self, layer: Any) -> Any:
        """The entry of ``layer`` (a mixer with a ``layer_number``) in :attr:`layers`."""
        n = layer.layer_number
        if n is None or not 0 <= n < len(self.layers):
            raise ValueError(f"{type(layer).__name__} (layer_number={n}) is not a layer of the language model this "
                             f"cache was allocated for ({len(self.layers)} layers)")
        return self.layers[n]

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.position
        yield self.key_mask
        for s in self.layers:
            if isinstance(s, AttentionState):
                yield s.keys
                yield s.values
            elif isinstance(s, MambaState):
                yield s.conv
                yield s.ssm

    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Forget every sequence, in place (buffers keep their addresses, as CUDA graphs need)."""
        for t in self.tensors():
            t.zero_()
        self.phase, self.length = "prefill", 0

    def begin_prefill(self, attention_mask: torch.Tensor) -> None:
        """Start a batch whose prompt has ``attention_mask`` ``[B, L]`` (0 on left padding)."""
        b, L = attention_mask.shape
        if b != self.batch_size:
            raise ValueError(f"the cache was allocated for batch {self.batch_size}, the prompt batch is {b}")
        if L > self.max_length:
            raise ValueError(f"a prompt of {L} tokens does not fit a cache of {self.max_length} columns")
        self.reset()
        self.key_mask[:, :L] = attention_mask.bool()

    def end_prefill(self, length: int) -> None:
        self.length = length
        self.position.fill_(length)
        self.phase = "decode"
