"""Reference models and distributed workers for the parity tests (importable, so spawn can pickle them).

The references are implementations written by others, loaded with a toy checkpoint's weights:

* LM: transformers' ``NemotronHForCausalLM``, its config built from the toy's ``llm_config``, its weights
  the toy's ``language_model.*`` tensors renamed ``language_model.backbone.`` -> ``model.`` and
  ``language_model.lm_head.`` -> ``lm_head.`` and loaded with ``strict=True``. One setting is aligned:
  each Mamba mixer's ``time_step_limit`` is set to ``(0, inf)`` because transformers clamps ``dt`` at
  ``time_step_min`` (0.001) while the released model's kernels (and Megatron, vLLM) do not clamp
  (the checkpoint's ``config.json`` sets ``time_step_limit`` to ``(0, inf)``). Attention runs eager (its
  own softmax, not SDPA).
* ViT: transformers' ``RadioModel`` loaded by its own ``from_pretrained`` (its conversion rules split the
  fused ``attn.qkv`` and rename the keys) from the toy's ``vision_model.*`` tensors. Aligned settings:
  ``num_cls_tokens + num_registers`` = rows of the checkpoint's ``cls_token`` (the split between them
  does not matter for patch features); ``max_img_size`` = ``cpe_max_size`` (position grid);
  ``mlp_ratio`` = ViT MLP / hidden; ``layer_norm_eps`` 1e-6; exact GELU; ``layerscale_value`` 1.0 (no
  layer scale); eager attention. Interpolation: ``RadioModel`` always uses bilinear with
  ``align_corners=False``, which is our default (``pos_embed_align_corners=False``).
* Pixel shuffle and projector: transformers' ``NemotronH_Omni_Reasoning_V3.pixel_shuffle`` (the
  successor model's implementation of the same v2 shuffle) and its multimodal projector class
  (RMSNorm, Linear, ReLU^2, Linear), loaded with the toy's ``mlp1.*``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvl_nemotron_vl.config import NemotronVLConfig

LM_RENAMES = (("language_model.backbone.", "model."), ("language_model.lm_head.", "lm_head."))


def load_toy_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    from nvlcore.convert.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(hf_dir)
    return reader.read(reader.keys())


def lm_state_for_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The toy's LM tensors under transformers' ``NemotronHForCausalLM`` names (fp32)."""
    out = {}
    for k, t in state.items():
        for old, new in LM_RENAMES:
            if k.startswith(old):
                out[new + k[len(old):]] = t.float()
    return out


def hf_lm_config(hf_dir: str | Path, **overrides: Any):
    from transformers import NemotronHConfig

    llm = json.loads((Path(hf_dir) / "config.json").read_text())["llm_config"]
    fields = {k: v for k, v in llm.items() if k not in ("architectures", "model_type", "torch_dtype")}
    fields.update(overrides)
    cfg = NemotronHConfig(**fields)
    cfg._attn_implementation = "eager"
    return cfg


def hf_lm_from_toy(hf_dir: str | Path, state: dict[str, torch.Tensor] | None = None):
    """transformers' NemotronHForCausalLM (fp32, eval) with the toy's LM weights, loaded strictly."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(hf_lm_config(hf_dir)).float().eval()
    model.load_state_dict(lm_state_for_transformers(state or load_toy_state(hf_dir)), strict=True)
    for module in model.modules():
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, float("inf"))  # no dt clamp, as the released kernels
    return model


def hf_radio_from_toy(hf_dir: str | Path, cfg: NemotronVLConfig, state: dict[str, torch.Tensor] | None = None):
    """transformers' RadioModel (fp32, eval) loaded by ``from_pretrained`` from the toy's vision tensors."""
    from safetensors.torch import save_file
    from transformers import RadioConfig, RadioModel

    state = state or load_toy_state(hf_dir)
    v = cfg.vision
    n_cls = min(2, v.num_prefix_tokens)
    rcfg = RadioConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
        mlp_ratio=v.intermediate_size / v.hidden_size, patch_size=v.patch_size, image_size=cfg.force_image_size,
        max_img_size=v.max_grid * v.patch_size, num_cls_tokens=n_cls, num_registers=v.num_prefix_tokens - n_cls,
        summary_idxs=list(range(n_cls)), layer_norm_eps=v.layer_norm_eps, hidden_act="gelu", qkv_bias=True,
        layerscale_value=1.0, norm_mean=list(cfg.norm_mean), norm_std=list(cfg.norm_std),
    )
    vis = {k[len("vision_model."):]: t.float().contiguous() for k, t in state.items() if k.startswith("vision_model.")}
    with tempfile.TemporaryDirectory(prefix="nvl-radio-") as tmp:
        rcfg.save_pretrained(tmp)
        save_file(vis, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model = RadioModel.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def radio_grads_to_hf(radio: nn.Module) -> dict[str, torch.Tensor]:
    """RadioModel gradients under the HF checkpoint's ``vision_model.radio_model.*`` keys (q/k/v re-fused)."""
    out: dict[str, torch.Tensor] = {}
    pre = "vision_model.radio_model.model."
    g = {n: p.grad for n, p in radio.named_parameters() if p.grad is not None}
    e = "embeddings."
    out[pre + "patch_generator.embedder.weight"] = g[e + "patch_projection.weight"]
    out[pre + "patch_generator.pos_embed"] = g[e + "position_embedding"]
    out[pre + "patch_generator.cls_token.token"] = g[e + "cls_register_token"]
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in g:
        s, d = f"encoder.layer.{i}.", f"{pre}blocks.{i}."
        for part in ("weight", "bias"):
            out[d + f"attn.qkv.{part}"] = torch.cat([g[s + f"attention.{x}_proj.{part}"] for x in "qkv"])
            out[d + f"attn.proj.{part}"] = g[s + f"attention.o_proj.{part}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[d + f"{n}.{part}"] = g[s + f"{n}.{part}"]
        i += 1
    return out


class HFReferenceVLM(nn.Module):
    """The VLM composed from transformers modules: RadioModel -> pixel shuffle -> projector -> NemotronH."""

    def __init__(self, hf_dir: str | Path, cfg: NemotronVLConfig) -> None:
        super().__init__()
        from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
            NemotronH_Omni_Reasoning_V3,
            NemotronH_Omni_Reasoning_V3MultiModalProjector,
        )

        state = load_toy_state(hf_dir)
        self.cfg = cfg
        self.lm = hf_lm_from_toy(hf_dir, state)
        self.radio = hf_radio_from_toy(hf_dir, cfg, state)
        self.radio.make_preprocessor_external()
        self.projector = NemotronH_Omni_Reasoning_V3MultiModalProjector(
            cfg.projector_input_size, cfg.projector_hidden_size, cfg.llm.hidden_size, eps=cfg.projector_eps)
        self.projector.load_state_dict({
            "layer_norm.weight": state["mlp1.0.weight"].float(), "linear_1.weight": state["mlp1.1.weight"].float(),
            "linear_2.weight": state["mlp1.3.weight"].float()}, strict=True)
        self._shuffle = NemotronH_Omni_Reasoning_V3.pixel_shuffle
        self.eval()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            feats = self.radio(pixel_values).features
            side = pixel_values.shape[-1] // self.cfg.patch_size
            x = feats.reshape(feats.shape[0], side, side, -1)
            x = self._shuffle(None, x, scale_factor=self.cfg.downsample_ratio)
            x = self.projector(x.reshape(x.shape[0], -1, x.shape[-1]))
            mask = input_ids == self.cfg.img_context_token_id
            if self.cfg.video_context_token_id is not None:
                mask = mask | (input_ids == self.cfg.video_context_token_id)
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), x.reshape(-1, x.shape[-1]))
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask).logits

    def hf_grads(self) -> dict[str, torch.Tensor]:
        """Gradients under HF checkpoint keys."""
        out = radio_grads_to_hf(self.radio)
        for n, p in self.lm.named_parameters():
            if p.grad is not None:
                key = n.replace("model.", "language_model.backbone.",
                                1) if n.startswith("model.") else "language_model." + n
                out[key] = p.grad
        names = {"layer_norm.weight": "mlp1.0.weight", "linear_1.weight": "mlp1.1.weight",
                 "linear_2.weight": "mlp1.3.weight"}
        for n, p in self.projector.named_parameters():
            if p.grad is not None:
                out[names[n]] = p.grad
        return out


def model_grads_to_hf(cfg: NemotronVLConfig, shards_by_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Our model's gradients (every rank's local shards, in rank order) as HF-keyed full tensors."""
    from nvl_nemotron_vl.mapping import components_to_hf, local_to_components, mapping_table

    table = [m for m in mapping_table(cfg) if m.megatron in shards_by_rank[0]]
    return components_to_hf(table, local_to_components(table, shards_by_rank))


def random_sequences(vocab: int, seed: int = 11) -> list[torch.Tensor]:
    """Token batches whose lengths cross the tiny toy's chunk size (8) several times, one not a multiple."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, n), generator=g) for b, n in ((1, 7), (2, 29), (3, 64))]


# ------------------------------------------------------------------------------ distributed workers
def tp_worker(rank: int, world: int, hf_dir: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """At TP=``world``: logits of each LM sequence, the VLM forward/backward on an image sample, and the
    local gradients (for reassembly by the caller). Runs under :func:`nvl_dist_testing.run_distributed`."""
    from megatron.core import parallel_state

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.parallel import init_parallel

    init_parallel(world, device_type="cpu")
    bridge = NemotronVLBridge.from_hf_dir(hf_dir)
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True,
                               tp_group=parallel_state.get_tensor_model_parallel_group())
    out: dict[str, Any] = {"lm_logits": []}
    for ids in inputs["lm_sequences"]:
        out["lm_logits"].append(model.forward_inference(ids))
    vlm = inputs["vlm"]
    logits = model.forward_inference(vlm["input_ids"], pixel_values=vlm["pixel_values"])
    out["vlm_logits"] = logits
    loss = model(vlm["input_ids"], labels=vlm["labels"], pixel_values=vlm["pixel_values"])
    (loss * vlm["loss_mask"]).sum().backward()
    out["per_token_loss"] = loss.detach()
    out["local_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["tp"] = (model.tp.size, model.tp.rank)
    return out
