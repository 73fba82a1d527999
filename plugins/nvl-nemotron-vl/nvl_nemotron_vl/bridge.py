"""``NemotronVLBridge``: Nemotron Nano V2 VL (HF ``NemotronH_Nano_VL_V2``) <-> nvl's training model.

Torch, megatron and transformers are imported inside methods only; constructing the bridge reads
``config.json`` as data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from .config import ConfigError, NemotronVLConfig
from .convert import BridgeConversionMixin

if TYPE_CHECKING:
    import torch

    from .model import NemotronVLModel


class NemotronVLBridge(BridgeConversionMixin):
    name: ClassVar[str] = "nemotron_nano_v2_vl"
    architectures: ClassVar[tuple[str, ...]] = ("NemotronH_Nano_VL_V2",)

    def __init__(self, config: NemotronVLConfig, hf_dir: Path | None = None) -> None:
        self.config = config
        self.hf_dir = hf_dir

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> "NemotronVLBridge":
        return cls(NemotronVLConfig.from_hf_dir(hf_dir), Path(hf_dir))

    # ---------------------------------------------------------------------------------- model
    def build_model(
        self,
        *,
        dtype: "torch.dtype | str | None" = None,
        device: "torch.device | str | None" = None,
        tp_group: Any = None,
        init: str = "random",
        seed: int = 1234,
        load_weights: bool = False,
        **options: Any,
    ) -> "NemotronVLModel":
        """Build the training model over ``tp_group`` (default: megatron's current TP group, or one rank).

        ``dtype`` defaults to bf16 on GPU and fp32 on CPU. ``load_weights=True`` loads this bridge's HF
        directory (then ``init`` is skipped). ``options`` go to :class:`~nvl_nemotron_vl.model.NemotronVLModel`
        (``freeze_language_model``, ``freeze_vision_model``, ``freeze_vision_projection``,
        ``pos_embed_mode``, ``pos_embed_align_corners``).
        """
        import torch

        from .model import TPContext, build_model

        if isinstance(dtype, str):
            dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                     "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]
        if dtype is None:
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        tp = None
        if tp_group is not None:
            tp = TPContext(group=tp_group, size=tp_group.size(), rank=tp_group.rank())
        model = build_model(self.config, dtype=dtype, device=device, tp=tp,
                            init="none" if load_weights else init, seed=seed, **options)
        if load_weights:
            if self.hf_dir is None:
                raise ValueError("load_weights=True needs a bridge made with from_hf_dir")
            self.load_hf_weights(model, self.hf_dir)
        return model

    def load_hf_weights(self, model: "NemotronVLModel", hf_dir: str | Path, *, strict: bool = True) -> dict[str, Any]:
        """Load an HF directory's safetensors into ``model`` (this rank's shards), streaming tensor by tensor.

        Strict: every model parameter must be filled and every checkpoint key must be mapped or carried
        (``input_conditioner.norm_mean``/``norm_std``, ``summary_idxs``). Returns a report
        ``{"loaded": n, "carried": [...], "ignored": [...]}``.
        """
        import torch

        from .hf_io import HFWeights
        from .mapping import classify_hf_keys, mapping_table

        hf_dir = Path(hf_dir)
        weights = HFWeights(hf_dir)
        table = mapping_table(model.config)
        mapped, carried, unknown = classify_hf_keys(table, weights.keys())
        if unknown and strict:
            sample = sorted(unknown)[:8]
            raise ConfigError(
                f"{hf_dir}: {len(unknown)} checkpoint tensors have no place in the model, e.g. {sample}; "
                "is config.json consistent with the weights?"
            )
        params = dict(model.named_parameters())
        table_names = {m.megatron for m in table}
        if set(params) - table_names:
            raise RuntimeError(f"model parameters missing from the mapping table: {sorted(set(params) - table_names)[:8]}")
        missing = sorted(k for m in table for k in m.hf if k not in weights)
        if missing:
            raise ConfigError(f"{hf_dir}: {len(missing)} tensors the model needs are missing, e.g. {missing[:8]}")
        tp = model.tp
        with torch.no_grad():
            for m in table:
                comps = m.hf_to_components({k: weights.get(k) for k in m.hf})
                local = m.components_to_local(comps, tp.size, tp.rank)
                p = params[m.megatron]
                if tuple(local.shape) != tuple(p.shape):
                    raise ConfigError(
                        f"{hf_dir}: {', '.join(m.hf)} gives {m.megatron} shape {tuple(local.shape)} on TP rank "
                        f"{tp.rank}/{tp.size}, the model expects {tuple(p.shape)}"
                    )
                p.copy_(local)
        return {"loaded": len(table), "carried": sorted(carried), "ignored": sorted(unknown)}

    # ------------------------------------------------------------------------------ processor
    def processor(self, **options: Any) -> Any:
        """The data helper's processor for this model (``nvl_nemotron_vl.processor``), imported lazily."""
        from . import processor as proc

        if self.hf_dir is None:
            raise ValueError("processor() needs a bridge made with from_hf_dir (it reads the tokenizer)")
        return proc.NemotronVLProcessor.from_hf_dir(self.hf_dir, **options)

    # --------------------------------------------------------------------------------- recipe
    def recipe(self, *, peft: bool = False) -> Mapping[str, Any]:
        """Megatron-Bridge's defaults for this model (workflow reference §2), nested by config section."""
        return recipe_defaults(peft=peft)

    # ---------------------------------------------------------------------------------- FLOPs
    def flops_per_token(self, seq_length: int = 4096) -> float:
        """Training FLOPs per LM token (fwd+bwd = 3x forward) at ``seq_length``, LM only (Megatron-Bridge formula)."""
        from .flops import lm_forward_flops

        return 3.0 * lm_forward_flops(self.config, [seq_length]) / seq_length

    def train_flops(self, batch: Mapping[str, Any]) -> float:
        """Training FLOPs of one batch: LM over the real (unpadded) tokens + ViT + projector per tile."""
        from .flops import batch_train_flops

        return batch_train_flops(self.config, batch)


def recipe_defaults(*, peft: bool = False) -> dict[str, Any]:
    """Megatron-Bridge ``nemotron_nano_v2_vl_12b_{sft_4gpu,peft_2gpu}_h100_bf16`` values (workflow §2)."""
    recipe: dict[str, Any] = {
        "model": {
            "seq_length": 4096,
            "tensor_model_parallel_size": 2 if peft else 4,
            "pipeline_model_parallel_size": 1,
            "context_parallel_size": 1,
            "sequence_parallel": False,
            # Megatron-Bridge leaves these False in both recipes; under PEFT the LoRA method freezes the base.
            "freeze_language_model": False,
            "freeze_vision_model": False,
            "freeze_vision_projection": False,
            "bf16": True,
        },
        "train": {"train_iters": 2000, "global_batch_size": 32, "micro_batch_size": 1, "manual_gc": True,
                  "manual_gc_interval": 100},
        "validation": {"eval_interval": 500, "eval_iters": 0},
        "optimizer": {"optimizer": "adam", "lr": 2e-5, "min_lr": 2e-6, "adam_beta1": 0.9, "adam_beta2": 0.95,
                      "adam_eps": 1e-8, "weight_decay": 0.1, "clip_grad": 1.0, "bf16": True,
                      "use_distributed_optimizer": True},
        "scheduler": {"lr_decay_style": "cosine", "lr_warmup_iters": 5, "lr_warmup_init": 0.0,
                      "lr_decay_iters": 2000, "start_weight_decay": 0.033, "end_weight_decay": 0.033,
                      "weight_decay_incr_style": "constant", "override_opt_param_scheduler": True},
        "ddp": {"overlap_grad_reduce": False, "overlap_param_gather": False, "check_for_nan_in_grad": True,
                "use_distributed_optimizer": True, "grad_reduce_in_fp32": True, "average_in_collective": False},
        "checkpoint": {"save_interval": 200, "save": "./nemo_experiments/default/checkpoints",
                       "load": "./nemo_experiments/default/checkpoints", "ckpt_format": "torch_dist",
                       "fully_parallel_save": True},
        "logger": {"log_interval": 10, "tensorboard_dir": "./nemo_experiments/default/tb_logs"},
        "rng": {"seed": 1234},
        "dataset": {"maker_name": "make_cord_v2_dataset", "seq_length": 4096, "num_workers": 2,
                    "dataloader_type": "cyclic", "pad_to_multiple_of": 128, "pad_to_max_length": False},
    }
    if peft:
        # VLMLoRA: adapters on every linear of LM attention/MLP, ViT and projector; Mamba in/out_proj untouched.
        recipe["peft"] = {"method": "lora", "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
                          "dim": 16, "alpha": 32, "dropout": 0.0, "dropout_position": "pre",
                          "lora_A_init_method": "xavier", "lora_B_init_method": "zero"}
    return recipe
