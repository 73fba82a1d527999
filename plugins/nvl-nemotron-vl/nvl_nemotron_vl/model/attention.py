"""Self-attention with a fused, group-interleaved QKV projection (LM GQA and ViT MHA).

``linear_qkv`` rows are laid out per KV group: ``[q heads of group 0 (r of them), k_0, v_0, q heads of
group 1, k_1, v_1, ...]`` with ``r = heads / kv_heads``: Megatron's layout. A column split over TP then
gives every rank whole groups. For the ViT (``kv_heads == heads``) this is the per-head ``[q_h, k_h, v_h]``
interleave. No positional embedding (Nemotron-H has no RoPE; the ViT adds absolute embeddings before).
Softmax runs in fp32 (PyTorch SDPA: fp32 inputs on CPU; the fused GPU kernels accumulate in fp32).

Causal attention also decodes: ``forward`` with a :class:`~.cache.HybridCache` fills the KV cache,
``step`` attends one new token over it, ``allocate_inference_cache`` makes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .cache import AttentionState
from .kernels import PACKED_MASK_FP32, PACKED_MASK_NO_KERNEL, PACKED_MASK_PADDING, PACKED_VARLEN, PackedSequences
from .parallel import TPContext, normed_column_linear, row_linear, split_size

if TYPE_CHECKING:
    from .cache import HybridCache


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of ``attention_mask`` ``[b, L]`` is real tokens followed only by padding."""
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


def attention_mask_for(attention_mask: torch.Tensor | None, L: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean SDPA mask ``[b, 1, L, L]`` (True = may attend), or None when plain causal/full suffices
    (no padding, or causal attention over right-padded rows).

    Padding keys are hidden; every query may still see itself so fully padded rows stay finite (their
    outputs are never used).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    if causal and is_right_padded(attention_mask):
        # Padding after every real token: under the causal mask a real query sees only real keys, so
        # the real tokens' outputs need no dense mask (and SDPA keeps its flash kernel and GQA).
        # Padded queries see real keys and earlier padding: finite, and never used.
        return None
    keep = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, L] real keys
    eye = torch.eye(L, dtype=torch.bool, device=device)
    allowed = keep | eye
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return allowed


def packed_attention_mask(seq_idx: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean SDPA mask ``[b, 1, L, L]`` for packed samples: a query sees only keys of its own sample
    (``seq_idx`` ``[b, L]`` equal), and with ``causal`` only earlier ones: block-diagonal causal."""
    L = seq_idx.shape[1]
    allowed = (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=seq_idx.device).tril()
    return allowed


class SelfAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        bias: bool,
        norm: str,
        eps: float,
        causal: bool,
        tp: TPContext,
        dtype: torch.dtype,
        device: torch.device,
        layer_number: int | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        #: Index of this layer in the LM decoder: its entry in a decoding cache (None in the ViT).
        self.layer_number = layer_number
        self.heads = split_size(num_heads, tp, "attention heads")
        self.kv_heads = split_size(num_kv_heads, tp, "attention KV groups")
        self.rep = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        qkv_rows = (num_heads + 2 * num_kv_heads) * head_dim
        self.linear_qkv = normed_column_linear(hidden_size, qkv_rows, bias=bias, norm=norm, eps=eps, tp=tp,
                                               dtype=dtype, device=device)
        self.linear_proj = row_linear(num_heads * head_dim, hidden_size, bias=bias, tp=tp, dtype=dtype,
                                      device=device)
        #: Packed rows' attention kernel (``Kernels.packed_attention``, set by ``set_kernels``); None: the
        #: SDPA block-mask reference.
        self.packed_attention = None
        #: ``record(op, impl)`` (``Kernels.record``, set by ``set_kernels``): which packed path ran, for the
        #: run's report; None: not recorded.
        self.record_kernel = None

    def _qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection ``[b, L, local rows]`` -> ``q`` ``[b, heads, L, d]``, ``k``, ``v``.

        ``k`` and ``v`` are ``[b, kv_heads, L, d]``.
        """
        b, L = qkv.shape[:2]
        qkv = qkv.view(b, L, self.kv_heads, self.rep + 2, self.head_dim)
        q = qkv[:, :, :, : self.rep].reshape(b, L, self.heads, self.head_dim).transpose(1, 2)
        return q, qkv[:, :, :, self.rep].transpose(1, 2), qkv[:, :, :, self.rep + 1].transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        inference_params: HybridCache | None = None, seq_idx: torch.Tensor | PackedSequences | None = None,
        *, sequence_parallel: bool = False,
    ) -> torch.Tensor:
        """``[b, L, hidden]`` (before the layer's norm) -> ``[b, L, hidden]``; ``attention_mask`` ``[b, L]``.

        ``seq_idx`` ``[b, L]`` (packed samples; or their :class:`~.kernels.PackedSequences`) restricts
        attention to each token's own sample (block-diagonal, causal for the LM); padding must then be a
        sample index of its own. Causal attention over packed rows without a padding mask runs
        :attr:`packed_attention` when set (each sample's keys only), else SDPA with the block mask.

        ``inference_params`` (a :class:`~.cache.HybridCache`, causal attention only): in its
        ``"prefill"`` phase the prompt's keys/values are also written to columns ``[0, L)`` of this
        layer's cache; in its ``"decode"`` phase this is :meth:`step`.

        ``sequence_parallel``: ``hidden_states`` is this rank's sequence shard (the masks are the whole
        sequence's); ``linear_qkv`` gathers the sequence and the output is this rank's shard again.
        """
        if inference_params is not None and inference_params.phase == "decode":
            return self.step(hidden_states, inference_params)
        sp = sequence_parallel
        qkv, _ = self.linear_qkv(hidden_states, sequence_parallel=sp)
        b, L = qkv.shape[:2]  # the whole sequence, also when hidden_states is a shard of it
        path = None
        if seq_idx is not None and self.causal and inference_params is None:
            path = self._packed_path(attention_mask, qkv.dtype)
            if self.record_kernel is not None:
                self.record_kernel("packed_attention", path)
        if path == PACKED_VARLEN:
            # The varlen kernel (16-bit inputs only: an fp32 model keeps the block mask), on the tokens as
            # one flattened row [b * L, heads, d], so that its output feeds linear_proj without a transpose.
            g = qkv.view(b * L, self.kv_heads, self.rep + 2, self.head_dim)
            o = self.packed_attention(g[:, :, : self.rep].reshape(b * L, self.heads, self.head_dim),
                                      g[:, :, self.rep], g[:, :, self.rep + 1], PackedSequences.of(seq_idx))
            out, _ = self.linear_proj(o.reshape(b, L, self.heads * self.head_dim), sequence_parallel=sp)
            return out
        q, k, v = self._qkv(qkv)
        if inference_params is not None:
            if seq_idx is not None:
                raise ValueError("packed rows (seq_idx) cannot fill a decoding cache: give one prompt per row")
            state: AttentionState = inference_params.state_of(self)
            state.keys[:, :, :L] = k
            state.values[:, :, :L] = v
        if seq_idx is not None:
            if isinstance(seq_idx, PackedSequences):
                seq_idx = seq_idx.seq_idx
            mask = packed_attention_mask(seq_idx, self.causal)
            if attention_mask is not None and not bool(attention_mask.all()):
                mask = mask & attention_mask_for(attention_mask, L, False, hidden_states.device)
        else:
            mask = attention_mask_for(attention_mask, L, self.causal, hidden_states.device)
        gqa = self.rep > 1
        if mask is not None and gqa:
            # PyTorch's masked (memory-efficient) SDPA kernel does not take enable_gqa; expanding the
            # KV heads keeps it off the math fallback, which would materialise every score matrix.
            k, v = k.repeat_interleave(self.rep, dim=1), v.repeat_interleave(self.rep, dim=1)
            gqa = False
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None, enable_gqa=gqa
        )
        out, _ = self.linear_proj(o.transpose(1, 2).reshape(b, L, self.heads * self.head_dim), sequence_parallel=sp)
        return out

    def _packed_path(self, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> str:
        """Which path causal attention over packed rows takes: the varlen kernel where one is set, the
        inputs are 16-bit (its only dtypes) and no padding mask is given; else the SDPA block mask."""
        if self.packed_attention is None:
            return PACKED_MASK_NO_KERNEL
        if attention_mask is not None:
            return PACKED_MASK_PADDING
        if dtype not in (torch.float16, torch.bfloat16):
            return PACKED_MASK_FP32
        return PACKED_VARLEN

    def step(self, hidden_states: torch.Tensor, inference_params: HybridCache) -> torch.Tensor:
        """One token ``[b, 1, hidden]``: write its key/value at the cache's ``position`` column and attend
        over every column under the cache's key mask (fixed shapes: graph-capturable)."""
        from .step_ops import column, row

        cache = inference_params
        state: AttentionState = cache.state_of(self)
        b = hidden_states.shape[0]
        q, k, v = self._qkv(column(self.linear_qkv, hidden_states))
        state.keys.index_copy_(2, cache.position, k)
        state.values.index_copy_(2, cache.position, v)
        o = F.scaled_dot_product_attention(
            q, state.keys, state.values, attn_mask=cache.key_mask[:, None, None, :], enable_gqa=self.rep > 1
        )
        return row(self.linear_proj, o.transpose(1, 2).reshape(b, 1, self.heads * self.head_dim), self.tp)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, *, dtype: torch.dtype,
                                 device: torch.device | str) -> AttentionState:
        """Zeroed keys and values ``[b, kv_heads, max_seqlen, head_dim]`` (this rank's KV groups)."""
        if not self.causal:
            raise ValueError("only causal attention decodes token by token; this layer is bidirectional")
        shape = (batch_size, self.kv_heads, max_seqlen, self.head_dim)
        return AttentionState(torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device))
