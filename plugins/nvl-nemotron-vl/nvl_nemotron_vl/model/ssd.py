"""The Mamba2 selective-state-space (SSD) scan, behind one interface.

The recurrence, per head ``h`` (group ``g = h // (heads / groups)``), with ``S_0 = initial_state or 0``::

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * outer(x_t, B_t[g])     # S: [head_dim, state]
    y_t = S_t @ C_t[g]

:func:`ssd_scan` is the plain-PyTorch implementation: it computes exactly this recurrence, chunked for
speed (within a chunk as a masked quadratic form, across chunks by carrying the state), with all
arithmetic and the state in fp32. Chunking only changes floating-point rounding. GPU kernels of the
same semantics are chosen per model by :mod:`.kernels` (``model.set_kernels``); :func:`ssd_final_state`
gives the state a prompt leaves behind whichever scan ran. The ``D`` skip and the gate are applied by
the caller (:mod:`.mamba`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SSDScan = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan in plain PyTorch.

    Args:
        x: ``[b, L, heads, head_dim]`` inputs.
        dt: ``[b, L, heads]`` time steps, already ``softplus(dt + dt_bias)``.
        A: ``[heads]`` negative decay rates (``-exp(A_log)``).
        B, C: ``[b, L, groups, state]`` input / output projections of the state.
        chunk_size: chunk length of the blocked computation.
        initial_state: ``[b, heads, head_dim, state]`` state before the first token, or None for zeros.

    Returns:
        ``y`` ``[b, L, heads, head_dim]`` in fp32 (without the ``D`` skip), and the final state
        ``[b, heads, head_dim, state]`` in fp32 (the last sample's, with ``seq_idx``).
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per group
    Q = chunk_size
    pad = (-L) % Q
    # Zero padding at the end is exact: dt = 0 means no decay and no input, so the state is unchanged.
    x, dt, B, C = (F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (L + pad) // Q
    if seq_idx is not None:
        # The padding continues the last sample (its dt = 0 keeps that sample's state unchanged).
        sid = torch.cat([seq_idx.long(), seq_idx[:, -1:].long().expand(b, pad)], dim=1).view(b, c, Q)

    xdt = (x * dt[..., None]).view(b, c, Q, g, r, p)  # dt-scaled input
    a = (dt * A.float()).view(b, c, Q, g, r)  # log-decay per step (<= 0)
    Bc = B.view(b, c, Q, g, n)
    Cc = C.view(b, c, Q, g, n)
    acum = a.cumsum(dim=2).permute(0, 1, 3, 4, 2)  # [b, c, g, r, Q] within-chunk cumulative log-decay

    # 1. Within each chunk: y_t += sum_{s<=t} (C_t . B_s) * exp(acum_t - acum_s) * xdt_s.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (acum[..., :, None] - acum[..., None, :]).masked_fill(~causal, float("-inf"))
    if seq_idx is not None:
        same = sid[:, :, :, None] == sid[:, :, None, :]  # [b, c, t, s]: no boundary between s and t
        seg = seg.masked_fill(~same[:, :, None, None], float("-inf"))
    CB = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)
    y = torch.einsum("bcgts,bcgrts,bcsgrp->bctgrp", CB, seg.exp(), xdt)

    # 2. State contributed by each chunk alone, at the chunk's end.
    decay_to_end = (acum[..., -1:] - acum).exp()  # [b, c, g, r, Q]
    if seq_idx is not None:
        # Only tokens of the sample that is running at the chunk's end contribute to its end state.
        decay_to_end = decay_to_end * (sid == sid[:, :, -1:])[:, :, None, None, :].float()
    chunk_states = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bc, decay_to_end, xdt)

    # 3. Carry the state across chunks (sequential over c = L / chunk_size steps).
    chunk_decay = acum[..., -1].exp()  # [b, c, g, r]
    enter = None
    if seq_idx is not None:
        # The sample index each chunk's entering state belongs to: that of the previous chunk's last
        # token (the first token's for chunk 0, so an initial state belongs to the first sample).
        prev = torch.cat([sid[:, :1, 0], sid[:, :-1, -1]], dim=1)  # [b, c]
        enter = (sid == prev[:, :, None]).float()  # [b, c, Q]: the entering state reaches token t
        chunk_decay = chunk_decay * enter[:, :, -1][:, :, None, None]
    if initial_state is None:
        state = x.new_zeros(b, g, r, p, n)
    else:
        state = initial_state.float().reshape(b, g, r, p, n)
    starts = []
    for i in range(c):
        starts.append(state)
        state = state * chunk_decay[:, i, :, :, None, None] + chunk_states[:, i]
    start_states = torch.stack(starts, dim=1)  # [b, c, g, r, p, n] state entering each chunk

    # 4. Contribution of the entering state: y_t += exp(acum_t) * S_start @ C_t.
    reach = acum.exp()
    if enter is not None:
        reach = reach * enter[:, :, None, None, :]
    y = y + torch.einsum("bctgn,bcgrpn,bcgrt->bctgrp", Cc, start_states, reach)
    y = y.reshape(b, c * Q, h, p)[:, :L]
    return y, state.reshape(b, h, p, n)


_compiled: SSDScan | None = None


def compiled_ssd_scan() -> SSDScan:
    """:func:`ssd_scan_reference` compiled by ``torch.compile`` (Inductor fuses its elementwise work).

    Measured on one H200 at the 12B shape (4096 tokens): the training step 1.49 s -> 1.19 s
    (bench/results/model_step_12b-shape_cuda_2026-11-28.md). Compiles once per new sequence length.
    """
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(ssd_scan_reference)
    return _compiled


#: The name :func:`.kernels.select_kernels` builds its reference scan from. Which scan a model runs is
#: chosen per model (``model.set_kernels``), never here.
ssd_scan = ssd_scan_reference


def ssd_final_state(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The state after the last token, from a zero state, in fp32 (what a prefill leaves for decoding)::

        S_L = sum_s exp(sum_{s<t<=L} dt_t * A) * dt_s * outer(x_s, B_s[g])

    The same recurrence as :func:`ssd_scan_reference` in closed form: one weighted sum over the
    sequence, so the state is available whichever scan (reference or a GPU kernel that returns only
    its outputs) computed ``y``. The decay sums are taken from the end, so the most recent tokens'
    weights are exact. Shapes as :func:`ssd_scan_reference`; returns ``[b, heads, head_dim, state]``.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    a = dt.float() * A.float()  # [b, L, h] log-decay per step
    after = torch.flip(torch.cumsum(torch.flip(a, [1]), 1), [1])  # sum over t >= s
    after = torch.cat([after[:, 1:], after.new_zeros(b, 1, h)], dim=1)  # sum over t > s
    w = torch.exp(after) * dt.float()
    xw = (x.float() * w[..., None]).view(b, L, g, h // g, p)
    return torch.einsum("blgrp,blgn->bgrpn", xw, B.float()).reshape(b, h, p, n)


def ssd_scan_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time (slow; the definition the tests check the chunked scan against).

    With ``seq_idx`` ``[b, L]`` the state is zeroed before every token whose index differs from the
    previous token's (a packed sample's first token).
    """
    b, L, h, p = x.shape
    g = B.shape[2]
    r = h // g
    Bh = B.repeat_interleave(r, dim=2)
    Ch = C.repeat_interleave(r, dim=2)
    state = (initial_state if initial_state is not None else x.new_zeros(b, h, p, B.shape[3])).clone()
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state
