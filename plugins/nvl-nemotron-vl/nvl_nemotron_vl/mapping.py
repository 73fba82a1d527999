"""Weight mapping between HF ``NemotronH_Nano_VL_V2`` checkpoints and the training model, as one table.

Three faces of every weight:

* **HF tensors**: the checkpoint's keys and layouts (``language_model.backbone.layers.3.mixer.in_proj.weight``).
* **Components**: logical, full-shape tensors keyed by the training (Megatron-style) parameter name,
  with fused parameters stored as their parts (``...mixer.in_proj.weight.z``, ``.x``, ``.B``, ``.C``,
  ``.dt``; ``...linear_qkv.weight.q``, ``.k``, ``.v``). A checkpoint of components loads at any TP size.
* **TP-local parameters**: what rank ``r`` of ``tp`` holds in ``model.named_parameters()``.

:func:`mapping_table` lists one :class:`nvlcore.mapping.ParamMapping` per training parameter (the
core's public mapping types; the bridge hands the table to the core through
:meth:`~nvl_nemotron_vl.bridge.NemotronVLBridge.mapping_table`), each an instance of a transform kind:

=========================  ===================  =====================================================
parameter                  kind                 HF  <->  components
=========================  ===================  =====================================================
embeddings, ``lm_head``    ``VocabMapping``     same tensor; TP pads the rows to a multiple of tp
LM ``linear_qkv``          ``QKVMapping``       ``q_proj``, ``k_proj``, ``v_proj`` -> ``q``, ``k``, ``v``
ViT ``linear_qkv``         ``QKVMapping``       fused ``attn.qkv`` rows ``[Q; K; V]`` -> ``q``, ``k``, ``v``
Mamba ``in_proj``          ``PartsMapping``     rows ``[z | x | B | C | dt]`` -> ``z, x, B, C, dt``
Mamba ``conv1d``           ``PartsMapping``     channels ``[x | B | C]`` -> ``x, B, C``
everything else            ``IdentityMapping``  same tensor, chunked on ``tp_dim`` (or replicated)
=========================  ===================  =====================================================

Norms are folded: the HF pre-mixer ``layers.N.norm.weight`` is the ``layer_norm_weight`` of the layer's
first linear (``mixer.in_proj``, ``self_attention.linear_qkv`` or ``mlp.linear_fc1``), likewise the
ViT's ``norm1``/``norm2`` and the projector's ``mlp1.0``.

HF tensors with no training counterpart are **carried** (:data:`CARRIED_HF_KEYS`): RADIO's
``input_conditioner.norm_mean``/``norm_std`` (the preprocessor normalises) and ``summary_idxs``.
Export copies them from the source checkpoint so it reproduces every tensor.

All transforms are pure tensor reshapes/concatenations; each inverse is exact (tested at tp 1, 2, 4).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from nvlcore.checkpoint import MegatronBridgeNames
from nvlcore.mapping import (  # noqa: F401  (the table's types and helpers, re-exported for this plugin's users)
    IdentityMapping,
    ParamMapping,
    PartsMapping,
    QKVMapping,
    VocabMapping,
    by_megatron_name,
    component_owner,
    components_to_hf,
    components_to_local,
    hf_to_components,
    local_to_components,
)
from nvlcore.mapping import classify_hf_keys as _classify

if TYPE_CHECKING:
    from .config import NemotronVLConfig

LM_HF = "language_model.backbone."
VIT_HF = "vision_model.radio_model.model."

#: HF keys that have no parameter in the training model; export carries them over from the source.
CARRIED_HF_KEYS = (
    "vision_model.radio_model.input_conditioner.norm_mean",
    "vision_model.radio_model.input_conditioner.norm_std",
    "vision_model.radio_model.summary_idxs",
)

#: Megatron-Bridge's parameter names are nvl's training names under this prefix: its ``NemotronVLModel``
#: wraps megatron-core's ``LLaVAModel`` as ``llava_model`` (Megatron-Bridge,
#: ``src/megatron/bridge/models/nemotron_vl/modeling_nemotron_vl.py`` and the ``llava_model.*`` names of
#: ``nemotron_vl_bridge.py``'s mapping registry, repo NVIDIA-NeMo/Megatron-Bridge).
MEGATRON_BRIDGE_PREFIX = "llava_model."
#: RADIO's ``TransformerBlock`` (megatron-core ``models/vision/radio.py``) is homogeneous, so its
#: ``sharded_state_dict`` stacks the layers on a leading axis (``transformer/transformer_block.py``);
#: the language model's ``MambaStack`` keeps one key per layer (``ssm/mamba_block.py``).
MEGATRON_BRIDGE_STACKED = ("vision_model.decoder.layers.",)
#: The model provider class in Megatron-Bridge's run_config.yaml (``nemotron_vl_provider.py``).
MEGATRON_BRIDGE_PROVIDER = "megatron.bridge.models.nemotron_vl.nemotron_vl_provider.NemotronVLModelProvider"

#: The groups the ``freeze_<group>`` flags name -> the parameter prefix each freezes.
FREEZE_GROUPS = {"language_model": "language_model", "vision_model": "vision_model",
                 "vision_projection": "vision_projection"}

#: Row parts of Mamba's fused ``in_proj`` and ``conv1d`` (Megatron's MambaMixer layout).
IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
CONV1D_PARTS = ("x", "B", "C")


# ------------------------------------------------------------------------------------ the table
def mapping_table(cfg: NemotronVLConfig) -> list[ParamMapping]:
    """Every training parameter of the model described by ``cfg``, with its HF keys and transform."""
    llm, vis = cfg.llm, cfg.vision
    Id = IdentityMapping
    table: list[ParamMapping] = [
        VocabMapping("language_model.embedding.word_embeddings.weight", (LM_HF + "embeddings.weight",),
                     llm.vocab_size),
        Id("language_model.decoder.final_norm.weight", (LM_HF + "norm_f.weight",)),
        VocabMapping("language_model.output_layer.weight", ("language_model.lm_head.weight",), llm.vocab_size),
    ]
    gn = llm.n_groups * llm.ssm_state_size
    mamba_units = (("llm_config.n_groups", llm.n_groups), ("llm_config.mamba_num_heads", llm.mamba_num_heads))
    in_proj = tuple(zip(IN_PROJ_PARTS, (llm.mamba_d_inner, llm.mamba_d_inner, gn, gn, llm.mamba_num_heads),
                        strict=True))
    conv1d = tuple(zip(CONV1D_PARTS, (llm.mamba_d_inner, gn, gn), strict=True))
    for i, kind in enumerate(llm.layer_types):
        p, h = f"language_model.decoder.layers.{i}.", f"{LM_HF}layers.{i}."
        if kind == "mamba":
            m, hm = p + "mixer.", h + "mixer."
            table += [
                Id(m + "in_proj.layer_norm_weight", (h + "norm.weight",)),
                PartsMapping(m + "in_proj.weight", (hm + "in_proj.weight",), in_proj, tp_units=mamba_units),
                PartsMapping(m + "conv1d.weight", (hm + "conv1d.weight",), conv1d, tp_units=mamba_units),
            ]
            if llm.use_conv_bias:
                table.append(PartsMapping(m + "conv1d.bias", (hm + "conv1d.bias",), conv1d, tp_units=mamba_units))
            table += [Id(m + n, (hm + n,), 0, tp_units=mamba_units) for n in ("A_log", "D", "dt_bias", "norm.weight")]
            table.append(Id(m + "out_proj.weight", (hm + "out_proj.weight",), 1, tp_units=mamba_units))
        elif kind == "attention":
            a, hm = p + "self_attention.", h + "mixer."
            table += [
                Id(a + "linear_qkv.layer_norm_weight", (h + "norm.weight",)),
                QKVMapping(a + "linear_qkv.weight", (hm + "q_proj.weight", hm + "k_proj.weight", hm + "v_proj.weight"),
                           llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim),
                Id(a + "linear_proj.weight", (hm + "o_proj.weight",), 1),
            ]
        else:
            f, hm = p + "mlp.", h + "mixer."
            table += [
                Id(f + "linear_fc1.layer_norm_weight", (h + "norm.weight",)),
                Id(f + "linear_fc1.weight", (hm + "up_proj.weight",), 0),
                Id(f + "linear_fc2.weight", (hm + "down_proj.weight",), 1),
            ]

    pg = VIT_HF + "patch_generator."
    table += [
        Id("vision_model.class_token", (pg + "cls_token.token",)),
        Id("vision_model.position_embeddings", (pg + "pos_embed",)),
        Id("vision_model.embedder.weight", (pg + "embedder.weight",)),
    ]
    qkv_sizes = (vis.num_attention_heads, vis.num_attention_heads, vis.head_dim)
    for i in range(vis.num_layers):
        p, h = f"vision_model.decoder.layers.{i}.", f"{VIT_HF}blocks.{i}."
        a, f = p + "self_attention.", p + "mlp."
        table += [
            Id(a + "linear_qkv.layer_norm_weight", (h + "norm1.weight",)),
            Id(a + "linear_qkv.layer_norm_bias", (h + "norm1.bias",)),
            QKVMapping(a + "linear_qkv.weight", (h + "attn.qkv.weight",), *qkv_sizes),
            QKVMapping(a + "linear_qkv.bias", (h + "attn.qkv.bias",), *qkv_sizes),
            Id(a + "linear_proj.weight", (h + "attn.proj.weight",), 1),
            Id(a + "linear_proj.bias", (h + "attn.proj.bias",)),
            Id(f + "linear_fc1.layer_norm_weight", (h + "norm2.weight",)),
            Id(f + "linear_fc1.layer_norm_bias", (h + "norm2.bias",)),
            Id(f + "linear_fc1.weight", (h + "mlp.fc1.weight",), 0),
            Id(f + "linear_fc1.bias", (h + "mlp.fc1.bias",), 0),
            Id(f + "linear_fc2.weight", (h + "mlp.fc2.weight",), 1),
            Id(f + "linear_fc2.bias", (h + "mlp.fc2.bias",)),
        ]
    e = "vision_projection.encoder."
    table += [
        Id(e + "linear_fc1.layer_norm_weight", ("mlp1.0.weight",)),
        Id(e + "linear_fc1.weight", ("mlp1.1.weight",), 0),
        Id(e + "linear_fc2.weight", ("mlp1.3.weight",), 1),
    ]
    return table


def megatron_bridge_names(cfg: NemotronVLConfig) -> MegatronBridgeNames:
    """How Megatron-Bridge's checkpoints name this model's tensors. Besides the prefix and the stacked
    ViT layers: the vocabulary-parallel embedding and output layer are padded (``make_vocab_size_divisible_by``
    128), Mamba's ``in_proj``/``conv1d`` are stored as their parts (megatron-core ``MambaMixer.sharded_state_dict``:
    the same ``.z .x .B .C .dt`` suffixes as :data:`IN_PROJ_PARTS`) and ``linear_qkv`` fused in its
    per-group layout; the adapters of Megatron-Bridge's LoRA are ``<linear>.adapter.linear_in/linear_out.weight``
    (``peft/adapter_wrapper.py``, ``peft/utils.py``), the names nvl-lora uses."""
    vocab = cfg.llm.vocab_size
    return MegatronBridgeNames(
        prefix=MEGATRON_BRIDGE_PREFIX, stacked=MEGATRON_BRIDGE_STACKED,
        padded_rows={"language_model.embedding.word_embeddings.weight": vocab,
                     "language_model.output_layer.weight": vocab},
        make_vocab_size_divisible_by=128, model_target=MEGATRON_BRIDGE_PROVIDER)


# ------------------------------------------------------------------------------ whole-model API
def classify_hf_keys(table: Iterable[ParamMapping], hf_keys: Iterable[str]) -> tuple[set[str], set[str], set[str]]:
    """Split checkpoint keys into (mapped, carried, unknown), with this model's :data:`CARRIED_HF_KEYS`."""
    return _classify(table, hf_keys, CARRIED_HF_KEYS)
