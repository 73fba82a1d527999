"""RADIO ViT (C-RADIOv2-H style) as used by Nemotron Nano V2 VL, tensor-parallel over heads / MLP.

::

    patches = im2patches(tiles)                      # [T, rows*cols, 3*16*16], features in (c, yy, xx) order
    x = embedder(patches) + resize(position_embeddings, rows x cols)
    x = cat([class_token (cls + registers), x])      # prefix tokens carry no position embedding
    for layer in layers:  x = x + attn(LN1(x));  x = x + fc2(GELU(fc1(LN2(x))))
    features = x[:, num_prefix:]                     # no final norm; prefix dropped

Position-embedding resizing (CPE, eval): the ``max_grid x max_grid`` table is interpolated to
``M x M`` with ``M = max(rows, cols)``, cropped to ``rows x cols`` (and interpolated again if still
different). ``pos_embed_mode`` / ``pos_embed_align_corners`` select the interpolation; the defaults
(``"bilinear"``, ``align_corners=False``) match transformers' ``RadioModel`` (and Megatron training,
vLLM, sglang); NVIDIA's C-RADIOv2-H remote code uses ``align_corners=True`` in eval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .attention import SelfAttention
from .mlp import MLP
from .parallel import TPContext


class ViTLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPContext, dtype, device) -> None:
        super().__init__()
        self.self_attention = SelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_attention_heads, cfg.head_dim, bias=True,
            norm="layer", eps=cfg.layer_norm_eps, causal=False, tp=tp, dtype=dtype, device=device,
        )
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, activation="gelu", bias=True, norm="layer",
                       eps=cfg.layer_norm_eps, tp=tp, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(x)
        return x + self.mlp(x)


class _ViTDecoder(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPContext, dtype, device) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ViTLayer(cfg, tp, dtype, device) for _ in range(cfg.num_layers))
        self.recompute_layers = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            if self.recompute_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class RadioViT(nn.Module):
    def __init__(
        self,
        cfg: VisionConfig,
        tp: TPContext,
        dtype: torch.dtype,
        device: torch.device,
        *,
        pos_embed_mode: str = "bilinear",
        pos_embed_align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos_embed_mode, self.pos_embed_align_corners = pos_embed_mode, pos_embed_align_corners
        H, ps = cfg.hidden_size, cfg.patch_size
        self.class_token = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, H, dtype=dtype, device=device))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.max_grid**2, H, dtype=dtype, device=device))
        self.embedder = nn.Linear(cfg.num_channels * ps * ps, H, bias=False, dtype=dtype, device=device)
        self.decoder = _ViTDecoder(cfg, tp, dtype, device)

    def im2patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        T, c, height, width = pixel_values.shape
        ps = self.cfg.patch_size
        rows, cols = height // ps, width // ps
        x = pixel_values.reshape(T, c, rows, ps, cols, ps).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(T, rows * cols, c * ps * ps)

    def position_embedding(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        G = self.cfg.max_grid
        pe = self.position_embeddings.reshape(1, G, G, -1).permute(0, 3, 1, 2)
        if (rows, cols) != (G, G):
            kw = {"mode": self.pos_embed_mode}
            if self.pos_embed_mode in ("linear", "bilinear", "bicubic", "trilinear"):
                kw["align_corners"] = self.pos_embed_align_corners
            m = max(rows, cols)
            pe = F.interpolate(pe.float(), size=(m, m), **kw).to(dtype)
            pe = pe[..., :rows, :cols]
            if pe.shape[-2:] != (rows, cols):
                pe = F.interpolate(pe.float(), size=(rows, cols), **kw).to(dtype)
        return pe.to(dtype).flatten(2).transpose(1, 2)  # [1, rows*cols, H]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[T, 3, S, S]`` -> patch features ``[T, (S/16)^2, hidden]`` (prefix tokens dropped)."""
        ps = self.cfg.patch_size
        if pixel_values.dim() != 4 or pixel_values.shape[-1] % ps or pixel_values.shape[-2] % ps:
            raise ValueError(
                f"pixel_values must be [tiles, {self.cfg.num_channels}, H, W] with H, W multiples of {ps}, "
                f"got {tuple(pixel_values.shape)}"
            )
        dtype = self.embedder.weight.dtype
        x = self.embedder(self.im2patches(pixel_values.to(dtype)))
        rows, cols = pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps
        x = x + self.position_embedding(rows, cols, x.dtype)
        x = torch.cat([self.class_token.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.decoder(x)
        return x[:, self.cfg.num_prefix_tokens:]
