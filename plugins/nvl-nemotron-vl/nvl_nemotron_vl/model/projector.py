"""Pixel shuffle (2x2 space-to-channel) and the vision projection MLP (RMSNorm, Linear, ReLU^2, Linear)."""

from __future__ import annotations

import torch
from torch import nn

from .mlp import MLP
from .parallel import TPContext


def pixel_shuffle(features: torch.Tensor, rows: int, cols: int, version: str = "v2") -> torch.Tensor:
    """``[T, rows*cols, C]`` -> ``[T, rows*cols/4, 4C]`` (InternVL's ``pixel_shuffle``, ratio 0.5).

    With ``version="v2"`` output token ``r2 * cols/2 + c2`` holds, in channel order, the features of
    patches ``(2r2, 2c2), (2r2, 2c2+1), (2r2+1, 2c2), (2r2+1, 2c2+1)``; ``"v1"`` transposes the token grid.
    """
    T, _, C = features.shape
    x = features.reshape(T, rows, cols, C)
    x = x.reshape(T, rows, cols // 2, C * 2)  # merge column pairs
    x = x.permute(0, 2, 1, 3).contiguous()  # [T, cols/2, rows, 2C]
    x = x.reshape(T, cols // 2, rows // 2, C * 4)  # merge row pairs
    if version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()  # back to row-major token order
    return x.reshape(T, -1, C * 4)


class VisionProjection(nn.Module):
    """``encoder.linear_fc1`` (with the RMSNorm folded in) -> ReLU^2 -> ``encoder.linear_fc2``; no bias."""

    def __init__(self, in_size: int, ffn_size: int, out_size: int, eps: float, tp: TPContext, dtype, device) -> None:
        super().__init__()
        self.encoder = MLP(in_size, ffn_size, activation="relu2", bias=False, norm="rms", eps=eps, tp=tp,
                           dtype=dtype, device=device, out_size=out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)
