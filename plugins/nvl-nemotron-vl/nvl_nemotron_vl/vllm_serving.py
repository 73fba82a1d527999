"""How vLLM serves this model: its recommended ``vllm serve`` settings and the names of the modules vLLM
puts LoRA adapters on (the bridge's ``vllm_serve_settings`` / ``vllm_adapter_module``).

Read from vLLM's source (vllm-project/vllm):

* ``vllm/model_executor/models/nano_nemotron_vl.py`` (commit 00b5bd45f798afa081e629550a9b26ca1ca03539):
  ``NemotronH_Nano_VL_V2`` builds its language model under ``language_model`` (``get_mm_mapping``:
  language model ``language_model``, connector ``mlp1``, tower ``vision_model``); vLLM PR #56231 gave
  the model LoRA on the language model only (the tower and connector take none: the model does not
  declare ``supports_tower_connector_lora``).
* ``vllm/model_executor/models/nemotron_h.py`` (commit 00b08dc44519a82cbdd9061d92d1226985094622):
  ``NemotronHForCausalLM`` holds ``model`` (HF ``backbone``: ``hf_to_vllm_mapper`` renames it) and
  ``lm_head``; layer ``i`` is ``model.layers.{i}`` with its ``mixer``: Mamba ``in_proj``/``out_proj``
  (``MambaMixer2``), attention ``qkv_proj`` (``packed_modules_mapping``: HF ``q_proj``, ``k_proj``,
  ``v_proj``) and ``o_proj``, MLP ``up_proj``/``down_proj``; ``embedding_modules``: ``embed_tokens``,
  ``lm_head``.
* ``vllm/lora/lora_model.py`` (commit 0306474e9d1f26d8717aad457b9511f0c9e57d60) and ``vllm/lora/utils.py``:
  an adapter tensor ``base_model.model.<module>.lora_A.weight`` attaches to the model's module ``<module>``
  (after the model's weights mapper, if it has one); its last name must be a supported module.

An adapter therefore names the vLLM module itself (``language_model.model.layers.3.mixer.q_proj``): vLLM
matches that name whether or not the VL model renames HF's ``backbone`` on loading.

Serving settings: the vLLM recipe ``NVIDIA/Nemotron-Nano-12B-v2-VL.md`` (vllm-project/recipes) serves with
``--trust-remote-code``, ``--max-model-len 131072`` and ``--media-io-kwargs '{"video": {"fps": 2,
"num_frames": 128}}'``, up to 12 tiles per image; the model card supports 4 images per prompt. The EVS rate
is the model config's ``video_pruning_rate`` (what ``nvl generate`` uses; the recipe's examples use 0.75).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import NemotronVLConfig

#: HF -> vLLM prefix of the language model's decoder (``NemotronHForCausalLM.hf_to_vllm_mapper``).
LM_HF_PREFIX, LM_VLLM_PREFIX = "language_model.backbone.", "language_model.model."
#: The LM head: the same name on both sides (vLLM's ``embedding_modules`` include ``lm_head``).
LM_HEAD = "language_model.lm_head"
#: Per layer kind, the HF mixer modules vLLM serves adapters on (HF q/k/v are packed into vLLM's qkv_proj).
ADAPTABLE = {"mamba": ("in_proj", "out_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
             "mlp": ("up_proj", "down_proj")}
#: Parts of the model vLLM serves no adapter on (its ``get_mm_mapping`` tower and connector).
NOT_ADAPTED = ("vision_model.", "mlp1.")
_LAYER = re.compile(r"^language_model\.backbone\.layers\.(\d+)\.mixer\.(\w+)$")


def vllm_adapter_module(cfg: NemotronVLConfig, hf_module: str) -> str | None:
    """vLLM's name for the module an adapter on ``hf_module`` attaches to; ``None`` for the vision tower and
    projector (vLLM serves none there).

    :raises ValueError: naming a language-model module vLLM cannot put an adapter on.
    """
    if hf_module.startswith(NOT_ADAPTED):
        return None
    if hf_module == LM_HEAD:
        return LM_HEAD
    m = _LAYER.match(hf_module)
    if m is not None:
        i, name = int(m.group(1)), m.group(2)
        kinds = cfg.llm.layer_types
        if i < len(kinds) and name in ADAPTABLE[kinds[i]]:
            return LM_VLLM_PREFIX + hf_module[len(LM_HF_PREFIX):]
    raise ValueError(f"vLLM serves no adapter on {hf_module} (it adapts the language model's "
                     f"{sorted({n for v in ADAPTABLE.values() for n in v})} and lm_head); merge it instead: "
                     "`nvl peft merge --format hf`")


def vllm_serve_settings(cfg: NemotronVLConfig) -> dict[str, Any]:
    """``vllm serve`` settings for this model (snake_case option -> value), from vLLM's recipe and the
    model card (module docstring)."""
    return {
        "trust_remote_code": True,
        "max_model_len": cfg.llm.max_position_embeddings or 131072,
        "limit_mm_per_prompt": {"image": 4, "video": 1},
        "mm_processor_kwargs": {"max_num_tiles": 12},
        "media_io_kwargs": {"video": {"fps": 2, "num_frames": 128}},
        "video_pruning_rate": cfg.video_pruning_rate,
    }
