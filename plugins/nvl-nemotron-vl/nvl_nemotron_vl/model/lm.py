"""Nemotron-H hybrid language model (Mamba2 / attention / MLP layers from ``hybrid_override_pattern``).

::

    h = embedding(input_ids)                       # vocab-parallel
    for layer in layers:  h = h + mixer(h)         # each mixer starts with its own RMSNorm (folded)
    logits = output_layer(final_norm(h))           # untied, vocab-parallel: [b, L, padded_vocab / tp]

Every layer trains and decodes (``forward`` with an optional :class:`~.cache.HybridCache`, ``step``
for one token, ``allocate_inference_cache``); :meth:`NemotronHLanguageModel.step` is one decode step of
the whole LM. Module names follow Megatron-Core's hybrid model: ``embedding.word_embeddings``,
``decoder.layers.N.{mixer | self_attention | mlp}``, ``decoder.final_norm``, ``output_layer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import LLMConfig
from .attention import SelfAttention
from .cache import HybridCache
from .mamba import MambaMixer
from .mlp import MLP
from .parallel import RMSNorm, TPContext, column_linear, gather_sequence, megatron_config, scatter_sequence


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Rows of the embedding/output tables: the vocabulary rounded up to a multiple of the TP size.

    Padded rows are zero in checkpoints-to-model loading and their logits are masked to -inf, so the
    padding never changes a probability.
    """
    return -(-vocab_size // tp_size) * tp_size


class MambaLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, tp: TPContext, dtype, device, layer_number: int | None = None) -> None:
        super().__init__()
        self.mixer = MambaMixer(cfg, tp, dtype, device, layer_number=layer_number)
        #: ``h`` is a sequence shard in training forwards (set by the model's ``set_sequence_parallel``).
        self.sequence_parallel = False
        #: Training forwards pass tensors only (:meth:`set_graph_inputs`).
        self.graph_inputs = False

    def set_graph_inputs(self, enabled: bool) -> None:
        """In training forwards the decoder calls this layer with tensors or None only, packed rows as their
        ``seq_idx`` tensor ``[b, L]`` (fixed shape, no sample offsets): what a CUDA graph captures
        (``model.cuda_graph_impl=local``)."""
        self.graph_inputs = bool(enabled)
        self.mixer.fixed_shape_packing = bool(enabled)

    def forward(self, h: torch.Tensor, attention_mask=None, inference_params=None, seq_idx=None) -> torch.Tensor:
        sp = self.sequence_parallel and inference_params is None
        return h + self.mixer(h, attention_mask, inference_params, seq_idx, sequence_parallel=sp)

    def step(self, h: torch.Tensor, inference_params: HybridCache) -> torch.Tensor:
        return h + self.mixer.step(h, inference_params)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, *, dtype, device) -> Any:
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, device=device)


class AttentionLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, tp: TPContext, dtype, device, layer_number: int | None = None) -> None:
        super().__init__()
        self.self_attention = SelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, bias=False,
            norm="rms", eps=cfg.layer_norm_epsilon, causal=True, tp=tp, dtype=dtype, device=device,
            layer_number=layer_number,
        )
        #: ``h`` is a sequence shard in training forwards (set by the model's ``set_sequence_parallel``).
        self.sequence_parallel = False
        #: never graphed: packed attention takes sample offsets whose count varies
        self.graph_inputs = False

    def forward(self, h: torch.Tensor, attention_mask=None, inference_params=None, seq_idx=None) -> torch.Tensor:
        sp = self.sequence_parallel and inference_params is None
        return h + self.self_attention(h, attention_mask, inference_params, seq_idx, sequence_parallel=sp)

    def step(self, h: torch.Tensor, inference_params: HybridCache) -> torch.Tensor:
        return h + self.self_attention.step(h, inference_params)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, *, dtype, device) -> Any:
        return self.self_attention.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, device=device)


class MLPLayer(nn.Module):
    """Stateless: the cache holds nothing for it, and :meth:`step` is its forward on one token."""

    def __init__(self, cfg: LLMConfig, tp: TPContext, dtype, device, layer_number: int | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, activation="relu2", bias=False, norm="rms",
                       eps=cfg.layer_norm_epsilon, tp=tp, dtype=dtype, device=device)
        #: ``h`` is a sequence shard in training forwards (set by the model's ``set_sequence_parallel``).
        self.sequence_parallel = False
        #: Training forwards pass tensors only (:meth:`set_graph_inputs`).
        self.graph_inputs = False

    def set_graph_inputs(self, enabled: bool) -> None:
        """In training forwards the decoder calls this layer with tensors or None only (it reads ``h``
        alone): what a CUDA graph captures (``model.cuda_graph_impl=local``)."""
        self.graph_inputs = bool(enabled)

    def forward(self, h: torch.Tensor, attention_mask=None, inference_params=None, seq_idx=None) -> torch.Tensor:
        return h + self.mlp(h, sequence_parallel=self.sequence_parallel and inference_params is None)

    def step(self, h: torch.Tensor, inference_params: HybridCache) -> torch.Tensor:
        from .step_ops import column, row

        return h + row(self.mlp.linear_fc2, self.mlp.act(column(self.mlp.linear_fc1, h)), self.tp)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, *, dtype, device) -> None:
        return None


LAYER_CLASSES = {"mamba": MambaLayer, "attention": AttentionLayer, "mlp": MLPLayer}


class _Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, tp: TPContext, dtype, device) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.word_embeddings = VocabParallelEmbedding(
            vocab, hidden, init_method=lambda _: None, config=megatron_config(tp, dtype, device), tp_group=tp.group
        )
        self.word_embeddings.weight.tensor_model_parallel = True
        self.word_embeddings.weight.partition_dim = 0
        self.word_embeddings.weight.partition_stride = 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class _Decoder(nn.Module):
    def __init__(self, cfg: LLMConfig, tp: TPContext, dtype, device) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LAYER_CLASSES[t](cfg, tp, dtype, device, layer_number=i) for i, t in enumerate(cfg.layer_types)
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype, device)
        self.tp = tp
        #: Recompute each layer in backward (full activation checkpointing; set by the model).
        self.recompute_layers = False
        #: Sequence parallelism in forwards without a decoding cache (:meth:`set_sequence_parallel`).
        self.sequence_parallel = False

    def set_sequence_parallel(self, enabled: bool) -> None:
        """Megatron's sequence parallelism (``model.sequence_parallel``): in forwards without a decoding
        cache, the residual stream and the norms hold this rank's ``1 / tp`` of the sequence; each layer's
        column-parallel input projection all-gathers it, its row-parallel output projection
        reduce-scatters. Needs tensor parallelism (a TP size of 1 has nothing to split over)."""
        if enabled and self.tp.size < 2:
            raise ValueError("model.sequence_parallel=true needs model.tensor_model_parallel_size > 1 (the sequence "
                             "is split over the tensor-parallel ranks); set it false")
        self.sequence_parallel = bool(enabled)
        for layer in self.layers:
            layer.sequence_parallel = bool(enabled)

    def forward(self, h: torch.Tensor, attention_mask=None, inference_params=None, seq_idx=None) -> torch.Tensor:
        """``seq_idx`` ``[b, L]`` (or :class:`~.kernels.PackedSequences`): packed samples (sample index per
        token; padding an index of its own): Mamba states reset and attention stays within each sample.
        ``inference_params``: a :class:`~.cache.HybridCache` in its prefill phase, which every layer fills."""
        from torch.utils.checkpoint import checkpoint

        from .attention import is_right_padded
        from .kernels import PackedSequences

        # Once for all layers (a tensor's sample boundaries are found with one host synchronisation; the
        # training batch brings them from the processor, so none is needed).
        seq_idx = PackedSequences.of(seq_idx)
        if seq_idx is not None and inference_params is None:
            # Packed rows: padding is a sample of its own, which no real token's Mamba state or attention
            # reaches, so the mask changes nothing that is used (and checking it would cost a GPU sync).
            attention_mask = None
        elif attention_mask is not None and inference_params is None and is_right_padded(attention_mask):
            # Every layer is causal (Mamba, causal attention) or per-token (MLP): with padding only after
            # the real tokens, no real token can see a padded one, so the mask changes nothing that is
            # used. Dropping it skips the per-layer masking passes and keeps attention on flash kernels.
            attention_mask = None
        sp = self.sequence_parallel and inference_params is None
        if sp:
            length = h.shape[1]
            h, attention_mask, seq_idx = self._pad_for_sequence_parallel(h, attention_mask, seq_idx)
            h = scatter_sequence(h, self.tp)
        for layer in self.layers:
            if self.recompute_layers and torch.is_grad_enabled() and inference_params is None:
                h = checkpoint(layer, h, attention_mask, None, seq_idx, use_reentrant=False)
            elif layer.graph_inputs and inference_params is None:
                # tensors only, of the batch's shape (a CUDA graph's inputs): packed rows as seq_idx alone
                h = layer(h, attention_mask, None, None if seq_idx is None else seq_idx.seq_idx)
            else:
                h = layer(h, attention_mask, inference_params, seq_idx)
        if sp:
            # The final norm on the shard (its weight's gradient summed over the ranks), then the whole
            # sequence again for the output layer and the loss, which see every token on every rank.
            return gather_sequence(self.final_norm(h, self.tp), self.tp)[:, :length]
        return self.final_norm(h)

    def _pad_for_sequence_parallel(self, h: torch.Tensor, attention_mask: torch.Tensor | None,
                                   seq_idx: Any) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """``h`` padded at the end to a multiple of the TP size, the mask with it (as padding) and packed
        rows' samples with a sample of their own for the padding. Every layer is causal or per-token, and
        a packed sample sees only itself, so tokens after the last one change no earlier output."""
        from .kernels import PackedSequences

        b, length, tp = h.shape[0], h.shape[1], self.tp.size
        pad = -length % tp
        if not pad:
            return h, attention_mask, seq_idx
        h = torch.cat([h, h.new_zeros(b, pad, *h.shape[2:])], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(b, pad)], dim=1)
        if seq_idx is not None:
            idx = seq_idx.seq_idx
            idx = torch.cat([idx, (idx[:, -1:] + 1).expand(b, pad)], dim=1)
            # The offsets over the flattened rows, moved on the host (no synchronisation): each row's
            # samples shift by the padding of the rows before it, and each row gains one padding sample.
            starts = seq_idx.cu_seqlens_cpu[:-1].to(torch.int64)
            moved = starts + (starts // length) * pad
            padding = torch.arange(b, dtype=torch.int64) * (length + pad) + length
            cu = torch.cat([torch.cat([moved, padding]).sort().values, torch.tensor([b * (length + pad)])])
            seq_idx = PackedSequences.of(idx, cu.to(torch.int32), max(seq_idx.max_seqlen, pad))
        return h, attention_mask, seq_idx


class NemotronHLanguageModel(nn.Module):
    def __init__(self, cfg: LLMConfig, tp: TPContext, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, tp.size)
        self.embedding = _Embedding(self.padded_vocab_size, cfg.hidden_size, tp, dtype, device)
        self.decoder = _Decoder(cfg, tp, dtype, device)
        self.output_layer = column_linear(cfg.hidden_size, self.padded_vocab_size, bias=False, tp=tp, dtype=dtype,
                                          device=device)
        # Columns of this rank's logits shard that are vocabulary padding (masked to -inf).
        local = self.padded_vocab_size // tp.size
        start = tp.rank * local
        self._pad_from = max(0, min(local, cfg.vocab_size - start))
        self._local_vocab = local

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel():
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host synchronisation for both
            if high >= self.vocab_size or low < 0:
                raise ValueError(f"input_ids hold ids outside [0, vocab_size={self.vocab_size}): min {low}, max {high}")
        return self.embedding(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits, ``[b, L, padded_vocab / tp]``."""
        logits, _ = self.output_layer(hidden)
        if self._pad_from < self._local_vocab:
            logits = logits.clone()
            logits[..., self._pad_from:] = float("-inf")
        return logits

    def allocate_inference_cache(self, batch_size: int, max_length: int, *, dtype: torch.dtype,
                                 device: torch.device | str) -> HybridCache:
        """A zeroed :class:`~.cache.HybridCache`: every layer allocates its own state."""
        device = torch.device(device)
        cache = HybridCache(batch_size, max_length, device, dtype)
        cache.layers = [layer.allocate_inference_cache(batch_size, max_length, dtype=dtype, device=device)
                        for layer in self.decoder.layers]
        return cache

    def step(self, token_ids: torch.Tensor, inference_params: HybridCache) -> torch.Tensor:
        """One decode step for tokens ``[B]``: this rank's vocabulary shard of the next logits ``[B, V/tp]``.

        Every layer's :meth:`step` runs on the new token; only device-side state changes (no host
        synchronisation), so the step can be graph-captured and compiled.
        """
        from .step_ops import column, embedding

        cache = inference_params
        h = embedding(self.embedding.word_embeddings, token_ids[:, None], self.tp)
        cache.key_mask.index_fill_(1, cache.position, True)
        for layer in self.decoder.layers:
            h = layer.step(h, cache)
        logits = column(self.output_layer, self.decoder.final_norm(h))
        if self._pad_from < self._local_vocab:
            logits = logits.masked_fill(
                torch.arange(logits.shape[-1], device=logits.device) >= self._pad_from, float("-inf")
            )
        cache.position.add_(1)
        return logits[:, 0]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inference_params: Any = None,
    ) -> torch.Tensor:
        """Vocab-parallel logits from token ids or precomputed embeddings."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return self.logits(self.decoder(h, attention_mask, inference_params))
