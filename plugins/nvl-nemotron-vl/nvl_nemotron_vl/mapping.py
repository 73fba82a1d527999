"""Weight mapping between HF ``NemotronH_Nano_VL_V2`` checkpoints and the training model, as one table.

Three faces of every weight:

* **HF tensors**: the checkpoint's keys and layouts (``language_model.backbone.layers.3.mixer.in_proj.weight``).
* **Components**: logical, full-shape tensors keyed by the training (Megatron-style) parameter name,
  with fused parameters stored as their parts (``...mixer.in_proj.weight.z``, ``.x``, ``.B``, ``.C``,
  ``.dt``; ``...linear_qkv.weight.q``, ``.k``, ``.v``). A checkpoint of components loads at any TP size.
* **TP-local parameters**: what rank ``r`` of ``tp`` holds in ``model.named_parameters()``.

:func:`mapping_table` lists one :class:`ParamMapping` per training parameter, each with a transform
``kind`` and the TP split dimension of the local parameter:

========================  =======================================================  ==========================
kind                      HF  <->  components                                        components -> TP-local
========================  =======================================================  ==========================
``identity``              same tensor                                               chunk ``tp_dim`` (or full)
``vocab``                 same tensor (``[vocab, hidden]``)                         pad rows to a multiple of
                                                                                    tp with zeros, chunk dim 0
``lm_qkv``                ``q_proj``, ``k_proj``, ``v_proj`` -> ``q``, ``k``, ``v``  per KV group ``[q(r heads),
                                                                                    k, v]``, rank gets groups
``vit_qkv``               fused ``qkv`` rows ``[Q; K; V]`` -> ``q``, ``k``, ``v``     per head ``[q_h, k_h, v_h]``
``mamba_in_proj``         rows ``[z | x | B | C | dt]`` -> ``z, x, B, C, dt``        ``[z_r | x_r | B_r | C_r |
                                                                                    dt_r]``
``mamba_conv1d``          channels ``[x | B | C]`` -> ``x, B, C``                   ``[x_r | B_r | C_r]``
========================  =======================================================  ==========================

Norms are folded: the HF pre-mixer ``layers.N.norm.weight`` is the ``layer_norm_weight`` of the layer's
first linear (``mixer.in_proj``, ``self_attention.linear_qkv`` or ``mlp.linear_fc1``), likewise the
ViT's ``norm1``/``norm2`` and the projector's ``mlp1.0``.

HF tensors with no training counterpart are **carried** (:data:`CARRIED_HF_KEYS`): RADIO's
``input_conditioner.norm_mean``/``norm_std`` (the preprocessor normalises) and ``summary_idxs``.
Export copies them from the source checkpoint so it reproduces every tensor.

All transforms are pure tensor reshapes/concatenations; each inverse is exact (tested at tp 1, 2, 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import torch

    from .config import NemotronVLConfig

LM_HF = "language_model.backbone."
VIT_HF = "vision_model.radio_model.model."

#: HF keys that have no parameter in the training model; export carries them over from the source.
CARRIED_HF_KEYS = (
    "vision_model.radio_model.input_conditioner.norm_mean",
    "vision_model.radio_model.input_conditioner.norm_std",
    "vision_model.radio_model.summary_idxs",
)

KINDS = ("identity", "vocab", "lm_qkv", "vit_qkv", "mamba_in_proj", "mamba_conv1d")


@dataclass(frozen=True)
class ParamMapping:
    """How one training parameter relates to HF keys and to its checkpoint components.

    ``sizes`` holds the shape facts a fused kind needs: for ``*_qkv`` ``(heads, kv_heads, head_dim)``;
    for ``mamba_*`` the full row counts of each component in order; for ``vocab`` ``(vocab_size,)``.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str = "identity"
    tp_dim: int | None = None
    sizes: tuple[int, ...] = ()
    #: Counts TP must divide for the split to be meaningful (e.g. Mamba groups: a B/C split may not
    #: cut a group in half even when the row count happens to divide), as ``(config field, value)``.
    tp_units: tuple[tuple[str, int], ...] = ()

    # -------------------------------------------------------------------------------- names
    @property
    def components(self) -> tuple[str, ...]:
        """Checkpoint keys of this parameter's logical parts."""
        parts = {"lm_qkv": ("q", "k", "v"), "vit_qkv": ("q", "k", "v"),
                 "mamba_in_proj": ("z", "x", "B", "C", "dt"), "mamba_conv1d": ("x", "B", "C")}.get(self.kind)
        return (self.megatron,) if parts is None else tuple(f"{self.megatron}.{p}" for p in parts)

    # ------------------------------------------------------------------------ HF <-> components
    def hf_to_components(self, hf: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        ts = [_need(hf, k, self.megatron) for k in self.hf]
        if self.kind in ("identity", "vocab", "lm_qkv"):
            return dict(zip(self.components, ts))
        (t,) = ts
        if self.kind == "vit_qkv":
            return dict(zip(self.components, t.chunk(3, dim=0)))
        sizes = list(self.sizes)
        if t.shape[0] != sum(sizes):
            raise ValueError(f"{self.hf[0]}: {t.shape[0]} rows, expected {sum(sizes)} ({self.kind} parts {sizes})")
        return dict(zip(self.components, t.split(sizes, dim=0)))

    def components_to_hf(self, comps: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        import torch

        ts = [_need(comps, k, self.megatron) for k in self.components]
        if self.kind in ("identity", "vocab", "lm_qkv"):
            return dict(zip(self.hf, ts))
        return {self.hf[0]: torch.cat(ts, dim=0)}

    # ------------------------------------------------------------------ components <-> TP-local
    def components_to_local(self, comps: Mapping[str, "torch.Tensor"], tp_size: int, tp_rank: int) -> "torch.Tensor":
        import torch

        for field, n in self.tp_units:
            _div(n, tp_size, f"{self.megatron}: {field}")
        ts = [_need(comps, k, self.megatron) for k in self.components]
        if self.kind == "identity":
            (t,) = ts
            return t if self.tp_dim is None else _chunk(t, self.tp_dim, tp_size, self.megatron)[tp_rank]
        if self.kind == "vocab":
            (t,) = ts
            pad = (-t.shape[0]) % tp_size
            if pad:
                t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))], dim=0)
            return t.chunk(tp_size, dim=0)[tp_rank]
        if self.kind in ("lm_qkv", "vit_qkv"):
            heads, kv, d = self.sizes
            q, k, v = ts
            g = _div(kv, tp_size, f"{self.megatron}: KV groups")
            sl = slice(tp_rank * g, (tp_rank + 1) * g)
            q = q.reshape(kv, (heads // kv) * d, *q.shape[1:])[sl]
            k = k.reshape(kv, d, *k.shape[1:])[sl]
            v = v.reshape(kv, d, *v.shape[1:])[sl]
            return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])
        # mamba_in_proj / mamba_conv1d: each part split over ranks, rank's parts concatenated
        return torch.cat([_chunk(t, 0, tp_size, self.megatron)[tp_rank] for t in ts], dim=0)

    def local_to_components(self, shards: Sequence["torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """Inverse of :meth:`components_to_local`, from the local tensors of all ranks in rank order."""
        import torch

        tp_size = len(shards)
        if self.kind == "identity":
            full = shards[0] if self.tp_dim is None else torch.cat(list(shards), dim=self.tp_dim)
            return {self.megatron: full}
        if self.kind == "vocab":
            (vocab,) = self.sizes
            return {self.megatron: torch.cat(list(shards), dim=0)[:vocab]}
        if self.kind in ("lm_qkv", "vit_qkv"):
            heads, kv, d = self.sizes
            rep = heads // kv
            qs, ks, vs = [], [], []
            for s in shards:
                s = s.reshape(kv // tp_size, (rep + 2) * d, *s.shape[1:])
                q, k, v = s.split([rep * d, d, d], dim=1)
                qs.append(q.reshape(-1, *s.shape[2:]))
                ks.append(k.reshape(-1, *s.shape[2:]))
                vs.append(v.reshape(-1, *s.shape[2:]))
            return dict(zip(self.components, (torch.cat(qs), torch.cat(ks), torch.cat(vs))))
        local_sizes = [_div(n, tp_size, f"{self.megatron} part") for n in self.sizes]
        parts = [s.split(local_sizes, dim=0) for s in shards]
        return {name: torch.cat([p[i] for p in parts], dim=0) for i, name in enumerate(self.components)}


def _need(d: Mapping[str, "torch.Tensor"], key: str, owner: str) -> "torch.Tensor":
    try:
        return d[key]
    except KeyError:
        raise KeyError(f"{key!r} is needed for {owner!r} but is missing") from None


def _div(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}: {n} is not divisible by tensor_model_parallel_size={tp}")
    return n // tp


def _chunk(t: "torch.Tensor", dim: int, tp: int, what: str):
    _div(t.shape[dim], tp, f"{what} dim {dim}")
    return t.chunk(tp, dim=dim)


# ------------------------------------------------------------------------------------ the table
def mapping_table(cfg: "NemotronVLConfig") -> list[ParamMapping]:
    """Every training parameter of the model described by ``cfg``, with its HF keys and transform."""
    llm, vis = cfg.llm, cfg.vision
    M = ParamMapping
    table: list[M] = [
        M("language_model.embedding.word_embeddings.weight", (LM_HF + "embeddings.weight",), "vocab", 0,
          (llm.vocab_size,)),
        M("language_model.decoder.final_norm.weight", (LM_HF + "norm_f.weight",)),
        M("language_model.output_layer.weight", ("language_model.lm_head.weight",), "vocab", 0, (llm.vocab_size,)),
    ]
    gn = llm.n_groups * llm.ssm_state_size
    mamba_units = (("llm_config.n_groups", llm.n_groups), ("llm_config.mamba_num_heads", llm.mamba_num_heads))
    for i, kind in enumerate(llm.layer_types):
        p, h = f"language_model.decoder.layers.{i}.", f"{LM_HF}layers.{i}."
        if kind == "mamba":
            m, hm = p + "mixer.", h + "mixer."
            table += [
                M(m + "in_proj.layer_norm_weight", (h + "norm.weight",)),
                M(m + "in_proj.weight", (hm + "in_proj.weight",), "mamba_in_proj", 0,
                  (llm.mamba_d_inner, llm.mamba_d_inner, gn, gn, llm.mamba_num_heads), mamba_units),
                M(m + "conv1d.weight", (hm + "conv1d.weight",), "mamba_conv1d", 0, (llm.mamba_d_inner, gn, gn),
                  mamba_units),
            ]
            if llm.use_conv_bias:
                table.append(M(m + "conv1d.bias", (hm + "conv1d.bias",), "mamba_conv1d", 0,
                               (llm.mamba_d_inner, gn, gn), mamba_units))
            table += [M(m + n, (hm + n,), "identity", 0, (), mamba_units)
                      for n in ("A_log", "D", "dt_bias", "norm.weight")]
            table.append(M(m + "out_proj.weight", (hm + "out_proj.weight",), "identity", 1, (), mamba_units))
        elif kind == "attention":
            a, hm = p + "self_attention.", h + "mixer."
            table += [
                M(a + "linear_qkv.layer_norm_weight", (h + "norm.weight",)),
                M(a + "linear_qkv.weight", (hm + "q_proj.weight", hm + "k_proj.weight", hm + "v_proj.weight"),
                  "lm_qkv", 0, (llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim)),
                M(a + "linear_proj.weight", (hm + "o_proj.weight",), "identity", 1),
            ]
        else:
            f, hm = p + "mlp.", h + "mixer."
            table += [
                M(f + "linear_fc1.layer_norm_weight", (h + "norm.weight",)),
                M(f + "linear_fc1.weight", (hm + "up_proj.weight",), "identity", 0),
                M(f + "linear_fc2.weight", (hm + "down_proj.weight",), "identity", 1),
            ]

    pg = VIT_HF + "patch_generator."
    table += [
        M("vision_model.class_token", (pg + "cls_token.token",)),
        M("vision_model.position_embeddings", (pg + "pos_embed",)),
        M("vision_model.embedder.weight", (pg + "embedder.weight",)),
    ]
    qkv_sizes = (vis.num_attention_heads, vis.num_attention_heads, vis.head_dim)
    for i in range(vis.num_layers):
        p, h = f"vision_model.decoder.layers.{i}.", f"{VIT_HF}blocks.{i}."
        a, f = p + "self_attention.", p + "mlp."
        table += [
            M(a + "linear_qkv.layer_norm_weight", (h + "norm1.weight",)),
            M(a + "linear_qkv.layer_norm_bias", (h + "norm1.bias",)),
            M(a + "linear_qkv.weight", (h + "attn.qkv.weight",), "vit_qkv", 0, qkv_sizes),
            M(a + "linear_qkv.bias", (h + "attn.qkv.bias",), "vit_qkv", 0, qkv_sizes),
            M(a + "linear_proj.weight", (h + "attn.proj.weight",), "identity", 1),
            M(a + "linear_proj.bias", (h + "attn.proj.bias",)),
            M(f + "linear_fc1.layer_norm_weight", (h + "norm2.weight",)),
            M(f + "linear_fc1.layer_norm_bias", (h + "norm2.bias",)),
            M(f + "linear_fc1.weight", (h + "mlp.fc1.weight",), "identity", 0),
            M(f + "linear_fc1.bias", (h + "mlp.fc1.bias",), "identity", 0),
            M(f + "linear_fc2.weight", (h + "mlp.fc2.weight",), "identity", 1),
            M(f + "linear_fc2.bias", (h + "mlp.fc2.bias",)),
        ]
    e = "vision_projection.encoder."
    table += [
        M(e + "linear_fc1.layer_norm_weight", ("mlp1.0.weight",)),
        M(e + "linear_fc1.weight", ("mlp1.1.weight",), "identity", 0),
        M(e + "linear_fc2.weight", ("mlp1.3.weight",), "identity", 1),
    ]
    return table


# ------------------------------------------------------------------------------ whole-model API
def hf_to_components(table: Iterable[ParamMapping], hf: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """HF tensors -> components (all mappings; raises naming the first missing HF key)."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.hf_to_components(hf))
    return out


def components_to_hf(table: Iterable[ParamMapping], comps: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Components -> HF tensors (carried extras are not included; copy them from the source)."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.components_to_hf(comps))
    return out


def components_to_local(
    table: Iterable[ParamMapping], comps: Mapping[str, "torch.Tensor"], tp_size: int, tp_rank: int
) -> dict[str, "torch.Tensor"]:
    """Components -> the TP-local parameters of rank ``tp_rank`` (keyed like ``named_parameters()``)."""
    return {m.megatron: m.components_to_local(comps, tp_size, tp_rank) for m in table}


def local_to_components(
    table: Iterable[ParamMapping], shards_by_rank: Sequence[Mapping[str, "torch.Tensor"]]
) -> dict[str, "torch.Tensor"]:
    """TP-local parameters of every rank (in rank order) -> components."""
    out: dict[str, torch.Tensor] = {}
    for m in table:
        out.update(m.local_to_components([s[m.megatron] for s in shards_by_rank]))
    return out


def classify_hf_keys(table: Iterable[ParamMapping], hf_keys: Iterable[str]) -> tuple[set[str], set[str], set[str]]:
    """Split checkpoint keys into (mapped, carried, unknown)."""
    mapped_all = {k for m in table for k in m.hf}
    keys = set(hf_keys)
    carried = keys & set(CARRIED_HF_KEYS)
    mapped = keys & mapped_all
    return mapped, carried, keys - mapped - carried


def by_megatron_name(table: Iterable[ParamMapping]) -> dict[str, ParamMapping]:
    return {m.megatron: m for m in table}


def component_owner(table: Iterable[ParamMapping]) -> dict[str, ParamMapping]:
    """Component key -> its mapping (to find e.g. which parameter ``...in_proj.weight.z`` belongs to)."""
    return {c: m for m in table for c in m.components}
