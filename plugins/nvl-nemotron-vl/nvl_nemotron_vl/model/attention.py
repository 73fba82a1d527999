"""Self-attention with a fused, group-interleaved QKV projection (LM GQA and ViT MHA).

``linear_qkv`` rows are laid out per KV group: ``[q heads of group 0 (r of them), k_0, v_0, q heads of
group 1, k_1, v_1, ...]`` with ``r = heads / kv_heads``: Megatron's layout. A column split over TP then
gives every rank whole groups. For the ViT (``kv_heads == heads``) this is the per-head ``[q_h, k_h, v_h]``
interleave. No positional embedding (Nemotron-H has no RoPE; the ViT adds absolute embeddings before).
Softmax runs in fp32 (PyTorch SDPA: fp32 inputs on CPU; the fused GPU kernels accumulate in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import TPContext, normed_column_linear, row_linear, split_size


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
    ) -> None:
        super().__init__()
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

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, inference_params: Any = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[b, L, hidden]`` (before the layer's norm) -> ``[b, L, hidden]``; ``attention_mask`` ``[b, L]``.

        ``seq_idx`` ``[b, L]`` (packed samples) restricts attention to each token's own sample
        (block-diagonal, causal for the LM); padding must then be a sample index of its own.
        """
        if inference_params is not None:
            raise NotImplementedError("SelfAttention.forward is the full-sequence path; cached decoding runs through nvl_nemotron_vl.model.decode.NemotronVLDecoder (KV cache)")
        b, L, _ = hidden_states.shape
        qkv, _ = self.linear_qkv(hidden_states)
        qkv = qkv.view(b, L, self.kv_heads, self.rep + 2, self.head_dim)
        q = qkv[:, :, :, : self.rep].reshape(b, L, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.rep].transpose(1, 2)
        v = qkv[:, :, :, self.rep + 1].transpose(1, 2)
        if seq_idx is not None:
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
        out, _ = self.linear_proj(o.transpose(1, 2).reshape(b, L, self.heads * self.head_dim))
        return out
