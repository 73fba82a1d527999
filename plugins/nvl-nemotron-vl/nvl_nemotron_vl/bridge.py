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

        from nvlcore.parallel import TPContext

        from .model import build_model

        if isinstance(dtype, str):
            dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                     "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]
        if dtype is None:
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        tp = None
        if tp_group is not None:
            tp = TPContext.of(tp_group)
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
        from nvlcore.progress import progress_iter

        tp = model.tp
        with weights, torch.no_grad():
            for m in progress_iter(table, f"loading {hf_dir.name}", unit="tensor"):
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

    # ----------------------------------------------------------------------------- generation
    def generator(self, **options: Any) -> Any:
        """A :class:`nvlcore.generation.Generator` for this HF directory (what ``nvl generate`` uses);
        ``options`` as :func:`nvl_nemotron_vl.generate.build_generator`."""
        from .generate import build_generator

        if self.hf_dir is None:
            raise ValueError("generator() needs a bridge made with from_hf_dir")
        return build_generator(self, **options)

    def generator_for_model(self, model: Any, **options: Any) -> Any:
        """A :class:`nvlcore.generation.Generator` over an already-built model (the trainer's, for
        ``validation.generate_eval_interval``); ``options`` as
        :func:`nvl_nemotron_vl.generate.generator_for_model`."""
        from .generate import generator_for_model

        return generator_for_model(self, model, **options)

    # --------------------------------------------------------------------------------- recipe
    def recipe(self, *, peft: bool = False, lora_on_language_model: bool = False,
               lora_on_vision_model: bool = False) -> Mapping[str, Any]:
        """Megatron-Bridge's defaults for this model (workflow reference §2), nested by config section.

        The values live in :mod:`nvl_nemotron_vl.recipes` (with the original YAML files in ``conf/``).
        """
        from .recipes import recipe

        return recipe(peft=peft, lora_on_language_model=lora_on_language_model,
                      lora_on_vision_model=lora_on_vision_model)

    @property
    def default_config_file(self) -> Path:
        """The original workflow's default override YAML, applied unless ``--config-file`` replaces it."""
        from .recipes import DEFAULT_CONFIG_FILE

        return DEFAULT_CONFIG_FILE

    # ------------------------------------------------------------------------- training checkpoints
    def _table_by_name(self) -> Mapping[str, Any]:
        table = getattr(self, "_by_name", None)
        if table is None:
            from .mapping import by_megatron_name, mapping_table

            table = self._by_name = by_megatron_name(mapping_table(self.config))
        return table

    def checkpoint_entries(self, name: str, local: "torch.Tensor", *, tp_group: Any, tp_rank: int,
                           tp_size: int) -> dict[str, Any] | None:
        """This rank's shards of parameter ``name`` under its component keys (see :mod:`.checkpoint_state`)."""
        from .checkpoint_state import checkpoint_entries

        return checkpoint_entries(self._table_by_name(), name, local, tp_group=tp_group, tp_rank=tp_rank,
                                  tp_size=tp_size)

    def assemble_from_entries(self, name: str, entries: Mapping[str, "torch.Tensor"], target: "torch.Tensor", *,
                              tp_rank: int, tp_size: int) -> bool:
        """Inverse of :meth:`checkpoint_entries` into ``target`` (this rank's parameter)."""
        from .checkpoint_state import assemble_from_entries

        return assemble_from_entries(self._table_by_name(), name, entries, target, tp_rank=tp_rank, tp_size=tp_size)

    # ---------------------------------------------------------------------------------- FLOPs
    def flops_per_token(self, seq_length: int = 4096) -> float:
        """Training FLOPs per LM token (fwd+bwd = 3x forward) at ``seq_length``, LM only (Megatron-Bridge formula)."""
        from .flops import lm_forward_flops

        return 3.0 * lm_forward_flops(self.config, [seq_length]) / seq_length

    def train_flops(self, batch: Mapping[str, Any]) -> float:
        """Training FLOPs of one batch: LM over the real (unpadded) tokens + ViT + projector per tile."""
        from .flops import batch_train_flops

        return batch_train_flops(self.config, batch)

    #: The name the trainer looks up (``nvlcore.training.finetune._flops_fn``).
    training_flops = train_flops

