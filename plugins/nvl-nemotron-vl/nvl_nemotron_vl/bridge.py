"""``NemotronVLBridge``: Nemotron Nano V2 VL (HF ``NemotronH_Nano_VL_V2``) <-> nvl's training model.

Torch, megatron and transformers are imported inside methods only; constructing the bridge reads
``config.json`` as data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nvlcore.bridge import BridgeError, ModelBridge
from nvlcore.checkpoint import MegatronBridgeNames
from nvlcore.mapping import ParamMapping

from .config import NemotronVLConfig
from .mapping import CARRIED_HF_KEYS, FREEZE_GROUPS

if TYPE_CHECKING:
    import torch

    from .model import NemotronVLModel


#: Parameter names (last component) that stay fp32 in a frozen base (:meth:`NemotronVLBridge.keeps_fp32`).
_FP32_LEAVES = frozenset({"A_log", "D", "dt_bias", "layer_norm_weight", "layer_norm_bias"})


class NemotronVLBridge(ModelBridge):
    """The :class:`nvlcore.bridge.ModelBridge` of Nemotron Nano V2 VL. HF loading, conversion, training
    checkpoints and adapter layouts are the base class's, on top of :meth:`mapping_table`."""

    name: ClassVar[str] = "nemotron_nano_v2_vl"
    architectures: ClassVar[tuple[str, ...]] = ("NemotronH_Nano_VL_V2",)
    freeze_groups: ClassVar[Mapping[str, str]] = FREEZE_GROUPS

    config: NemotronVLConfig

    @classmethod
    def read_config(cls, hf_dir: str | Path) -> NemotronVLConfig:
        """``config.json`` as :class:`~nvl_nemotron_vl.config.NemotronVLConfig` (validated, no remote code)."""
        return NemotronVLConfig.from_hf_dir(hf_dir)

    # --------------------------------------------------------------------------- weight mapping
    def mapping_table(self) -> list[ParamMapping]:
        """See :func:`nvl_nemotron_vl.mapping.mapping_table`."""
        from .mapping import mapping_table

        return mapping_table(self.config)

    def carried_hf_keys(self) -> tuple[str, ...]:
        """RADIO's ``input_conditioner`` statistics and ``summary_idxs`` (:data:`.mapping.CARRIED_HF_KEYS`)."""
        return CARRIED_HF_KEYS

    def megatron_bridge_names(self) -> MegatronBridgeNames:
        """Megatron-Bridge's names for this model (see :data:`.mapping.MEGATRON_BRIDGE_PREFIX`)."""
        from .mapping import megatron_bridge_names

        return megatron_bridge_names(self.config)

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise naming every config field ``tp`` does not divide."""
        self.config.check_tensor_parallel(tp)

    def tensor_parallel_of(self, model: torch.nn.Module) -> tuple[Any, int, int]:
        """The model's own TP context (``model.tp``)."""
        tp = model.tp  # type: ignore[attr-defined]
        return tp.group, tp.rank, tp.size

    # ---------------------------------------------------------------------------------- model
    def build_model(
        self,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        tp_group: Any = None,
        init: str = "random",
        seed: int = 1234,
        load_weights: bool = False,
        **options: Any,
    ) -> NemotronVLModel:
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

    def set_kernels(self, model: torch.nn.Module, choice: str) -> dict[str, str]:
        """``model.kernels``: see :mod:`nvl_nemotron_vl.model.kernels` (Triton kernels on CUDA under ``auto``)."""
        return model.set_kernels(choice)  # type: ignore[operator]

    def kernels_ran(self, model: torch.nn.Module) -> dict[str, str]:
        """Which packed-attention path ran (varlen kernel or SDPA block mask, and why): :meth:`.model.vlm.
        NemotronVLModel.kernels_ran`."""
        return model.kernels_ran()  # type: ignore[operator]

    def keeps_fp32(self, name: str, param: torch.Tensor) -> bool:
        """The Mamba mixers' per-head ``A_log``, ``D``, ``dt_bias`` (they set the state's decay; the model
        builds them fp32 at every dtype) and every norm's weight and bias stay fp32; the frozen
        linear weights, biases and the conv are stored like the rest of the base."""
        module, _, leaf = name.rpartition(".")
        if leaf in _FP32_LEAVES:
            return True
        return module.rpartition(".")[2].endswith("norm") and leaf in ("weight", "bias")

    #: A linear whose (this rank's) input size is at most the first number and output size at most the
    #: second stays bf16 under FP8: torchao's tensorwise table shows no gain there (casts cost more than
    #: the GEMM saves). None: no size rule (tests of the tiny toy, whose linears are all that small).
    fp8_small_linear: ClassVar[tuple[int, int] | None] = (4096, 1024)

    def quantize_module_filter(self, name: str) -> bool:
        """Every frozen linear but the output layer (131k x 5120): the chunked loss runs it once per
        2,048-token chunk, each run would dequantize all 671M parameters (a 2.5 GiB transient measured on
        an H100 under QLoRA), and NF4 saves only ~1 GB on it. The token embedding, not a linear layer, is
        never quantized; it is named so that the memory plan, which sees only shapes, agrees."""
        return name not in ("language_model.output_layer", "language_model.embedding.word_embeddings")

    def fp8_module_filter(self, name: str, module: torch.nn.Module) -> bool:
        """FP8 for the language model's decoder linears only (Megatron-Bridge's FP8 recipes cover the
        transformer layers): the vision tower, the projector, the embedding and the output layer stay bf16,
        and so does a linear too small to gain (:attr:`fp8_small_linear`)."""
        if not name.startswith("language_model.decoder.layers."):
            return False
        small = self.fp8_small_linear
        out_size, in_size = module.weight.shape  # type: ignore[union-attr]
        return small is None or not (in_size <= small[0] and out_size <= small[1])

    #: cheapest first (the memory plan's auto adds them in this order)
    recompute_modules = {
        "mamba": "the Mamba mixers' conv, scan and gated norm (their fp32 intermediates dominate the LM's activations)",
        "mlp_act": "the MLP activation of both towers (the LM's squared ReLU, the ViT's GELU): its output, which "
                   "linear_fc2 (its adapter, or its own trained weight) keeps, is freed after the forward and "
                   "recomputed in backward from linear_fc1's output (megatron-core's output-discarding "
                   "recomputation, as its moe_act does for MoE experts; 40 KB a token per LM MLP layer, ~23% of what "
                   "selective recomputation of the Mamba mixers leaves, and ~22% of a trained vision tower's, for "
                   "an elementwise op)",
        "vision_tower": "every vision-tower layer (a trained tower keeps ~3 MB a tile per layer; recomputing it "
                        "costs one more tower forward, a few percent of a step)",
    }
    default_recompute_modules = ("mamba",)

    def set_recompute(self, model: torch.nn.Module, granularity: str, modules: Sequence[str] | None = None) -> None:
        """Megatron's names -> the model's: ``selective`` recomputes ``modules`` (:attr:`recompute_modules`;
        default the Mamba mixers), ``full`` whole layers of both towers."""
        if granularity not in ("selective", "full"):
            raise ValueError(f"model.recompute_granularity={granularity!r}: use selective or full")
        if granularity == "full":
            model.set_recompute("layers")  # type: ignore[operator]
            return
        chosen = set(self.default_recompute_modules if modules is None else modules)
        model.set_recompute("ssm" if "mamba" in chosen else "none",  # type: ignore[operator]
                            vision_layers="vision_tower" in chosen, mlp_act="mlp_act" in chosen)

    def set_sequence_parallel(self, model: torch.nn.Module) -> None:
        """The language model's decoder runs sequence-parallel in training forwards (the residual stream and
        norms on ``1 / tp`` of the sequence; :meth:`NemotronVLModel.set_sequence_parallel`)."""
        model.set_sequence_parallel(True)  # type: ignore[operator]

    cuda_graph_scopes = {
        "mamba": "the language model's Mamba layers (norm, in_proj, conv, scan, gated norm, out_proj, residual), as "
                 "Megatron-Bridge's Nemotron-H performance recipes scope them",
        "mlp": "the language model's MLP layers (norm, fc1, squared ReLU, fc2, residual)",
    }

    def cuda_graph_modules(self, model: torch.nn.Module, scopes: Sequence[str]) -> dict[str, torch.nn.Module]:
        """The language model's layers of the chosen kinds, switched to fixed-shape inputs
        (:meth:`~.model.lm.MambaLayer.set_graph_inputs`): packed rows reach them as the ``seq_idx`` tensor
        alone, whose shape is the batch's, instead of sample offsets whose count varies."""
        from .model.lm import MambaLayer, MLPLayer

        kinds = {"mamba": MambaLayer, "mlp": MLPLayer}
        unknown = [s for s in scopes if s not in kinds]
        if unknown:
            raise ValueError(f"model.cuda_graph_scope: {unknown[0]!r} is not one of {', '.join(kinds)}")
        wanted = tuple(kinds[s] for s in scopes)
        decoder = model.language_model.decoder  # type: ignore[union-attr]
        out: dict[str, torch.nn.Module] = {}
        for i, layer in enumerate(decoder.layers):  # type: ignore[arg-type]
            if isinstance(layer, wanted):
                layer.set_graph_inputs(True)
                out[f"language_model.decoder.layers.{i}"] = layer
        return out

    def num_decoder_layers(self) -> int:
        """The hybrid language model's layer count (Mamba, attention and MLP layers each count one)."""
        return len(self.config.llm.layer_types)

    def decoder_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The hybrid language model's Mamba / attention / MLP layers, in forward order."""
        return list(model.language_model.decoder.layers)  # type: ignore[union-attr,arg-type]

    # ---------------------------------------------------------------------------- memory plan
    def parameter_shapes(self, tp_size: int = 1) -> dict[str, tuple[tuple[int, ...], int]]:
        """Full shapes from the model built on the meta device over one rank (no process group needed);
        a rank holds ``1/tp_size`` of each parameter marked ``tensor_model_parallel``."""
        return {name: (tuple(p.shape), p.numel() // tp_size if getattr(p, "tensor_model_parallel", False)
                       else p.numel()) for name, p in self.meta_model().named_parameters()}

    #: the vision tower casts the pixels to its patch embedder's dtype, the projector the tower's features to its
    #: first linear's: those two linear weights stay out of :meth:`matmul_weights`
    dtype_setting_weights: ClassVar[tuple[str, ...]] = ("vision_model.embedder.weight",
                                                          "vision_projection.encoder.linear_fc1.weight")

    def meta_model(self) -> torch.nn.Module:
        """The model built on the meta device over one rank (no process group needed)."""
        from .toy import meta_model

        return meta_model(self.config)

    def workload_upper_bound(self, *, seq_length: int, micro_batch_size: int, packed: bool) -> tuple[int, int]:
        """Full rows; tiles: a whole image of 12 tiles + thumbnail per row, packed rows as many as fit."""
        from .memory import workload_upper_bound

        return workload_upper_bound(self.config, seq_length=seq_length, micro_batch_size=micro_batch_size,
                                    packed=packed)

    def activation_bytes(self, *, tokens: int, tiles: int, recompute: str | None, tp_size: int,
                         trained: Mapping[str, bool], offload_layers: int = 0,
                         adapted: Mapping[str, bool] | None = None,
                         recompute_modules: Sequence[str] | None = None,
                         sequence_parallel: bool = False) -> dict[str, float]:
        """See :mod:`nvl_nemotron_vl.memory` (per layer kind, calibrated on measured peaks)."""
        from .memory import activation_bytes

        modules = self.default_recompute_modules if recompute_modules is None else tuple(recompute_modules)
        return activation_bytes(self.config, tokens=tokens, tiles=tiles, recompute=recompute, tp_size=tp_size,
                                trained=trained, offload_layers=offload_layers, adapted=adapted,
                                recompute_modules=modules, sequence_parallel=sequence_parallel)

    def memory_phases(self) -> dict[str, str]:
        """Towers named as an out-of-memory report says them. The training forward calls the language
        model's parts (embedding, decoder, output layer and loss), never ``language_model`` itself, so the
        parts carry the hooks: the merge of tile embeddings runs under the projector's name."""
        return {"language_model.embedding": "language model embedding", "vision_model": "vision tower",
                "vision_projection": "vision projector", "language_model.decoder": "language model",
                "language_model.output_layer": "language model output layer and loss"}

    # ------------------------------------------------------------------------------ processor
    def processor(self, *, seq_length: int | None = None, pad_to_multiple_of: int | None = None,
                  **options: Any) -> Any:
        """The data helper's processor for this model (``nvl_nemotron_vl.processor``), imported lazily."""
        from . import processor as proc

        if self.hf_dir is None:
            raise ValueError("processor() needs a bridge made with from_hf_dir (it reads the tokenizer)")
        if seq_length is not None:
            options["seq_length"] = seq_length
        if pad_to_multiple_of is not None:
            options["pad_to_multiple_of"] = pad_to_multiple_of
        return proc.NemotronVLProcessor.from_hf_dir(self.hf_dir, **options)

    # ----------------------------------------------------------------------------- generation
    def generator_for_model(self, model: Any, *, device: Any = None, dtype: Any = None,
                            cuda_graph: bool | None = None, **options: Any) -> Any:
        """A :class:`nvlcore.generation.Generator` over a built, loaded model (``nvl generate``, ``nvl eval``,
        ``validation.generate_eval_interval``); ``options``: ``compile``, ``processor_options``,
        ``video_pruning_rate`` (see :func:`nvl_nemotron_vl.generate.generator_for_model`)."""
        from .generate import generator_for_model

        unknown = sorted(set(options) - {"compile", "processor_options", "video_pruning_rate"})
        if unknown:
            raise ValueError(f"model bridge {self.name!r} has no generation option(s) {unknown}")
        return generator_for_model(self, model, device=device, dtype=dtype, cuda_graph=cuda_graph, **options)

    # --------------------------------------------------------------------------------- recipe
    def recipe(self, *, peft: bool = False, adapted_groups: Sequence[str] = ()) -> Mapping[str, Any]:
        """Megatron-Bridge's defaults for this model (its ``recipes/nemotron_vl/nemotron_nano_v2_vl.py``),
        nested by config section; ``adapted_groups`` (``language_model``, ``vision_model``) pick the PEFT variant.

        The values live in :mod:`nvl_nemotron_vl.recipes` (with the original YAML files in ``conf/``).
        """
        from .recipes import recipe

        unknown = sorted(set(adapted_groups) - {"language_model", "vision_model"})
        if unknown:
            raise ValueError(f"adapters on {unknown}: this model's recipes put them on language_model or vision_model")
        return recipe(peft=peft, lora_on_language_model="language_model" in adapted_groups,
                      lora_on_vision_model="vision_model" in adapted_groups)

    def default_config_file(self) -> Path:
        """The original workflow's default override YAML, applied unless ``--config-file`` replaces it."""
        from .recipes import DEFAULT_CONFIG_FILE

        return DEFAULT_CONFIG_FILE

    # -------------------------------------------------------------------------------- serving
    def vllm_serve_settings(self) -> dict[str, Any]:
        """vLLM's recipe for this model (:func:`nvl_nemotron_vl.vllm_serving.vllm_serve_settings`)."""
        from .vllm_serving import vllm_serve_settings

        return vllm_serve_settings(self.config)

    def vllm_adapter_module(self, hf_module: str) -> str | None:
        """vLLM serves adapters on the language model only (:mod:`nvl_nemotron_vl.vllm_serving`)."""
        from .vllm_serving import vllm_adapter_module

        try:
            return vllm_adapter_module(self.config, hf_module)
        except ValueError as exc:
            raise BridgeError(str(exc)) from None

    # ---------------------------------------------------------------------------------- FLOPs
    def flops_per_token(self, seq_length: int = 4096) -> float:
        """Training FLOPs per LM token (fwd+bwd = 3x forward) at ``seq_length``, LM only (Megatron-Bridge formula)."""
        from .flops import lm_forward_flops

        return 3.0 * lm_forward_flops(self.config, [seq_length]) / seq_length

    def train_flops(self, batch: Mapping[str, Any], *, num_parameters: int = 0) -> float:
        """Training FLOPs of one batch: LM over the real (unpadded) tokens + ViT + projector per tile
        (``num_parameters`` is not needed: the formula counts each layer's own terms)."""
        from .flops import batch_train_flops

        return batch_train_flops(self.config, batch)

