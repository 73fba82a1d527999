"""Prefill and one-token decode steps for Nemotron Nano V2 VL, with a :class:`~.cache.HybridCache`.

**Prefill** runs the prompt once, layer by layer, with the training forward's math, and leaves the
exact decoding state behind:

* Mamba: masked ``in_proj`` -> causal conv -> masked -> chunked SSD scan (padded positions are
  zeroed before and after the conv, as transformers does, so a left-padded row's state equals its
  unpadded prompt's); the conv window keeps the last ``K - 1`` conv inputs (zeros before the first
  token) and the SSM state is the scan's final state;
* attention: the prompt's keys/values go to columns ``[0, L)``; attention as in training with padded
  keys masked.

**Decode** appends one token per row; every Mamba layer does constant work::

    window = [conv_state, xBC_t];  conv_state <- window[1:]
    x, B, C = SiLU(sum_k window_k * w_k + b)
    dt = softplus(dt + dt_bias);  S <- exp(dt * A) * S + dt * x B^T;  y = S C + D * x
    out = out_proj(RMSNorm_grouped(y * SiLU(z)))

and attention writes column ``position`` and attends over all columns under the cache's key mask.
Shapes never change during decoding, so the step can be captured in a CUDA graph (and compiled).
Nemotron-H has no positional embedding, so left padding needs no position shift.

Linear layers are called through :func:`column` / :func:`row`: for Megatron's plain parallel linears
these are ``F.linear`` on this rank's shard (plus the all-reduce of a row-parallel layer), which
``torch.compile`` can trace; any other module, and any layer with forward hooks (nvl-lora attaches
LoRA/DoRA adapters as hooks), is called as a module so that what it adds is not skipped.

:class:`NemotronVLDecoder` exposes all this as the :class:`nvlcore.generation.DecodableModel`
protocol, returning full-vocabulary logits (gathered over tensor parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import AttentionState, HybridCache, MambaState


# ------------------------------------------------------------------------------ linear layers
def _hooked(layer: nn.Module) -> bool:
    """Whether calling ``layer`` does more than its ``forward`` (adapters attached as hooks)."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks)


def column(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A column-parallel linear (its folded input norm included): this rank's output columns."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from .parallel import NormedColumnParallelLinear

    kind = type(layer)
    if kind is NormedColumnParallelLinear and not _hooked(layer):
        return F.linear(layer.normalize(x), layer.weight, layer.bias)
    if kind is ColumnParallelLinear and not _hooked(layer):
        return F.linear(x, layer.weight, layer.bias)
    out, _ = layer(x)
    return out


def row(layer: nn.Module, x: torch.Tensor, tp: Any) -> torch.Tensor:
    """A row-parallel linear on this rank's input shard, summed over the TP group."""
    from megatron.core.tensor_parallel import RowParallelLinear

    if type(layer) is RowParallelLinear and not _hooked(layer):
        out = F.linear(x, layer.weight)
        if tp.size > 1:
            torch.distributed.all_reduce(out, group=tp.group)
        return out if layer.bias is None else out + layer.bias
    out, _ = layer(x)
    return out


# -------------------------------------------------------------------------------------- Mamba
def mamba_prefill(m: nn.Module, h: torch.Tensor, attention_mask: torch.Tensor | None, state: MambaState):
    """:class:`~.mamba.MambaMixer` over a prompt ``[b, L, hidden]``; fills ``state``."""
    from .ssd import ssd_scan

    b, L, _ = h.shape
    dtype = h.dtype
    zxbcdt, _ = m.in_proj(h)
    if attention_mask is not None:
        zxbcdt = zxbcdt * attention_mask[:, :, None].to(zxbcdt.dtype)
    z, xBC, dt = zxbcdt.split([m.d_inner, m.conv_dim, m.nheads], dim=-1)
    k1 = state.conv.shape[-1]
    tail = xBC[:, -k1:].transpose(1, 2)  # [b, conv_dim, min(L, K-1)]
    state.conv.zero_()
    state.conv[:, :, k1 - tail.shape[-1] :] = tail
    xBC = m.causal_conv(xBC)
    if attention_mask is not None:
        xBC = xBC * attention_mask[:, :, None].to(xBC.dtype)
    x, B, C = xBC.split([m.d_inner, m.ngroups * m.state, m.ngroups * m.state], dim=-1)
    x = x.reshape(b, L, m.nheads, m.head_dim)
    dt = F.softplus(dt.float() + m.dt_bias.float())
    A = -torch.exp(m.A_log.float())
    y, final = ssd_scan(
        x, dt, A, B.reshape(b, L, m.ngroups, m.state), C.reshape(b, L, m.ngroups, m.state), m.chunk_size
    )
    state.ssm.copy_(final)
    y = y + m.D.float()[:, None] * x.float()
    y = m.norm(y.reshape(b, L, m.d_inner), z)
    out, _ = m.out_proj(y.to(dtype))
    return out


def mamba_step(m: nn.Module, h: torch.Tensor, state: MambaState, tp: Any) -> torch.Tensor:
    """One token ``[b, 1, hidden]`` through a Mamba mixer, updating ``state`` in place."""
    b = h.shape[0]
    dtype = h.dtype
    g, r = m.ngroups, m.nheads // m.ngroups  # groups, heads per group (this rank's)
    zxbcdt = column(m.in_proj, h)[:, 0]
    z, xBC, dt = zxbcdt.split([m.d_inner, m.conv_dim, m.nheads], dim=-1)
    window = torch.cat([state.conv, xBC[:, :, None]], dim=-1)  # [b, conv_dim, K]
    state.conv.copy_(window[:, :, 1:])
    conv = (window.float() * m.conv1d.weight[:, 0, :].float()).sum(-1)
    if m.conv1d.bias is not None:
        conv = conv + m.conv1d.bias.float()
    # Rounded to the model dtype where the prompt path's conv output is, so both see the same values.
    xBC = F.silu(conv.to(dtype))
    x, B, C = xBC.split([m.d_inner, g * m.state, g * m.state], dim=-1)
    x = x.reshape(b, g, r, m.head_dim).float()
    dt = F.softplus(dt.float() + m.dt_bias.float()).reshape(b, g, r)
    A = -torch.exp(m.A_log.float()).reshape(g, r)
    S = state.ssm.view(b, g, r, m.head_dim, m.state)
    S.mul_(torch.exp(dt * A)[..., None, None])
    S.add_((dt[..., None] * x)[..., None] * B.reshape(b, g, 1, 1, m.state).float())
    y = (S @ C.reshape(b, g, 1, m.state, 1).float())[..., 0]  # [b, g, r, head_dim]
    y = y + m.D.float().reshape(g, r)[..., None] * x
    y = m.norm(y.reshape(b, 1, m.d_inner), z[:, None])
    return row(m.out_proj, y.to(dtype), tp)


# ---------------------------------------------------------------------------------- attention
def _qkv(a: nn.Module, qkv: torch.Tensor):
    b, L = qkv.shape[:2]
    qkv = qkv.view(b, L, a.kv_heads, a.rep + 2, a.head_dim)
    q = qkv[:, :, :, : a.rep].reshape(b, L, a.heads, a.head_dim).transpose(1, 2)
    return q, qkv[:, :, :, a.rep].transpose(1, 2), qkv[:, :, :, a.rep + 1].transpose(1, 2)


def attention_prefill(a: nn.Module, h: torch.Tensor, attention_mask: torch.Tensor | None, state: AttentionState):
    """Causal :class:`~.attention.SelfAttention` over a prompt; its keys/values go to columns ``[0, L)``."""
    from .attention import attention_mask_for

    b, L, _ = h.shape
    qkv, _ = a.linear_qkv(h)
    q, k, v = _qkv(a, qkv)
    state.keys[:, :, :L] = k
    state.values[:, :, :L] = v
    mask = attention_mask_for(attention_mask, L, True, h.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=a.rep > 1)
    out, _ = a.linear_proj(o.transpose(1, 2).reshape(b, L, a.heads * a.head_dim))
    return out


def attention_step(a: nn.Module, h: torch.Tensor, state: AttentionState, cache: HybridCache, tp: Any):
    """One token: write its key/value at ``cache.position``, attend over the valid columns."""
    b = h.shape[0]
    q, k, v = _qkv(a, column(a.linear_qkv, h))
    state.keys.index_copy_(2, cache.position, k)
    state.values.index_copy_(2, cache.position, v)
    o = F.scaled_dot_product_attention(
        q, state.keys, state.values, attn_mask=cache.key_mask[:, None, None, :], enable_gqa=a.rep > 1
    )
    return row(a.linear_proj, o.transpose(1, 2).reshape(b, 1, a.heads * a.head_dim), tp)


def mlp_step(mlp: nn.Module, h: torch.Tensor, tp: Any) -> torch.Tensor:
    return row(mlp.linear_fc2, mlp.act(column(mlp.linear_fc1, h)), tp)


# ------------------------------------------------------------------------------ whole LM
def prefill_language_model(
    lm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: HybridCache
) -> torch.Tensor:
    """Run the prompt embeddings ``[B, L, hidden]`` through every layer, filling ``cache``; returns
    the final-norm hidden states."""
    h = embeds
    for layer, state in zip(lm.decoder.layers, cache.layers):
        if isinstance(state, MambaState):
            h = h + mamba_prefill(layer.mixer, h, attention_mask, state)
        elif isinstance(state, AttentionState):
            h = h + attention_prefill(layer.self_attention, h, attention_mask, state)
        else:
            h = layer(h)
    return lm.decoder.final_norm(h)


def decode_language_model(lm: nn.Module, token_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """One decode step for tokens ``[B]``: this rank's vocabulary shard of the next logits ``[B, V/tp]``.

    Only device-side state changes (no host synchronisation), so it can be graph-captured.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

    tp = lm.tp
    emb = lm.embedding.word_embeddings
    if tp.size == 1 and type(emb) is VocabParallelEmbedding and not _hooked(emb):
        h = F.embedding(token_ids[:, None], emb.weight)
    else:
        h = lm.embedding(token_ids[:, None])
    cache.key_mask.index_fill_(1, cache.position, True)
    for layer, state in zip(lm.decoder.layers, cache.layers):
        if isinstance(state, MambaState):
            h = h + mamba_step(layer.mixer, h, state, tp)
        elif isinstance(state, AttentionState):
            h = h + attention_step(layer.self_attention, h, state, cache, tp)
        else:
            h = h + mlp_step(layer.mlp, h, tp)
    h = lm.decoder.final_norm(h)
    out = lm.output_layer
    logits = F.linear(h, out.weight) if type(out) is ColumnParallelLinear and not _hooked(out) else out(h)[0]
    if lm._pad_from < lm._local_vocab:
        logits = logits.masked_fill(
            torch.arange(logits.shape[-1], device=logits.device) >= lm._pad_from, float("-inf")
        )
    cache.position.add_(1)
    return logits[:, 0]


# ------------------------------------------------------------------------------- protocol
@dataclass
class _Graph:
    graph: Any
    tokens: torch.Tensor
    logits: torch.Tensor


class NemotronVLDecoder:
    """The :class:`nvlcore.generation.DecodableModel` protocol for a :class:`~.vlm.NemotronVLModel`
    (any TP size: every rank makes the same calls and gets the same full-vocabulary logits).

    :param model: the model, weights loaded (put in eval mode here).
    :param cuda_graph: capture the decode step once per cache shape and replay it (CUDA only):
        removes the per-kernel launch cost that dominates batch-1 decoding.
    :param compile: ``torch.compile`` the decode step (fuses the Mamba step's elementwise work);
        combines with ``cuda_graph``.
    :param suppress_context_tokens: never emit ``<image>`` / ``<video>`` (logit -inf): they stand
        for vision embeddings and mean nothing as output.
    """

    def __init__(
        self, model: nn.Module, *, cuda_graph: bool = False, compile: bool = False, suppress_context_tokens: bool = True
    ) -> None:
        self.model = model.eval()
        self.cuda_graph = cuda_graph
        cfg = model.config
        ids = (cfg.img_context_token_id, cfg.video_context_token_id) if suppress_context_tokens else ()
        self.suppressed_token_ids = sorted({int(i) for i in ids if i is not None})
        step: Callable[[torch.Tensor, HybridCache], torch.Tensor] = self._step_eager
        if compile:
            step = torch.compile(step, dynamic=False)
        self._step = step
        self._pool: dict[tuple, HybridCache] = {}
        self._graphs: dict[int, _Graph] = {}

    def parameters(self):
        return self.model.language_model.parameters()

    def allocate_cache(
        self, batch_size: int, max_length: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> HybridCache:
        """A zeroed cache. The last one is kept and reused for the same shape (a CUDA graph is bound
        to its buffers); with CUDA graphs the length is rounded up to a multiple of 256 for reuse."""
        device = torch.device(device)
        use_graph = self.cuda_graph and device.type == "cuda"
        if use_graph:
            max_length = -(-max_length // 256) * 256
        key = (batch_size, max_length, dtype, device)
        cache = self._pool.get(key)
        if cache is None:
            self._pool.clear()
            self._graphs.clear()
            cache = HybridCache.allocate(self.model.language_model, batch_size, max_length, dtype=dtype, device=device)
            self._pool[key] = cache
            if use_graph:
                self._graphs[id(cache)] = self._capture(cache)
        cache.reset()
        return cache

    def prefill(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        cache: HybridCache,
        pixel_values: torch.Tensor | None = None,
        num_frames: Sequence[int] | torch.Tensor | None = None,
        evs_pruning_rate: float | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """Vision encoder, embedding merge, optional EVS, then the prompt through the LM.

        EVS applies when ``num_frames`` is given and the pruning rate (default: the config's
        ``video_pruning_rate``) is above 0: pruned ``<video>`` positions are removed before the LM
        sees them, as transformers' ``generate`` does; rows stay left-padded.
        """
        model = self.model
        lm = model.language_model
        embeds = lm.embed(input_ids)
        vision = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            vision = model.vision_embeddings(pixel_values.to(_dtype_of(model.vision_model)))
        embeds = model.merge_embeddings(input_ids, embeds, vision)
        rate = model.config.video_pruning_rate if evs_pruning_rate is None else float(evs_pruning_rate)
        if rate > 0 and vision is not None and num_frames is not None and len(num_frames):
            keep = model._evs_keep(input_ids, vision, [int(c) for c in num_frames], rate)
            embeds, attention_mask = _compact_left(keep & attention_mask.bool(), embeds)
        cache.begin_prefill(attention_mask)
        mask = None if bool(attention_mask.all()) else attention_mask
        hidden = prefill_language_model(lm, embeds, mask, cache)
        cache.end_prefill(embeds.shape[1])
        return self._finish(lm.logits(hidden[:, -1:])[:, 0])

    def decode_step(self, token_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        if cache.phase != "decode":
            raise RuntimeError("decode_step before prefill")
        if cache.length >= cache.max_length:
            raise RuntimeError(f"the cache is full ({cache.max_length} columns); allocate room for the new tokens")
        graph = self._graphs.get(id(cache))
        if graph is not None:
            graph.tokens.copy_(token_ids)
            graph.graph.replay()
            local = graph.logits
        else:
            local = self._step(token_ids, cache)
        cache.length += 1
        return self._finish(local)

    # ----------------------------------------------------------------------------- internals
    def _step_eager(self, token_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        return decode_language_model(self.model.language_model, token_ids, cache)

    def _finish(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's logits shard -> full-vocabulary fp32 logits, placeholders suppressed."""
        lm = self.model.language_model
        tp = self.model.tp
        if tp.size > 1:
            # (Megatron's gather helper asks torch.cuda for the device, which fails on CPU/gloo.)
            shards = [torch.empty_like(local) for _ in range(tp.size)]
            torch.distributed.all_gather(shards, local.contiguous(), group=tp.group)
            local = torch.cat(shards, dim=-1)
        logits = local[..., : lm.vocab_size].to(torch.float32, copy=True)  # graph outputs are reused
        if self.suppressed_token_ids:
            logits[:, self.suppressed_token_ids] = float("-inf")
        return logits

    def _capture(self, cache: HybridCache) -> _Graph:
        """Record one decode step on ``cache``'s buffers. The warm-up steps before it (needed by
        CUDA graphs, and to compile) write into the cache, which is reset afterwards."""
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.device)
        cache.phase = "decode"
        stream = torch.cuda.Stream(cache.device)
        stream.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step(tokens, cache)
        torch.cuda.current_stream(cache.device).wait_stream(stream)
        cache.position.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step(tokens, cache)
        cache.reset()
        return _Graph(graph=graph, tokens=tokens, logits=logits)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _compact_left(keep: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the positions where ``keep`` is True, every row left-padded to the longest survivor."""
    B = keep.shape[0]
    counts = keep.sum(1)
    Lk = int(counts.max())
    out = embeds.new_zeros(B, Lk, embeds.shape[-1])
    mask = torch.zeros(B, Lk, dtype=torch.long, device=keep.device)
    for b in range(B):
        n = int(counts[b])
        out[b, Lk - n :] = embeds[b, keep[b]]
        mask[b, Lk - n :] = 1
    return out, mask
