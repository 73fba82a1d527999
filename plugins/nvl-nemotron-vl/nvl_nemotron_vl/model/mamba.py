"""Mamba2 mixer (Nemotron-H ``M`` layers), tensor-parallel over heads and groups.

Per token (as the checkpoint's remote ``modeling_nemotron_h.py`` and transformers'
``models/nemotron_h/modular_nemotron_h.py`` compute it)::

    z | xBC | dt = in_proj(RMSNorm(h))                 # local rows [z_r | x_r | B_r | C_r | dt_r]
    xBC = SiLU(causal_depthwise_conv1d(xBC))          # over [x_r | B_r | C_r]
    x | B | C = xBC
    dt = softplus(dt + dt_bias)                       # no clamp
    y = SSD(x, dt, A=-exp(A_log), B, C) + D * x       # fp32 state
    y = RMSNorm_grouped(y * SiLU(z)) * norm.weight    # groups of d_inner / n_groups channels
    out = out_proj(y)                                 # row-parallel: sums the ranks' partial outputs

Rank ``r`` of ``tp`` holds heads ``[r*H/tp, (r+1)*H/tp)`` and groups ``[r*G/tp, (r+1)*G/tp)``; since a
head's group is ``head // (H/G)``, every rank's heads only read its own groups, so the mixer needs no
communication besides the row-parallel ``out_proj``.

The mixer trains and decodes, in the manner of mamba-ssm's ``Mamba2``: :meth:`MambaMixer.forward`
(optionally filling a decoding cache), :meth:`MambaMixer.step` (one token) and
:meth:`MambaMixer.allocate_inference_cache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .cache import MambaState
from .kernels import PackedSequences, conv_reference, gated_norm_reference, select_kernels
from .parallel import TPContext, mark_tensor_parallel, normed_column_linear, row_linear, split_size

if TYPE_CHECKING:
    from .cache import HybridCache


class GatedGroupRMSNorm(nn.Module):
    """``RMSNorm(y * SiLU(z))`` over groups of channels, in fp32 (``norm_before_gate=False``)."""

    def __init__(self, size: int, group_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        mark_tensor_parallel(self.weight, 0)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_norm_reference(y, z, self.weight, self.eps, self.group_size)


class MambaMixer(nn.Module):
    """One Mamba2 mixer; parameters are this rank's shard (see the module docstring)."""

    def __init__(self, cfg: LLMConfig, tp: TPContext, dtype: torch.dtype, device: torch.device,
                 layer_number: int | None = None) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        #: Index of this layer in the decoder: its entry in a decoding cache.
        self.layer_number = layer_number
        self.nheads = split_size(cfg.mamba_num_heads, tp, "llm_config.mamba_num_heads")
        self.ngroups = split_size(cfg.n_groups, tp, "llm_config.n_groups")
        self.head_dim = cfg.mamba_head_dim
        self.state = cfg.ssm_state_size
        self.d_inner = self.nheads * self.head_dim
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.state
        self.chunk_size = cfg.chunk_size
        #: Recompute conv + scan + gated norm in backward instead of storing them (set by the model).
        self.recompute = False
        #: The ops' implementations (reference or GPU kernels; :func:`.kernels.select_kernels`, set by the model).
        self.kernels = select_kernels("reference", device)
        #: Packed rows arrive as the ``seq_idx`` tensor alone (CUDA graphs, :meth:`.lm.MambaLayer.set_graph_inputs`):
        #: kept as it is, not turned into sample offsets (a host synchronisation, and a count that varies).
        self.fixed_shape_packing = False

        full_in = 2 * cfg.mamba_d_inner + 2 * cfg.n_groups * cfg.ssm_state_size + cfg.mamba_num_heads
        self.in_proj = normed_column_linear(
            cfg.hidden_size, full_in, bias=False, norm="rms", eps=cfg.layer_norm_epsilon, tp=tp, dtype=dtype,
            device=device,
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim, bias=cfg.use_conv_bias,
            padding=0, device=device, dtype=dtype,
        )
        mark_tensor_parallel(self.conv1d.weight, 0)
        if self.conv1d.bias is not None:
            mark_tensor_parallel(self.conv1d.bias, 0)
        # Per-head scalars stay in fp32 whatever the model dtype: they set the state's decay.
        self.A_log = nn.Parameter(torch.zeros(self.nheads, dtype=torch.float32, device=device))
        self.D = nn.Parameter(torch.ones(self.nheads, dtype=torch.float32, device=device))
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads, dtype=torch.float32, device=device))
        for p in (self.A_log, self.D, self.dt_bias):
            mark_tensor_parallel(p, 0)
        self.norm = GatedGroupRMSNorm(
            self.d_inner, cfg.mamba_d_inner // cfg.n_groups, cfg.layer_norm_epsilon, dtype, device
        )
        self.out_proj = row_linear(cfg.mamba_d_inner, cfg.hidden_size, bias=False, tp=tp, dtype=dtype,
                                   device=device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inference_params: HybridCache | None = None,
        seq_idx: torch.Tensor | None = None,
        *,
        sequence_parallel: bool = False,
    ) -> torch.Tensor:
        """``hidden_states`` ``[b, L, hidden]`` (before the layer's norm) -> mixer output ``[b, L, hidden]``.

        ``attention_mask`` ``[b, L]`` (1 = token, 0 = padding) zeroes padded positions before and after
        the convolution, so left padding leaves the state at zero. ``seq_idx`` ``[b, L]`` (packed
        samples: the sample index of every token) resets the conv and the SSM state at every sample's
        first token, so each sample is computed as alone.

        ``inference_params`` (a :class:`~.cache.HybridCache`): in its ``"prefill"`` phase the prompt runs
        through this same path and leaves this layer's conv window and SSM state in the cache; in its
        ``"decode"`` phase this is :meth:`step`.

        ``sequence_parallel``: ``hidden_states`` is this rank's sequence shard ``[b, L / tp, hidden]``:
        ``in_proj`` gathers the whole sequence (the conv and the scan need it, as in Megatron-Core's
        ``MambaLayer``) and ``out_proj`` reduce-scatters the output back to this rank's shard.
        """
        if inference_params is not None and inference_params.phase == "decode":
            return self.step(hidden_states, inference_params)
        if not self._fixed_shape(seq_idx):
            seq_idx = PackedSequences.of(seq_idx)
        state = None
        if inference_params is not None:
            if seq_idx is not None:
                raise ValueError("packed rows (seq_idx) cannot fill a decoding cache: give one prompt per row")
            state = inference_params.state_of(self)
        zxbcdt, _ = self.in_proj(hidden_states, sequence_parallel=sequence_parallel)
        if attention_mask is not None:
            zxbcdt = zxbcdt * attention_mask[:, :, None].to(zxbcdt.dtype)
        if self.recompute and torch.is_grad_enabled() and state is None:
            # Keep only in_proj's output for backward; the conv, scan and gated norm (fp32, several
            # times the size of their input) are recomputed.
            from torch.utils.checkpoint import checkpoint

            y = checkpoint(self.ssm, zxbcdt, attention_mask, seq_idx, use_reentrant=False)
        else:
            y = self.ssm(zxbcdt, attention_mask, seq_idx, state)
        out, _ = self.out_proj(y.to(hidden_states.dtype), sequence_parallel=sequence_parallel)
        return out

    def ssm(self, zxbcdt: torch.Tensor, attention_mask: torch.Tensor | None = None,
            seq_idx: torch.Tensor | PackedSequences | None = None, state: MambaState | None = None) -> torch.Tensor:
        """in_proj output ``[b, L, local in_proj rows]`` -> gated, normalised SSM output ``[b, L, d_inner]``,
        through the model's kernels (:attr:`kernels`). ``seq_idx``: packed samples (a tensor, or their
        :class:`~.kernels.PackedSequences`, whose ``cu_seqlens`` the varlen conv takes as they are).

        With ``state`` (a prefill) the last ``K - 1`` conv inputs (zeros before the first token) and the
        SSM state after the last token are written into it. fp32 on the reference path; the kernels'
        output dtype (bf16 under autocast) otherwise.
        """
        b, L, _ = zxbcdt.shape
        k = self.kernels
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        if state is not None:
            k1 = state.conv.shape[-1]
            tail = xBC[:, -k1:].transpose(1, 2)  # [b, conv_dim, min(L, K-1)]
            state.conv.zero_()
            state.conv[:, :, k1 - tail.shape[-1]:] = tail
        if self._fixed_shape(seq_idx):
            # Fixed shapes and no host work (a CUDA graph replays this): the scan takes seq_idx as it is, and
            # the conv is the reference's masked taps, since the varlen conv kernel plans its launch from
            # the sample offsets (their count and values vary from batch to batch).
            packed = {"seq_idx": seq_idx}
            xBC = conv_reference(xBC, self.conv1d.weight, self.conv1d.bias, seq_idx=seq_idx)
        else:
            seq_idx = PackedSequences.of(seq_idx)
            packed = {} if seq_idx is None else {"seq_idx": seq_idx.seq_idx}
            conv_packed = {} if seq_idx is None else {**packed, "cu_seqlens": seq_idx.cu_seqlens,
                                                      "cu_seqlens_cpu": seq_idx.cu_seqlens_cpu}
            xBC = k.conv(xBC, self.conv1d.weight, self.conv1d.bias, **conv_packed)
        if attention_mask is not None:
            xBC = xBC * attention_mask[:, :, None].to(xBC.dtype)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.state, self.ngroups * self.state], dim=-1)
        x = x.reshape(b, L, self.nheads, self.head_dim)
        B = B.reshape(b, L, self.ngroups, self.state)
        y = k.scan(x, dt, self.A_log, B, C.reshape(b, L, self.ngroups, self.state), self.chunk_size, self.D,
                   self.dt_bias, **packed)
        if state is not None:
            from .ssd import ssd_final_state

            dtf = F.softplus(dt.float() + self.dt_bias.float())
            state.ssm.copy_(ssd_final_state(x, dtf, -torch.exp(self.A_log.float()), B))
        return k.gated_norm(y.reshape(b, L, self.d_inner), z, self.norm.weight, self.norm.eps, self.norm.group_size)

    def _fixed_shape(self, seq_idx: object) -> bool:
        return self.fixed_shape_packing and isinstance(seq_idx, torch.Tensor)

    def step(self, hidden_states: torch.Tensor, inference_params: HybridCache) -> torch.Tensor:
        """One token ``[b, 1, hidden]``: advance this layer's conv window and SSM state in place (plain
        PyTorch, constant work; no host synchronisation, so it can be graph-captured)::

            window = [conv, xBC_t];  conv <- window[1:];  x, B, C = SiLU(sum_k window_k * w_k + b)
            dt = softplus(dt + dt_bias);  S <- exp(dt * A) * S + dt * x B^T;  y = S C + D * x
            out = out_proj(RMSNorm_grouped(y * SiLU(z)))
        """
        from .step_ops import column, row

        state: MambaState = inference_params.state_of(self)
        b = hidden_states.shape[0]
        dtype = hidden_states.dtype
        g, r = self.ngroups, self.nheads // self.ngroups  # groups, heads per group (this rank's)
        zxbcdt = column(self.in_proj, hidden_states)[:, 0]
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        window = torch.cat([state.conv, xBC[:, :, None]], dim=-1)  # [b, conv_dim, K]
        state.conv.copy_(window[:, :, 1:])
        conv = (window.float() * self.conv1d.weight[:, 0, :].float()).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias.float()
        # Rounded to the model dtype where the prompt path's conv output is, so both see the same values.
        xBC = F.silu(conv.to(dtype))
        x, B, C = xBC.split([self.d_inner, g * self.state, g * self.state], dim=-1)
        x = x.reshape(b, g, r, self.head_dim).float()
        dt = F.softplus(dt.float() + self.dt_bias.float()).reshape(b, g, r)
        A = -torch.exp(self.A_log.float()).reshape(g, r)
        S = state.ssm.view(b, g, r, self.head_dim, self.state)
        S.mul_(torch.exp(dt * A)[..., None, None])
        S.add_((dt[..., None] * x)[..., None] * B.reshape(b, g, 1, 1, self.state).float())
        y = (S @ C.reshape(b, g, 1, self.state, 1).float())[..., 0]  # [b, g, r, head_dim]
        y = y + self.D.float().reshape(g, r)[..., None] * x
        y = self.norm(y.reshape(b, 1, self.d_inner), z[:, None])
        return row(self.out_proj, y.to(dtype), self.tp)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, *, dtype: torch.dtype,
                                 device: torch.device | str) -> MambaState:
        """Zeroed decoding state: the conv window ``[b, conv_dim, K-1]`` (model dtype) and the SSM state
        ``[b, heads, head_dim, state]`` (fp32). Its size does not depend on ``max_seqlen``."""
        del max_seqlen
        return MambaState(
            conv=torch.zeros(batch_size, self.conv_dim, self.conv1d.kernel_size[0] - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch_size, self.nheads, self.head_dim, self.state, dtype=torch.float32, device=device),
        )
