"""FLOP counts for throughput reporting (TFLOP/s, MFU).

LM: Megatron-Bridge's hybrid-model formula
(``src/megatron/bridge/training/utils/flop_utils.py::num_floating_point_operations``), forward per
sequence of length ``s``::

    attention  4 s h p (h + h g / heads) + 2 s h p s        (p = kv_channels * heads / h; causal core)
    MLP        4 s h ffn
    Mamba      2 s h (2 d_in + 2 groups state + nheads) + 7 s d_in state + 2 s d_in h
    logits     2 s h V

Training = 3 x forward. Unlike Megatron-Bridge, :func:`batch_train_flops` counts each sample at its
real length (``attention_mask`` sum), not padded to ``seq_length``, and adds the ViT and projector
per tile (Bridge leaves them out): per ViT layer over ``S = prefix + patches`` tokens
``2 S H 3H + 2 S H H + 4 S^2 H + 4 S H ffn`` plus the patch embedder, and the projector's two matmuls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .config import NemotronVLConfig


def lm_forward_flops(cfg: NemotronVLConfig, seq_lengths: Iterable[int]) -> float:
    llm = cfg.llm
    h, V = llm.hidden_size, llm.vocab_size
    p = llm.head_dim * llm.num_attention_heads / h
    g, heads = llm.num_key_value_heads, llm.num_attention_heads
    d_in, state, groups, nheads = llm.mamba_d_inner, llm.ssm_state_size, llm.n_groups, llm.mamba_num_heads
    n_attn = llm.layer_types.count("attention")
    n_mlp = llm.layer_types.count("mlp")
    n_mamba = llm.layer_types.count("mamba")
    total = 0.0
    for s in seq_lengths:
        attn = 4 * s * h * p * (h + h * g / heads) + 2 * s * h * p * s
        mlp = 4 * s * h * llm.intermediate_size
        mamba = 2 * s * h * (2 * d_in + 2 * groups * state + nheads) + 7 * s * d_in * state + 2 * s * d_in * h
        total += n_attn * attn + n_mlp * mlp + n_mamba * mamba + 2 * s * h * V
    return total


def vision_forward_flops_per_tile(cfg: NemotronVLConfig) -> float:
    v = cfg.vision
    H, patches = v.hidden_size, cfg.grid**2
    S = v.num_prefix_tokens + patches
    layer = 2 * S * H * 3 * H + 2 * S * H * H + 4 * S * S * H + 4 * S * H * v.intermediate_size
    embed = 2 * patches * (v.num_channels * v.patch_size**2) * H
    tok = cfg.num_image_token
    projector = 2 * tok * cfg.projector_input_size * cfg.projector_hidden_size + \
        2 * tok * cfg.projector_hidden_size * cfg.llm.hidden_size
    return v.num_layers * layer + embed + projector


def batch_train_flops(cfg: NemotronVLConfig, batch: Mapping[str, Any]) -> float:
    """Training FLOPs (3x forward) of one batch, counting real tokens and every tile/frame.

    A packed batch (``seq_idx``) counts each packed sample at its own length: attention is
    block-diagonal, so a row of samples of lengths ``l_i`` costs ``sum l_i^2``, not ``(sum l_i)^2``.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    seq_idx = batch.get("seq_idx")
    if seq_idx is not None:
        real = mask.bool() if mask is not None else None
        lengths = []
        for r in range(int(ids.shape[0])):
            row = seq_idx[r].long() if real is None else seq_idx[r][real[r]].long()
            lengths += [int(n) for n in row.bincount().tolist() if n]
    elif mask is not None:
        lengths = [int(x) for x in mask.sum(dim=1).tolist()]
    else:
        lengths = [int(ids.shape[1])] * int(ids.shape[0])
    pv = batch.get("pixel_values")
    tiles = 0 if pv is None else int(pv.shape[0])
    return 3.0 * (lm_forward_flops(cfg, lengths) + tiles * vision_forward_flops_per_tile(cfg))
