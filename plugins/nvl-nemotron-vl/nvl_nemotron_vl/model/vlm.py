"""Nemotron Nano V2 VL training model: RADIO ViT -> pixel shuffle -> projector -> Nemotron-H LM.

Image tiles and video frames (``pixel_values``, in the order of their context tokens) become
``num_image_token`` embeddings each, which replace the ``<image>`` / ``<video>`` token embeddings in
reading order. A count mismatch is an error.

Training forward (the trainer's interface): ``forward(input_ids, labels=None, loss_mask=None,
attention_mask=None, pixel_values=None, **extra)`` returns the per-token cross-entropy ``[B, L]``
(fp32, vocab-parallel, 0 where ``labels == -100``; the trainer applies ``loss_mask``) when ``labels`` is
given, else this rank's vocabulary shard of the logits ``[B, L, padded_vocab / tp]``.

Optional EVS for video frames (``evs_pruning_rate > 0`` with ``num_frames``): pruned ``<video>``
positions are removed from the sequence the LM sees (with their labels and attention), and the
outputs are scattered back to the input positions (0 at removed positions), so shapes match the
batch. A removed position's label is dropped with it; this is exact wherever the loss mask is 0 around
video tokens (they sit in user turns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import NemotronVLConfig
from .evs import evs_retention_mask
from .lm import NemotronHLanguageModel
from .mlp import MLP
from .parallel import TPContext
from .projector import VisionProjection, pixel_shuffle
from .vit import RadioViT


class NemotronVLModel(nn.Module):
    def __init__(
        self,
        cfg: NemotronVLConfig,
        tp: TPContext,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pos_embed_mode: str = "bilinear",
        pos_embed_align_corners: bool = False,
        freeze_language_model: bool = False,
        freeze_vision_model: bool = False,
        freeze_vision_projection: bool = False,
        recompute: str = "none",
        kernels: str = "reference",
    ) -> None:
        super().__init__()
        device = torch.device(device)
        cfg.check_tensor_parallel(tp.size)
        self.config, self.tp = cfg, tp
        self.language_model = NemotronHLanguageModel(cfg.llm, tp, dtype, device)
        self.vision_model = RadioViT(cfg.vision, tp, dtype, device, pos_embed_mode=pos_embed_mode,
                                     pos_embed_align_corners=pos_embed_align_corners)
        self.vision_projection = VisionProjection(
            cfg.projector_input_size, cfg.projector_hidden_size, cfg.llm.hidden_size, cfg.projector_eps, tp, dtype,
            device,
        )
        self.freeze(language_model=freeze_language_model, vision_model=freeze_vision_model,
                    vision_projection=freeze_vision_projection)
        self.set_recompute(recompute)
        self.set_kernels(kernels)

    def set_kernels(self, choice: str) -> dict[str, str]:
        """Pick the implementations of the Mamba ops, the norms, the squared ReLU, the loss and the packed
        rows' attention (``model.kernels``; see :mod:`.kernels`): ``"auto"`` (Triton kernels on CUDA where importable),
        ``"reference"``, ``"compiled"``, ``"mamba_ssm"`` or ``"fla"``. Returns op -> implementation, for
        the run's report."""
        from .attention import SelfAttention
        from .kernels import select_kernels
        from .mamba import MambaMixer
        from .mlp import MLP, squared_relu
        from .parallel import NormedColumnParallelLinear, RMSNorm

        device = next(self.language_model.parameters()).device
        k = select_kernels(choice, device)
        self.kernels_choice, self.kernels = choice, k
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.kernels = k
            elif isinstance(module, (NormedColumnParallelLinear, RMSNorm)):
                module.norm_impl = None if k.norms is None else k.norms[module.norm_kind]
            elif isinstance(module, MLP) and module.activation == "relu2":
                module.act = k.relu2 or squared_relu
            elif isinstance(module, SelfAttention) and module.causal:
                module.packed_attention, module.record_kernel = k.packed_attention, k.record
        return self.kernel_report()

    def kernel_report(self) -> dict[str, str]:
        """Op -> implementation selected (the Mamba scan, conv, gated norm; the LM loss; attention). Packed
        attention's entry names both paths where the choice depends on the inputs; :meth:`kernels_ran`
        says which ran."""
        return {**self.kernels.names, "attention": "SDPA (causal, no dense mask on right padding)"}

    def kernels_ran(self) -> dict[str, str]:
        """Op -> the implementation(s) that actually ran since :meth:`set_kernels`, for the ops whose path
        depends on the inputs (packed attention: varlen kernel or SDPA block mask, and why)."""
        return {op: " and ".join(impls) for op, impls in self.kernels.ran.items()}

    def set_sequence_parallel(self, enabled: bool) -> None:
        """Megatron's sequence parallelism for the language model's decoder (``model.sequence_parallel``;
        :meth:`~.lm._Decoder.set_sequence_parallel`). The vision tower and the projector keep their
        activations replicated: they are a small share of a training step's activations."""
        self.language_model.decoder.set_sequence_parallel(enabled)

    def set_recompute(self, mode: str, *, vision_layers: bool | None = None, mlp_act: bool = False) -> None:
        """Activation recomputation: ``"none"``; ``"ssm"`` (Mamba conv + scan + gated norm, whose fp32
        intermediates dominate activation memory); ``"layers"`` (every LM and ViT layer).
        ``vision_layers``: recompute every ViT layer (default: under ``"layers"`` only). ``mlp_act``: the MLP
        layers of both towers free their activation's output (the LM's squared ReLU, the ViT's GELU) after the
        forward and recompute it in backward (:func:`~.mlp.discard_until_backward`), where their layers are not
        recomputed whole (which keeps only each layer's input)."""
        if mode not in ("none", "ssm", "layers"):
            raise ValueError(f"recompute must be 'none', 'ssm' or 'layers', got {mode!r}")
        self.recompute = mode
        for layer in self.language_model.decoder.layers:
            if hasattr(layer, "mixer"):
                layer.mixer.recompute = mode == "ssm"
            if isinstance(getattr(layer, "mlp", None), MLP):
                layer.mlp.recompute_act = mlp_act and mode != "layers"
        self.language_model.decoder.recompute_layers = mode == "layers"
        vit_whole = mode == "layers" if vision_layers is None else vision_layers
        self.vision_model.decoder.recompute_layers = vit_whole
        for layer in self.vision_model.decoder.layers:
            layer.mlp.recompute_act = mlp_act and not vit_whole

    def freeze(self, *, language_model: bool = False, vision_model: bool = False,
               vision_projection: bool = False) -> None:
        """Turn off gradients of whole towers (the freeze_* config flags; never turns them on): the
        core's one freezing rule (:func:`nvlcore.bridge.freeze_parameters`) over the bridge's groups."""
        from nvlcore.bridge import freeze_parameters

        from ..mapping import FREEZE_GROUPS

        freeze_parameters(self, FREEZE_GROUPS, {"language_model": language_model, "vision_model": vision_model,
                                                "vision_projection": vision_projection})

    # --------------------------------------------------------------------------------- vision
    def vision_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[T, 3, S, S]`` -> LM embeddings ``[T, num_image_token, hidden]``."""
        feats = self.vision_model(pixel_values)
        ps = self.config.patch_size
        rows, cols = pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps
        dtype = self.vision_projection.encoder.linear_fc1.weight.dtype
        shuffled = pixel_shuffle(feats.to(dtype), rows, cols, self.config.ps_version)
        return self.vision_projection(shuffled)

    def _context_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids == self.config.img_context_token_id
        if self.config.video_context_token_id is not None:
            mask |= input_ids == self.config.video_context_token_id
        return mask

    def merge_embeddings(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, vision_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Write the tiles' embeddings over the context-token embeddings, in reading order."""
        # Integer positions (one host synchronisation, which also gives the count): writing and, in
        # backward, reading them back by a boolean mask would each synchronise again.
        positions = torch.nonzero(self._context_mask(input_ids).reshape(-1)).squeeze(1)
        n_ctx = int(positions.numel())
        n_vis = 0 if vision_embeds is None else vision_embeds.shape[0] * vision_embeds.shape[1]
        if n_ctx != n_vis:
            tok = self.config.num_image_token
            raise ValueError(
                f"input_ids hold {n_ctx} image/video context tokens ({n_ctx / tok:g} tiles of {tok}) but "
                f"pixel_values give {n_vis // tok} tiles/frames ({n_vis} embeddings); every tile/frame needs "
                f"exactly {tok} context tokens"
            )
        if n_ctx == 0:
            return inputs_embeds
        hidden = inputs_embeds.shape[-1]
        out = inputs_embeds.reshape(-1, hidden).index_copy(
            0, positions, vision_embeds.reshape(-1, hidden).to(inputs_embeds.dtype))
        return out.view(inputs_embeds.shape)

    # ------------------------------------------------------------------------------------ EVS
    def _evs_keep(
        self, input_ids: torch.Tensor, vision_embeds: torch.Tensor, num_frames: Sequence[int], rate: float
    ) -> torch.Tensor:
        """Bool ``[B, L]``: positions that survive EVS (all non-video positions do)."""
        vid_id = self.config.video_context_token_id
        if vid_id is None:
            raise ValueError("EVS needs video_context_token_id in config.json")
        tok = self.config.num_image_token
        ctx_ids = input_ids[self._context_mask(input_ids)].view(-1, tok)  # one row per tile/frame, in order
        is_video = ctx_ids[:, 0] == vid_id
        frames_idx = torch.nonzero(is_video).flatten().tolist()
        counts = [int(c) for c in num_frames]
        if sum(counts) != len(frames_idx):
            raise ValueError(f"num_frames sum to {sum(counts)} but the batch has {len(frames_idx)} video frames")
        keep_tokens = torch.ones(ctx_ids.numel(), dtype=torch.bool, device=input_ids.device)
        start = 0
        for n in counts:
            tiles = frames_idx[start:start + n]
            start += n
            if n and tiles != list(range(tiles[0], tiles[0] + n)):
                raise ValueError("a video's frames must be consecutive in pixel_values")
            if n:
                mask = evs_retention_mask(vision_embeds[tiles[0]:tiles[0] + n], rate)
                keep_tokens[tiles[0] * tok:(tiles[0] + n) * tok] = mask
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        keep[self._context_mask(input_ids)] = keep_tokens
        return keep

    # -------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        num_frames: Sequence[int] | torch.Tensor | None = None,
        evs_pruning_rate: float | None = None,
        inference_params: Any = None,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: Sequence[int] | torch.Tensor | None = None,
        max_seqlen: int | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """See the module docstring. ``loss_mask`` is accepted and not used (the trainer applies it).

        ``seq_idx`` ``[B, L]`` (packed rows, from the processor's ``collate_packed``): the index of
        each token's sample in its row, padding an index of its own; every sample is then computed
        exactly as alone (Mamba conv and SSM states reset at its first token, attention block-diagonal
        causal). Tiles are merged in reading order, so each sample's images land in its own positions.
        ``cu_seqlens`` / ``max_seqlen`` (``collate_packed`` computes them on the host) are the same
        boundaries in the varlen kernels' form; without them they are computed from ``seq_idx``.
        """
        del loss_mask, extra
        from .kernels import PackedSequences

        embeds, attention_mask, labels, index = self.embed_inputs(
            input_ids, pixel_values, attention_mask, labels, num_frames=num_frames, evs_pruning_rate=evs_pruning_rate)
        if index is not None and seq_idx is not None:
            seq_idx = _compact_seq_idx(seq_idx, index)
            cu_seqlens = max_seqlen = None  # EVS moved the boundaries
        packed = PackedSequences.of(seq_idx, cu_seqlens, max_seqlen)
        hidden = self.language_model.decoder(embeds, attention_mask, inference_params, packed)
        if labels is not None and self.kernels.chunked_loss:
            from .kernels import chunked_vocab_parallel_loss

            out = chunked_vocab_parallel_loss(hidden, labels, self.language_model.logits)
        else:
            logits = self.language_model.logits(hidden)
            out = logits if labels is None else self.per_token_loss(logits, labels)
        if index is not None:
            out = _scatter_back(out, index, input_ids.shape)
        return out

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        num_frames: Sequence[int] | torch.Tensor | None = None,
        evs_pruning_rate: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The LM's input embeddings: token embeddings with the tiles' / frames' embeddings merged in.

        Returns ``(inputs_embeds, attention_mask, labels, index)``. With EVS (``evs_pruning_rate > 0``
        and ``num_frames``), pruned ``<video>`` positions are removed (rows right-padded to the longest)
        and ``index[b, j]`` is the input position of compacted position ``j`` (-1 on padding); without
        EVS ``index`` is None and the other values are returned as given. Decoding uses this for the
        prefill.
        """
        embeds = self.language_model.embed(input_ids)
        vision = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            vision = self.vision_embeddings(pixel_values)
        embeds = self.merge_embeddings(input_ids, embeds, vision)
        if evs_pruning_rate and vision is not None and num_frames is not None:
            keep = self._evs_keep(input_ids, vision, num_frames, float(evs_pruning_rate))
            if not bool(keep.all()):
                return _compact(keep, embeds, attention_mask, labels)
        return embeds, attention_mask, labels, None

    def per_token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel cross-entropy ``[B, L]`` in fp32, 0 where ``labels == -100``."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        ignore = labels < 0
        target = labels.masked_fill(ignore, 0)
        # Megatron's CE subtracts the max in place on its (fp32) input; give it a tensor of its own.
        x = logits.float() if logits.dtype != torch.float32 else logits.clone()
        loss = vocab_parallel_cross_entropy(x, target)
        return loss.masked_fill(ignore, 0.0)

    @torch.no_grad()
    def forward_inference(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inference_params: Any = None,
        last_only: bool = False,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-vocabulary logits ``[B, L or 1, vocab_size]`` (gathered over TP, padding removed).

        ``inference_params`` must be None: cached decoding is :class:`~nvl_nemotron_vl.model.decode.NemotronVLDecoder`.
        ``seq_idx`` as in :meth:`forward` (packed rows).
        """
        embeds, attention_mask, _, _ = self.embed_inputs(input_ids, pixel_values, attention_mask)
        hidden = self.language_model.decoder(embeds, attention_mask, inference_params, seq_idx)
        if last_only:
            hidden = hidden[:, -1:]
        logits = self.language_model.logits(hidden)
        if self.tp.size > 1:
            # (Megatron's gather helper allocates on CUDA; this works on gloo too.)
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=self.tp.group)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.language_model.vocab_size]


def _compact(keep: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
             labels: torch.Tensor | None):
    """Drop positions where ``keep`` is False, right-padding rows to the longest survivor."""
    B, L = keep.shape
    lengths = keep.sum(1)
    Lk = int(lengths.max())
    index = torch.full((B, Lk), -1, dtype=torch.long, device=keep.device)
    for b in range(B):
        pos = torch.nonzero(keep[b]).flatten()
        index[b, : len(pos)] = pos
    valid = index >= 0
    safe = index.clamp(min=0)
    new_embeds = torch.gather(embeds, 1, safe[:, :, None].expand(-1, -1, embeds.shape[-1]))
    new_embeds = new_embeds * valid[:, :, None].to(new_embeds.dtype)
    base_mask = attention_mask if attention_mask is not None else torch.ones_like(keep, dtype=torch.long)
    new_mask = torch.gather(base_mask, 1, safe) * valid.to(base_mask.dtype)
    new_labels = None
    if labels is not None:
        new_labels = torch.gather(labels, 1, safe).masked_fill(~valid, -100)
    return new_embeds, new_mask, new_labels, index


def _compact_seq_idx(seq_idx: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``seq_idx`` at the positions EVS kept (``index`` from :func:`_compact`); the new padding gets an
    index of its own (one past the row's largest)."""
    out = torch.gather(seq_idx, 1, index.clamp(min=0))
    pad = (seq_idx.max(dim=1, keepdim=True).values + 1).expand_as(out)
    return torch.where(index >= 0, out, pad)


def _scatter_back(out: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    B, L = shape
    full = out.new_zeros((B, L) + tuple(out.shape[2:]))
    for b in range(B):
        n = int((index[b] >= 0).sum())
        full[b, index[b, :n]] = out[b, :n]
    return full
