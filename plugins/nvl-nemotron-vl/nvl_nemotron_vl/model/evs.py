"""Efficient Video Sampling (EVS): drop the video tokens least changed from the previous frame.

Reference §4.3 (HF ``evs.py``, vLLM ``multimodal/evs.py``): per video, on the projector outputs
``E [frames, tokens, hidden]``, a token's score is ``1 - cos(E[f, i], E[f-1, i])`` (frame 0 scores 255,
so it is always kept); the ``max(tokens, int(frames * tokens * (1 - q)))`` highest scores are kept
(stable descending sort), in their original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def evs_retention_mask(video_embeds: torch.Tensor, pruning_rate: float) -> torch.Tensor:
    """``video_embeds`` ``[frames, tokens, hidden]`` -> bool ``[frames * tokens]``, True = keep."""
    if not 0.0 <= pruning_rate < 1.0:
        raise ValueError(f"EVS pruning rate must be in [0, 1), got {pruning_rate}")
    frames, tokens, _ = video_embeds.shape
    e = video_embeds.float()
    dissimilarity = 1 - F.cosine_similarity(e[1:], e[:-1], dim=-1)
    dissimilarity = torch.cat([torch.full_like(e[:1, :, 0], 255.0), dissimilarity], dim=0).reshape(-1)
    keep = max(tokens, int(frames * tokens * (1 - pruning_rate)))
    order = torch.argsort(dissimilarity, descending=True, stable=True)
    mask = torch.zeros(frames * tokens, dtype=torch.bool, device=video_embeds.device)
    mask[order[:keep]] = True
    return mask
