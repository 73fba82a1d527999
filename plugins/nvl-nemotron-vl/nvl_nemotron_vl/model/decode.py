"""Generation with Nemotron Nano V2 VL: the :class:`nvlcore.generation.DecodableModel` protocol over the
training model, with a :class:`~.cache.HybridCache`.

The math lives in the layers, which train and decode (``forward`` with an optional cache, ``step``,
``allocate_inference_cache``; :mod:`.mamba`, :mod:`.attention`, :mod:`.lm`); this module only drives
them:

* **prefill**: vision encoder, embedding merge and EVS as in training, then the prompt through the
  language model's decoder with the cache in its ``"prefill"`` phase: every layer runs its training
  forward (the model's selected kernels, adapters attached as hooks) and leaves its state behind
  (Mamba: the last ``K - 1`` conv inputs and the SSM state after the prompt; attention: the prompt's
  keys/values in columns ``[0, L)``);
* **decode**: :meth:`~.lm.NemotronHLanguageModel.step` appends one token per row; every Mamba layer
  does constant work, attention writes column ``position`` and attends under the cache's key mask.
  Shapes never change during decoding, so the step can be captured in a CUDA graph (and compiled).

Nemotron-H has no positional embedding, so left padding needs no position shift. Logits are returned
for the full vocabulary (gathered over tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cache import HybridCache


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
            cache = self.model.language_model.allocate_inference_cache(batch_size, max_length, dtype=dtype,
                                                                        device=device)
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
        hidden = lm.decoder(embeds, mask, cache)
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
        return self.model.language_model.step(token_ids, cache)

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
