"""Two-layer MLP with its input norm folded into ``linear_fc1`` (LM: squared ReLU; ViT: exact GELU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import TPContext, normed_column_linear, row_linear


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).pow(2)


ACTIVATIONS = {"relu2": squared_relu, "gelu": F.gelu}  # F.gelu defaults to the exact erf form


class MLP(nn.Module):
    def __init__(
        self, hidden_size: int, ffn_size: int, *, activation: str, bias: bool, norm: str, eps: float,
        tp: TPContext, dtype: torch.dtype, device: torch.device, out_size: int | None = None,
    ) -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.linear_fc1 = normed_column_linear(hidden_size, ffn_size, bias=bias, norm=norm, eps=eps, tp=tp,
                                               dtype=dtype, device=device)
        self.linear_fc2 = row_linear(ffn_size, out_size or hidden_size, bias=bias, tp=tp, dtype=dtype, device=device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear_fc1(hidden_states)
        out, _ = self.linear_fc2(self.act(y))
        return out
