"""Activation memory of Nemotron Nano V2 VL for ``nvl finetune``'s memory plan (no torch import).

Bytes one rank keeps for backward per token, counted from the tensors each layer saves (bf16 under
autocast; the residual stream in fp32 where the tower trains fp32 masters, in bf16 where its base is
frozen and stored in bf16). Per language-model token, TP-local widths divided by ``tp``::

    mamba      res*h + 2h + 2(2 d_in + 2 g N + heads)/tp + 2(d_in + 2 g N)/tp + 2 d_in/tp + 2 d_in/tp
               (norm input and output, in_proj output z|x|B|C|dt, conv output, scan output, gated-norm output)
    MLP        res*h + 2h + 2 ffn/tp + 2 ffn/tp            (norm, fc1 output, squared-ReLU output)
    attention  res*h + 2h + 2(q + 2 kv) d/tp + 2 q d/tp     (norm, QKV, core output; flash keeps no scores)

Per ViT token per layer (``prefix + patches`` tokens a tile): ``res*H + 2H + 6H/tp + 2H/tp`` (attention)
and ``res*H + 2H + 4 ffn/tp`` (MLP), times :data:`VIT_CALIBRATION`. ``selective`` recomputation keeps a Mamba
layer's norm input and output and the recomputed mixer's input, in_proj's output ``2(2 d_in + 2 g N + heads)/tp``
(``recompute_modules`` ``mamba``; with ``vision_tower`` the ViT layers count as
under ``full``; with ``mlp_act`` an MLP layer of either tower keeps its fc1 output but not its activation's); ``full``
keeps every layer's input, plus one layer's activations while it is recomputed, a transient of backward
that never coexists with the loss chunk's logits (the plan counts the larger of the two). docs/memory.md
compares the result with the peaks measured on GPUs.

Under sequence parallelism (``model.sequence_parallel``) the LM's ``res*h + 2h`` per layer (the norm's
input and its output, which the column-parallel linear keeps as a shard and gathers again in backward),
a layer's kept input under recomputation and the final norm's input are ``1/tp`` of the above; the
output layer still keeps the gathered ``2h``. The vision tower is not sequence-parallel.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import NemotronVLConfig

#: Tokens per chunk of the training loss (``model.kernels.chunked_vocab_parallel_loss``).
LOSS_CHUNK_TOKENS = 2048
#: Bytes per logit of one loss chunk while its backward runs (the chunk's forward is recomputed there): the
#: bf16 logits, their fp32 copy that becomes the softmax, the fp32 gradient and its bf16 cast.
LOSS_BYTES_PER_LOGIT = 6

#: The ViT keeps ~1.2x what the formula counts (measured: packed MedPix-like rows, 12b-shape on an H200,
#: bench/results/finetune_gpu.json, 2026-11-30 visit F; the LM formula needed no factor).
VIT_CALIBRATION = 1.2
BF16 = 2


def lm_layer_bytes(cfg: NemotronVLConfig, kind: str, *, tp: int, res: int, sequence_parallel: bool = False) -> float:
    """Bytes one token keeps in one language-model layer of ``kind`` (no recomputation)."""
    llm = cfg.llm
    h = llm.hidden_size
    norm = (res * h + BF16 * h) / (tp if sequence_parallel else 1)
    if kind == "mamba":
        d_in, gn, heads = llm.mamba_d_inner, llm.n_groups * llm.ssm_state_size, llm.mamba_num_heads
        return norm + BF16 * (2 * d_in + 2 * gn + heads + (d_in + 2 * gn) + 2 * d_in) / tp
    if kind == "mlp":
        return norm + BF16 * 2 * llm.intermediate_size / tp
    q, kv, d = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    return norm + BF16 * ((q + 2 * kv) * d + q * d) / tp + 4 * q / tp


def lm_bytes_per_token(cfg: NemotronVLConfig, *, tp: int, res: int, recompute: str | None,
                       offload_layers: int = 0, recompute_modules: tuple[str, ...] = ("mamba",),
                       sequence_parallel: bool = False) -> float:
    """Bytes one language-model token keeps over all layers (plus the final norm)."""
    kinds = cfg.llm.layer_types
    h = cfg.llm.hidden_size
    sp = tp if sequence_parallel else 1  # what lies between the TP regions is split over the ranks
    full = [lm_layer_bytes(cfg, k, tp=tp, res=res, sequence_parallel=sequence_parallel) for k in kinds]
    mamba = recompute == "selective" and "mamba" in recompute_modules
    # mlp_act: the squared ReLU's output is freed until backward (linear_fc1's output stays, for its backward)
    act = BF16 * cfg.llm.intermediate_size / tp if recompute == "selective" and "mlp_act" in recompute_modules else 0
    llm = cfg.llm
    # the recomputed mixer's input, which the checkpoint keeps: in_proj's output z|x|B|C|dt (whole sequence)
    zxbcdt = BF16 * (2 * llm.mamba_d_inner + 2 * llm.n_groups * llm.ssm_state_size + llm.mamba_num_heads) / tp
    kept = [res * h / sp] * len(kinds) if recompute == "full" else [
        (res * h + BF16 * h) / sp + zxbcdt if (mamba and k == "mamba") else b - (act if k == "mlp" else 0)
        for k, b in zip(kinds, full, strict=True)]
    if offload_layers:  # the first layers' activations live on the host until their backward (whatever their kind)
        kept = [0.0] * min(offload_layers, len(kept)) + kept[offload_layers:]
    return sum(kept) + res * h / sp + BF16 * h


def lm_transient_per_token(cfg: NemotronVLConfig, *, tp: int, res: int, recompute: str | None,
                           sequence_parallel: bool = False) -> float:
    """Under ``full``: bytes per token of the one language-model layer being recomputed in backward."""
    if recompute != "full":
        return 0.0
    return max(lm_layer_bytes(cfg, k, tp=tp, res=res, sequence_parallel=sequence_parallel)
               for k in cfg.llm.layer_types)


def _vit_layer_bytes(cfg: NemotronVLConfig, *, tp: int, res: int) -> float:
    v = cfg.vision
    H, ffn = v.hidden_size, v.intermediate_size
    return (res * H + BF16 * H + BF16 * 4 * H / tp) + (res * H + BF16 * H + BF16 * 2 * ffn / tp)


def vit_bytes_per_tile(cfg: NemotronVLConfig, *, tp: int, res: int, recompute: str | None,
                       mlp_act: bool = False) -> float:
    """Bytes one image tile keeps in the ViT and the projector (``mlp_act``: without the GELU's output)."""
    v = cfg.vision
    tokens = v.num_prefix_tokens + cfg.grid**2
    act = BF16 * v.intermediate_size / tp if mlp_act else 0.0
    per_layer = res * v.hidden_size if recompute == "full" else _vit_layer_bytes(cfg, tp=tp, res=res) - act
    vit = tokens * v.num_layers * per_layer * VIT_CALIBRATION
    img = cfg.num_image_token
    projector = img * (4 * cfg.projector_input_size + BF16 * 2 * cfg.projector_hidden_size / tp)
    return vit + projector


def activation_bytes(cfg: NemotronVLConfig, *, tokens: int, tiles: int, recompute: str | None, tp_size: int,
                     trained: Mapping[str, bool], offload_layers: int = 0,
                     adapted: Mapping[str, bool] | None = None,
                     recompute_modules: tuple[str, ...] = ("mamba",),
                     sequence_parallel: bool = False) -> dict[str, float]:
    """Per phase, the bytes one micro-batch keeps for backward (see the module docstring).

    A frozen vision tower and projector without adapters keep nothing (no gradient flows into them); the language model
    always keeps its activations, since the loss's gradient passes through it to whatever trains.
    """
    lm_res = 4 if trained.get("language_model") else BF16
    vit_res = 4 if trained.get("vision_model") else BF16
    adapted = adapted or {}
    # adapters in a frozen tower need its activations too (their gradients pass through it)
    vit_trains = bool(tiles) and any(trained.get(g) or adapted.get(g) for g in ("vision_model", "vision_projection"))
    vit_full = recompute == "full" or (recompute == "selective" and "vision_tower" in recompute_modules)
    out = {"language model": tokens * lm_bytes_per_token(cfg, tp=tp_size, res=lm_res, recompute=recompute,
                                                        offload_layers=offload_layers,
                                                        recompute_modules=recompute_modules,
                                                        sequence_parallel=sequence_parallel)}
    # Backward's largest transient, beside everything still kept: one loss chunk's logits first, then the LM's
    # layer being recomputed (full), then the ViT's (full, or selective with vision_tower). They come one after
    # another and never coexist, so the plan counts the largest only (a layer, rarely: the chunk is ~1.6 GB).
    transients = {
        "loss": min(tokens, LOSS_CHUNK_TOKENS) * cfg.llm.vocab_size / tp_size * LOSS_BYTES_PER_LOGIT,
        "recomputed layer": max(
            tokens * lm_transient_per_token(cfg, tp=tp_size, res=lm_res, recompute=recompute,
                                            sequence_parallel=sequence_parallel),
            tiles * (cfg.vision.num_prefix_tokens + cfg.grid**2) * _vit_layer_bytes(cfg, tp=tp_size, res=vit_res)
            * VIT_CALIBRATION if vit_trains and vit_full else 0.0),
    }
    largest = max(transients, key=lambda k: transients[k])
    out[largest] = transients[largest]
    if tiles:
        mlp_act = recompute == "selective" and "mlp_act" in recompute_modules and not vit_full
        out["vision tower"] = tiles * vit_bytes_per_tile(cfg, tp=tp_size, res=vit_res,
                                                         recompute="full" if vit_full else recompute,
                                                         mlp_act=mlp_act) if vit_trains else 0.0
    return out


def workload_upper_bound(cfg: NemotronVLConfig, *, seq_length: int, micro_batch_size: int, packed: bool,
                         max_num_tiles: int = 12) -> tuple[int, int]:
    """The most tokens and tiles a micro-batch can hold: full rows, as many tiles as the row has room for
    (one image of ``max_num_tiles`` + thumbnail per row unpacked)."""
    per_row = seq_length // cfg.num_image_token
    if not packed:
        per_row = min(per_row, max_num_tiles + int(cfg.use_thumbnail))
    return seq_length * micro_batch_size, per_row * micro_batch_size
