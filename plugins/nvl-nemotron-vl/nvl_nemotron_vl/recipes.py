"""Fine-tuning recipes for Nemotron Nano V2 VL: Megatron-Bridge's defaults as nvl config mappings.

``sft_recipe()`` is ``nemotron_nano_v2_vl_12b_sft_config`` (4xH100 bf16) and ``peft_recipe()`` is
``..._peft_config`` (2xH100), with the LoRA target selection of the original
``finetune_nemotron_nano_v2_vl.py`` (``--lora-on-language-model`` / ``--lora-on-vision-model``).
Values are those of Megatron-Bridge (see docs/finetune.md, "Defaults"), except two deliberate changes:

* ``checkpoint.save``/``checkpoint.load`` are not set (the recipe's shared
  ``./nemo_experiments/default/checkpoints`` silently resumed unrelated runs);
* no TransformerEngine/flash-attention knobs: nvl's model has its own kernels.

The original workflow's two YAML files ship in ``conf/`` under the same keys;
:data:`DEFAULT_CONFIG_FILE` is applied over the recipe unless ``--config-file`` names another file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent / "conf"
#: The original's default ``--config-file`` (applied unless ``--config-file`` replaces it).
DEFAULT_CONFIG_FILE = CONF_DIR / "nemotron_nano_v2_vl_override_example.yaml"
#: The original's video fine-tuning file.
VIDEO_CONFIG_FILE = CONF_DIR / "nemotron_nano_v2_vl_video.yaml"

LORA_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LORA_TARGETS_LANGUAGE = [f"*language_model*.{m}" for m in LORA_TARGETS]
LORA_TARGETS_VISION = [f"*vision_model*.{m}" for m in LORA_TARGETS] + [
    "*vision_projection*.linear_fc1", "*vision_projection*.linear_fc2",
]

_SFT: dict[str, Any] = {
    "model": {
        "seq_length": 4096,
        "tensor_model_parallel_size": 4,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
        "sequence_parallel": False,
        "freeze_language_model": False,
        "freeze_vision_model": False,
        "freeze_vision_projection": False,
    },
    "train": {"train_iters": 2000, "global_batch_size": 32, "micro_batch_size": 1,
              "manual_gc": True, "manual_gc_interval": 100, "manual_gc_eval": True},
    "validation": {"eval_interval": 500, "eval_iters": 0},
    "optimizer": {
        "optimizer": "adam", "lr": 2e-5, "min_lr": 2e-6, "weight_decay": 0.1,
        "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 1.0, "bf16": True, "fp16": False,
    },
    "scheduler": {
        "lr_decay_style": "cosine", "lr_decay_iters": None, "lr_warmup_iters": 5, "lr_warmup_init": 0.0,
        # Megatron-Bridge's scheduler overrides the optimizer's 0.1: the effective weight decay is 0.033.
        "start_weight_decay": 0.033, "end_weight_decay": 0.033, "weight_decay_incr_style": "constant",
        "override_opt_param_scheduler": True,
    },
    "checkpoint": {"save_interval": 200, "ckpt_format": "torch_dist", "fully_parallel_save": True,
                   "save_optim": True, "save_rng": True},
    "logger": {"log_interval": 10},
    "rng": {"seed": 1234},
    "dataset": {
        "maker_name": "make_cord_v2_dataset", "seq_length": 4096, "num_workers": 2, "dataloader_type": "cyclic",
        "data_sharding": True, "pin_memory": True, "persistent_workers": False, "pad_to_multiple_of": 128,
        "pad_to_max_length": False, "enable_in_batch_packing": False,
    },
    "ddp": {
        "grad_reduce_in_fp32": True, "overlap_grad_reduce": False, "overlap_param_gather": False,
        "check_for_nan_in_grad": True, "use_distributed_optimizer": True, "average_in_collective": False,
    },
    "mixed_precision": "bf16_mixed",
}


def sft_recipe() -> dict[str, Any]:
    """Full fine-tuning defaults (Megatron-Bridge ``sft_4gpu_h100_bf16``)."""
    return copy.deepcopy(_SFT)


def peft_recipe(*, lora_on_language_model: bool = True, lora_on_vision_model: bool = True) -> dict[str, Any]:
    """LoRA defaults (``peft_2gpu_h100_bf16``: TP 2, rank 16, alpha 32) with the original's target selection.

    Both flags (or neither): adapters on every ``linear_qkv/linear_proj/linear_fc1/linear_fc2`` and all
    three towers frozen. Language only: adapters on the language model, vision encoder and projector
    fully trained. Vision only: adapters on the vision encoder and projector, language model fully trained.
    """
    r = sft_recipe()
    r["model"]["tensor_model_parallel_size"] = 2
    language, vision = lora_on_language_model, lora_on_vision_model
    if language and not vision:
        targets, freeze = LORA_TARGETS_LANGUAGE, (True, False, False)
    elif vision and not language:
        targets, freeze = LORA_TARGETS_VISION, (False, True, True)
    else:
        targets, freeze = LORA_TARGETS, (True, True, True)
    r["peft"] = {
        "method": "lora", "target_modules": list(targets), "dim": 16, "alpha": 32, "dropout": 0.0,
        "dropout_position": "pre", "lora_A_init_method": "xavier", "lora_B_init_method": "zero",
        "freeze_language_model": freeze[0], "freeze_vision_model": freeze[1], "freeze_vision_projection": freeze[2],
    }
    return r


def recipe(*, peft: bool = False, lora_on_language_model: bool = False,
           lora_on_vision_model: bool = False) -> dict[str, Any]:
    """``peft=False``: :func:`sft_recipe`; else :func:`peft_recipe` with the flags (neither flag = both)."""
    if not peft:
        return sft_recipe()
    if not (lora_on_language_model or lora_on_vision_model):
        lora_on_language_model = lora_on_vision_model = True
    return peft_recipe(lora_on_language_model=lora_on_language_model, lora_on_vision_model=lora_on_vision_model)
