"""The model-bridge contract: :class:`ModelBridge`, and :func:`resolve_bridge` (HF directory -> bridge).

A model bridge connects one HF checkpoint family to nvl's training model, in the spirit of
Megatron-Bridge's ``MegatronModelBridge``. A bridge subclasses :class:`ModelBridge` and implements
three things:

* :meth:`~ModelBridge.build_model`: the training model (tensor-parallel over the current groups);
* :meth:`~ModelBridge.processor`: conversations -> batches;
* :meth:`~ModelBridge.mapping_table`: one :class:`~nvlcore.mapping.ParamMapping` per training
  parameter (its HF keys, transform kind and TP split).

Everything else the core calls is a documented method with a default implemented here, once, on
top of the mapping table: HF weight loading, checkpoint loading, ``nvl convert``'s conversion groups,
training-checkpoint entries, the layout of linear layers for adapters, freeze groups, FLOPs,
recomputation, generation, the recipe and the default config file. A bridge overrides a default only
where its model needs it. The core calls these methods directly (no probing): the signatures are fixed.

Importing this module is cheap: torch and the checkpoint machinery are imported inside methods.
See docs/plugin-authors.md ("Write a model bridge") and the example in docs/examples/nvl-bridge-example.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nvlcore.mapping import CARRY_PREFIX, LinearLayout, ParamMapping

if TYPE_CHECKING:
    import torch

    from nvlcore.checkpoint import TensorSpec
    from nvlcore.checkpoint.megatron_bridge import MegatronBridgeNames
    from nvlcore.convert.plan import ConversionGroup
    from nvlcore.generation import Generator


#: The share of :meth:`ModelBridge.train_flops` (forward + input gradient + weight gradient, each one
#: forward's worth: 3 x forward) a step executes when the base model is frozen (PEFT): no weight-gradient
#: matmuls, so forward 1x + input gradient 1x. The one factor behind the printed TFLOP/s, ``metrics.jsonl``'s
#: ``tflops_per_gpu`` and the benches' MFU, so that they count the same work.
FROZEN_BASE_FLOPS_SHARE = 2.0 / 3.0


class BridgeError(ValueError):
    """A bridge cannot be found, or a model's weights do not fit its mapping; the message names the file
    or key at fault and what to do."""


def linear_kinds() -> tuple[type, ...]:
    """The linear layer classes nvl knows: torch's and megatron-core's column/row-parallel ones."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torch import nn

    return nn.Linear, ColumnParallelLinear, RowParallelLinear


def matmul_weight_names(model: torch.nn.Module, *, exclude: Iterable[str] = ()) -> set[str]:
    """The trainable parameters that are a linear layer's ``weight`` (:func:`linear_kinds`), less ``exclude``:
    each is read only by its layer's matmul, which bf16 autocast runs on a bf16 rounding of the weight, so
    storing the weight as that rounding changes nothing (``optimizer.use_precision_aware_optimizer`` fully
    offloaded). Embeddings, convolutions, position embeddings and the like are not: an fp32 one keeps the
    activations after it in fp32."""
    kinds, skip = linear_kinds(), set(exclude)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = set()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None) if isinstance(module, kinds) else None
        full = f"{name}.weight" if name else "weight"
        # a weight shared with another module (tied embeddings) is read outside this matmul too
        if w is not None and w.requires_grad and uses.get(id(w)) == 1 and full not in skip:
            out.add(full)
    return out


class ModelBridge(abc.ABC):
    """Connects one HF checkpoint family to nvl's training model.

    Registered by name (``nvl_register_model_bridges``); ``nvl`` instantiates it with
    :meth:`from_hf_dir` through :func:`resolve_bridge`.
    """

    #: Registry name, e.g. ``"tiny_vlm"``.
    name: ClassVar[str]
    #: HF ``architectures`` values this bridge handles (used to pick it automatically).
    architectures: ClassVar[tuple[str, ...]]
    #: The groups the config's ``freeze_<group>`` flags name (``model.freeze_*``, ``peft.freeze_*``),
    #: each mapped to the parameter-name prefix it freezes, e.g. ``{"text": "decoder", "image": "encoder"}``.
    freeze_groups: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: Any, hf_dir: Path | None = None) -> None:
        self.config = config
        self.hf_dir = None if hf_dir is None else Path(hf_dir)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> ModelBridge:
        """The bridge for an HF model directory: ``cls(cls.read_config(hf_dir), hf_dir)``."""
        return cls(cls.read_config(hf_dir), Path(hf_dir))

    @classmethod
    def read_config(cls, hf_dir: str | Path) -> Any:
        """Read ``config.json`` as data (no remote code) and validate it; default: the JSON object."""
        return read_hf_config(hf_dir)

    # ---------------------------------------------------------------------------- abstract part
    @abc.abstractmethod
    def build_model(self, *, dtype: torch.dtype, device: torch.device | str | None = None, init: str = "none",
                    seed: int = 1234) -> torch.nn.Module:
        """Build the training model over the current tensor-parallel group (Megatron's ``parallel_state``).

        :param init: ``"none"`` (the caller loads weights next) or ``"random"`` (seeded by ``seed``).
        """

    @abc.abstractmethod
    def processor(self, *, seq_length: int | None = None, pad_to_multiple_of: int | None = None,
                  **options: Any) -> Any:
        """The processor that turns conversations into model inputs (a :class:`nvlcore.contracts.Processor`;
        :mod:`nvlcore.contracts` imports this module, so the type is named here, not imported).

        :param seq_length: the longest sample in tokens (longer ones are truncated or refused).
        :param pad_to_multiple_of: ``collate`` pads each batch's length to a multiple of this.
        :param options: the bridge's own processor options (``nvl generate`` passes ``processor_options``).
        """

    @abc.abstractmethod
    def mapping_table(self) -> list[ParamMapping]:
        """One :class:`~nvlcore.mapping.ParamMapping` per training parameter of the model this bridge builds."""

    # ------------------------------------------------------------------------- derived: tables
    def carried_hf_keys(self) -> tuple[str, ...]:
        """HF tensors with no training parameter that are expected (carried through ``nvl convert``); default none."""
        return ()

    def mapping_by_name(self) -> dict[str, ParamMapping]:
        """The mapping table keyed by training parameter name (built once per bridge)."""
        cached = self.__dict__.get("_nvl_mapping_by_name")
        if cached is None:
            cached = self.__dict__["_nvl_mapping_by_name"] = {m.megatron: m for m in self.mapping_table()}
        return cached

    def tensor_parallel_of(self, model: torch.nn.Module) -> tuple[Any, int, int]:
        """``(tp_group, tp_rank, tp_size)`` of a model this bridge built; default: Megatron's current groups."""
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                return (parallel_state.get_tensor_model_parallel_group(),
                        parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_world_size())
        except ImportError:  # pragma: no cover - megatron is a dependency
            pass
        return None, 0, 1

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise ``ValueError`` naming what ``tp`` does not divide; default: every mapping's declared units."""
        for m in self.mapping_table():
            m.check_tensor_parallel(tp)

    # --------------------------------------------------------------------------- HF weights
    def load_hf_weights(self, model: torch.nn.Module, hf_dir: str | Path, *, strict: bool = True) -> dict[str, Any]:
        """Load an HF directory's safetensors into ``model`` (this rank's shards), a parameter at a time.

        Strict: every model parameter must be in the table and every checkpoint key mapped or carried.
        :returns: ``{"loaded": n, "carried": [...], "ignored": [...]}``.
        """
        import torch

        from nvlcore.convert.safetensors_io import SafetensorsReader
        from nvlcore.mapping import classify_hf_keys
        from nvlcore.progress import progress_iter

        hf_dir = Path(hf_dir)
        reader = SafetensorsReader(hf_dir)
        table = self.mapping_table()
        _, carried, unknown = classify_hf_keys(table, reader.keys(), self.carried_hf_keys())
        if unknown and strict:
            raise BridgeError(
                f"{hf_dir}: {len(unknown)} checkpoint tensors have no place in the model, e.g. {sorted(unknown)[:8]}; "
                "is config.json consistent with the weights?"
            )
        params = dict(model.named_parameters())
        unmapped = sorted(set(params) - {m.megatron for m in table})
        if unmapped:
            raise BridgeError(f"bridge {self.name!r}: model parameters missing from its mapping table: {unmapped[:8]}")
        missing = sorted(k for m in table for k in m.hf if k not in reader.tensors)
        if missing:
            raise BridgeError(f"{hf_dir}: {len(missing)} tensors the model needs are missing, e.g. {missing[:8]}")
        _, rank, size = self.tensor_parallel_of(model)
        with torch.no_grad():
            for m in progress_iter(table, f"loading {hf_dir.name}", unit="tensor"):
                local = m.components_to_local(m.hf_to_components(reader.read(m.hf)), size, rank)
                p = params[m.megatron]
                if tuple(local.shape) != tuple(p.shape):
                    raise BridgeError(
                        f"{hf_dir}: {', '.join(m.hf)} gives {m.megatron} shape {tuple(local.shape)} on TP rank "
                        f"{rank}/{size}, the model expects {tuple(p.shape)}"
                    )
                p.copy_(local)
        return {"loaded": len(table), "carried": sorted(carried), "ignored": sorted(unknown)}

    # --------------------------------------------------------------------------- conversion
    def conversion_groups(self, hf_specs: Mapping[str, TensorSpec]) -> list[ConversionGroup]:
        """Groups covering every HF tensor of ``hf_specs`` exactly once (``nvl convert``): one per
        mapping (HF tensors <-> its components), and a *carried* group per HF tensor with no training
        parameter, stored under :data:`~nvlcore.mapping.CARRY_PREFIX` so export reproduces it."""
        import sys

        from nvlcore.convert.plan import ConversionGroup

        table = self.mapping_table()
        missing = [k for m in table for k in m.hf if k not in hf_specs]
        if missing:
            where = f"{self.hf_dir / 'config.json'}" if self.hf_dir else "its config"
            raise BridgeError(
                f"{len(missing)} HF tensor(s) the model described by {where} needs are not in the checkpoint, "
                f"e.g. {missing[:5]}; is config.json consistent with the weights?"
            )
        groups = [ConversionGroup(tuple(m.hf), tuple(m.components), m.hf_to_components, m.components_to_hf,
                                  name=m.megatron) for m in table]
        mapped = {k for m in table for k in m.hf}
        expected = set(self.carried_hf_keys())
        unknown = [k for k in hf_specs if k not in mapped and k not in expected]
        if unknown:
            print(f"nvl convert: note: {len(unknown)} HF tensor(s) have no place in the training model and are "
                  f"carried unchanged under {CARRY_PREFIX!r}: {unknown[:5]}", file=sys.stderr)
        groups += [ConversionGroup.rename(k, CARRY_PREFIX + k, carried=True) for k in hf_specs if k not in mapped]
        return groups

    # --------------------------------------------------------------------- training checkpoints
    def checkpoint_entries(self, name: str, local: torch.Tensor, *, tp_group: Any, tp_rank: int,
                           tp_size: int) -> dict[str, Any] | None:
        """This rank's checkpoint entries for parameter ``name`` under its component keys, or ``None``
        for a parameter outside the table (see :func:`nvlcore.mapping.checkpoint_entries`)."""
        from nvlcore.mapping import checkpoint_entries

        return checkpoint_entries(self.mapping_by_name(), name, local, tp_group=tp_group, tp_rank=tp_rank,
                                  tp_size=tp_size)

    def assemble_from_entries(self, name: str, entries: Mapping[str, torch.Tensor], target: torch.Tensor, *,
                              tp_rank: int, tp_size: int) -> bool:
        """Inverse of :meth:`checkpoint_entries` into ``target``; False for a parameter outside the table."""
        from nvlcore.mapping import assemble_from_entries

        return assemble_from_entries(self.mapping_by_name(), name, entries, target, tp_rank=tp_rank, tp_size=tp_size)

    def model_components(self, model: torch.nn.Module) -> dict[str, Any]:
        """The model's parameters as checkpoint entries for :func:`nvlcore.checkpoint.save_checkpoint`
        (parameters outside the table under their own name, sharded along their ``partition_dim``)."""
        from nvlcore.checkpoint import shard_tensor

        group, rank, size = self.tensor_parallel_of(model)
        out: dict[str, Any] = {}
        for name, p in model.named_parameters():
            ent = self.checkpoint_entries(name, p.detach(), tp_group=group, tp_rank=rank, tp_size=size)
            if ent is None:
                split = size > 1 and getattr(p, "tensor_model_parallel", False)
                ent = {name: shard_tensor(p.detach(), int(getattr(p, "partition_dim", 0)),
                                          group) if split else p.detach()}
            out.update(ent)
        return out

    def megatron_bridge_names(self) -> MegatronBridgeNames | None:
        """How Megatron-Bridge names this model's tensors in its checkpoints (prefix, stacked layer lists,
        padded vocabulary rows, provider class), so that :meth:`open_checkpoint` reads them and
        ``nvl convert import --format megatron-bridge`` writes them; default ``None``: no such layout."""
        return None

    def open_checkpoint(self, path: Any) -> Any:
        """A checkpoint at ``path`` (run dir or ``iter_N`` dir) under this bridge's component keys: an nvl
        :class:`~nvlcore.checkpoint.Checkpoint`, or a Megatron-Bridge ``torch_dist`` checkpoint (detected by
        its ``metadata.json``) as a :class:`~nvlcore.checkpoint.megatron_bridge.MegatronBridgeView`."""
        from nvlcore.checkpoint import Checkpoint, open_checkpoint
        from nvlcore.checkpoint.megatron_bridge import MegatronBridgeView, megatron_bridge_iter_dir

        if isinstance(path, (Checkpoint, MegatronBridgeView)):
            return path
        it_dir = megatron_bridge_iter_dir(path)
        if it_dir is None:
            return open_checkpoint(path)
        names = self.megatron_bridge_names()
        if names is None:
            raise BridgeError(f"{it_dir} is a Megatron-Bridge checkpoint, and model bridge {self.name!r} does not "
                              "say how Megatron-Bridge names its tensors (megatron_bridge_names)")
        return MegatronBridgeView(it_dir, self.mapping_table(), names)

    def load_checkpoint_weights(self, model: torch.nn.Module, path: Any, *, strict: bool = True) -> dict[str, Any]:
        """Load a checkpoint (base dir, ``iter_N`` dir or an opened one; nvl's or Megatron-Bridge's, see
        :meth:`open_checkpoint`) into ``model``, whatever TP size it was written at; each rank reads only
        its part of each component of an nvl checkpoint (of a Megatron-Bridge one: whole tensors, then its part).

        Strict: every model parameter must be mapped and in the checkpoint with matching shapes;
        ``strict=False`` loads what is there and leaves the rest (adapters) alone.
        :returns: ``{"loaded": n, "iteration": N, "path": str, "ignored": [...], "not_loaded": [...]}``.
        """
        import torch

        from nvlcore.progress import progress_iter

        ck = self.open_checkpoint(path)
        specs = ck.specs()
        table = self.mapping_by_name()
        params = dict(model.named_parameters())
        unmapped = sorted(set(params) - set(table))
        if unmapped and strict:
            raise BridgeError(
                f"model parameters outside bridge {self.name!r}'s mapping: {unmapped[:5]}; load pretrained weights "
                "before adding adapters, or pass strict=False to load the mapped ones and leave these alone"
            )
        params = {n: p for n, p in params.items() if n in table}
        needed = [c for n in params for c in table[n].components]
        missing = [c for c in needed if c not in specs]
        if missing and strict:
            raise BridgeError(
                f"checkpoint {ck.path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]} "
                f"(it holds {len(specs)}; is it a checkpoint of this model?)"
            )
        group, rank, size = self.tensor_parallel_of(model)
        loaded = 0
        for name, p in progress_iter(params.items(), f"loading {ck.path.name}", total=len(params), unit="tensor"):
            if any(c not in specs for c in table[name].components):
                continue
            buf = torch.empty_like(p, requires_grad=False)
            template = self.checkpoint_entries(name, buf, tp_group=group, tp_rank=rank, tp_size=size)
            assert template is not None
            for key, t in template.items():
                if tuple(t.shape) != tuple(specs[key].shape):  # a DTensor's shape is the logical one
                    raise BridgeError(
                        f"shape mismatch for {key}: checkpoint {tuple(specs[key].shape)}, the model needs "
                        f"{tuple(t.shape)} (parameter {name} {tuple(p.shape)} at TP {size}; {ck.path})"
                    )
            got = ck.load(template)
            local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in got.items()}
            self.assemble_from_entries(name, local, p.data, tp_rank=rank, tp_size=size)
            loaded += 1
        used = set(needed)
        ignored = sorted(k for k in specs if k not in used)
        not_loaded = unmapped + sorted(n for n in params if any(c not in specs for c in table[n].components))
        return {"loaded": loaded, "iteration": ck.iteration, "path": str(ck.path), "ignored": ignored,
                "not_loaded": not_loaded}

    # ------------------------------------------------------------------------ adapters, freezing
    def linear_layouts(self) -> dict[str, LinearLayout]:
        """Module name -> :class:`~nvlcore.mapping.LinearLayout` for each linear layer of the table
        (norm-fused or not, fused row parts): what adapter methods need to wrap the layer."""
        from nvlcore.mapping import linear_layouts

        return linear_layouts(self.mapping_table())

    def freeze(self, model: torch.nn.Module, flags: Mapping[str, bool | None], *, other: bool = False,
               skip: Callable[[str], bool] | None = None, key: str = "model") -> dict[str, bool]:
        """Turn off gradients of the :attr:`freeze_groups` whose flag is true (never turns one on).

        :param flags: group -> freeze? (``None``/``False``: leave it). A true flag for a group this bridge
            does not declare raises ``ValueError`` naming ``<key>.freeze_<group>``.
        :param other: freeze parameters outside every group too.
        :param skip: parameter names to leave alone (an adapter method's own parameters).
        :returns: group (or ``"other"``) -> whether it was frozen, for the groups the model has.
        """
        unknown = sorted(g for g, on in flags.items() if on and g not in self.freeze_groups)
        if unknown:
            raise ValueError(
                f"{', '.join(f'{key}.freeze_{g}' for g in unknown)}=True: model bridge {self.name!r} has no such "
                f"group (it has: {', '.join(sorted(self.freeze_groups)) or 'none'}); remove the setting"
            )
        return freeze_parameters(model, self.freeze_groups, {g: bool(v) for g, v in flags.items()}, other=other,
                                 skip=skip)

    # ------------------------------------------------------------------------- training options
    def keeps_fp32(self, name: str, param: torch.Tensor) -> bool:
        """Whether the frozen parameter ``name`` stays fp32 however the rest of the frozen base is stored
        (bf16 under autocast, or a PEFT method's 4-bit format), so that the base a PEFT run trains
        against is the one its checkpoint, merge and inference use. Default: every parameter of at most one dimension
        (norm weights, biases, per-channel scalars: a negligible share of the bytes, and the values
        rounding hurts most); a bridge that knows its precision-sensitive parameters names them."""
        return param.dim() <= 1

    def quantize_module_filter(self, name: str) -> bool:
        """Whether the frozen linear layer ``name``'s weight may be stored in a PEFT method's low-bit format
        (``peft.base_dtype=nf4``); one left out stays in the compute dtype. Default: every linear layer. A
        bridge leaves out its vocabulary projection, as transformers' bitsandbytes integration keeps
        ``lm_head``: a loss computed in chunks would dequantize it once per chunk."""
        return True

    def fp8_module_filter(self, name: str, module: torch.nn.Module) -> bool:
        """Whether linear layer ``name`` may run its matmuls in FP8 under an FP8 ``mixed_precision`` recipe
        (:mod:`nvlcore.training.fp8`). The core has already left out the first and last decoder layers,
        weights with a dimension not a multiple of 16, adapters and packed weights; a bridge leaves out
        what should stay bf16 for accuracy or speed (an encoder tower, the output layer, layers too small
        to gain). Default: every linear layer."""
        return True

    def train_flops(self, batch: Mapping[str, Any], *, num_parameters: int) -> float:
        """Training FLOPs of one micro-batch (a :data:`nvlcore.contracts.Batch`; forward + backward, every
        weight trained: 3 x forward). A run with a frozen base counts :data:`FROZEN_BASE_FLOPS_SHARE` of it.

        Default: ``6 x num_parameters x real tokens`` (no attention or vision term); a bridge with a
        model-specific formula overrides it.

        :param num_parameters: the model's logical (full, TP-independent) parameter count.
        """
        return 6.0 * num_parameters * real_tokens(batch)

    #: ``model.recompute_modules`` this bridge's selective recomputation knows: name -> what it recomputes,
    #: cheapest in speed first (the memory plan's ``auto`` adds them to the default in this order)
    recompute_modules: ClassVar[Mapping[str, str]] = {}
    #: what ``selective`` recomputes when ``model.recompute_modules`` is null
    default_recompute_modules: ClassVar[tuple[str, ...]] = ()

    def set_recompute(self, model: torch.nn.Module, granularity: str, modules: Sequence[str] | None = None) -> None:
        """Activation recomputation, Megatron's ``model.recompute_granularity`` (``selective`` or ``full``);
        ``modules``: under ``selective``, the :attr:`recompute_modules` to recompute (None: the default).
        Default: none, so this raises naming the key."""
        raise ValueError(f"model.recompute_granularity={granularity!r}: model bridge {self.name!r} has no activation "
                         "recomputation; remove the setting")

    def set_sequence_parallel(self, model: torch.nn.Module) -> None:
        """Megatron's sequence parallelism (``model.sequence_parallel=true``, tensor parallelism > 1): the
        activations between the tensor-parallel regions are split along the sequence over the TP ranks
        (row-parallel outputs reduce-scattered, column-parallel inputs all-gathered). It must change no
        loss, gradient or saved state. Default: none, so this raises naming the key."""
        raise ValueError(f"model.sequence_parallel=true: model bridge {self.name!r} has no sequence parallelism; "
                         "set it false")

    #: ``model.cuda_graph_scope`` names this bridge's :meth:`cuda_graph_modules` knows: scope -> what it graphs
    cuda_graph_scopes: ClassVar[Mapping[str, str]] = {}

    def cuda_graph_modules(self, model: torch.nn.Module, scopes: Sequence[str]) -> dict[str, torch.nn.Module]:
        """The modules ``model.cuda_graph_impl=local`` graphs for ``scopes`` (megatron-core's
        ``model.cuda_graph_scope`` names, among :attr:`cuda_graph_scopes`): module name -> module, in forward
        order. The bridge puts the model in the calling mode the graphs need: in training forwards each
        returned module is called with positional tensors or ``None`` only, of shapes fixed by the batch's
        (packed or padded-to-``seq_length``) shape, and runs no host synchronisation or shape-dependent
        launch planning on their content (:mod:`nvlcore.training.cuda_graphs` captures and replays it).
        Default: no module can be graphed, so this raises naming the key."""
        raise ValueError(f"model.cuda_graph_impl=local: model bridge {self.name!r} has no CUDA-graph scopes "
                         "(ModelBridge.cuda_graph_modules); set model.cuda_graph_impl=none")

    def num_decoder_layers(self) -> int | None:
        """How many layers :meth:`decoder_layers` returns, known before the model is built (the memory plan's
        ``model.cpu_offloading_num_layers`` choices); default: None (unknown)."""
        return None

    def decoder_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The language model's decoder layers in forward order (``model.cpu_offloading`` offloads the
        activations of the first ones). Default: none, so this raises naming the key."""
        raise ValueError(f"model.cpu_offloading=true: model bridge {self.name!r} does not list its decoder layers "
                         "(ModelBridge.decoder_layers); remove the setting")

    def set_kernels(self, model: torch.nn.Module, choice: str) -> dict[str, str]:
        """Pick the implementations of the model's hot ops (``model.kernels``) and return op ->
        implementation for the run's first lines. Default: the model has one implementation, so
        ``auto`` and ``reference`` mean it (an empty report) and any other choice is refused."""
        if choice not in ("auto", "reference"):
            raise ValueError(f"model.kernels={choice!r}: model bridge {self.name!r} has no kernel choice; "
                             "use auto or reference")
        return {}

    def kernels_ran(self, model: torch.nn.Module) -> dict[str, str]:
        """Op -> the implementation(s) that actually ran so far, for ops whose path :meth:`set_kernels` could
        not fix in advance (it depends on the inputs' dtype or masks); ``nvl finetune`` prints it after the
        first step, so the run's record says what ran. Default: nothing depends on the inputs (empty)."""
        return {}

    # -------------------------------------------------------------------------------- memory plan
    def parameter_shapes(self, tp_size: int = 1) -> dict[str, tuple[tuple[int, ...], int]]:
        """Parameter name -> ``(full shape, elements one of tp_size ranks holds)``, with no weights loaded
        (``nvl finetune``'s memory plan). Default: build the model on the meta device and count, dividing
        the parameters marked ``tensor_model_parallel`` by ``tp_size`` when the build was not already sharded."""
        model = self.meta_model()
        _, _, built = self.tensor_parallel_of(model)
        out: dict[str, tuple[tuple[int, ...], int]] = {}
        for name, p in model.named_parameters():
            split = getattr(p, "tensor_model_parallel", False)
            local = p.numel() * (built if split and built > 1 else 1)  # the full tensor's elements
            out[name] = (tuple(p.shape), local // tp_size if split else local)
        return out

    #: linear weights whose dtype the model reads to cast its activations: :meth:`matmul_weights` leaves them out
    #: (stored in bf16 they would round what an fp32 master keeps in fp32)
    dtype_setting_weights: ClassVar[tuple[str, ...]] = ()

    def meta_model(self) -> torch.nn.Module:
        """The model built on the meta device (every parameter's shape, no memory, no weights), which the memory
        plan reads. Default: :meth:`build_model` on the meta device (over the run's process groups)."""
        import torch

        with torch.device("meta"):
            return self.build_model(dtype=torch.float32, device="meta", init="none")

    def matmul_weights(self) -> frozenset[str]:
        """The parameters that are a linear layer's weight and nothing else (:func:`matmul_weight_names` of
        :meth:`meta_model`, less :attr:`dtype_setting_weights`): what ``nvl finetune`` stores in bf16 on the GPU
        when the precision-aware optimizer is fully offloaded (its fp32 master on the host), and what the memory
        plan then counts at 2 bytes. Computed once per bridge."""
        known = self.__dict__.get("_matmul_weights")
        if known is None:
            names = matmul_weight_names(self.meta_model(), exclude=self.dtype_setting_weights)
            known = self.__dict__["_matmul_weights"] = frozenset(names)
        return known

    def workload_upper_bound(self, *, seq_length: int, micro_batch_size: int, packed: bool) -> tuple[int, int]:
        """The most ``(language-model tokens, image tiles)`` one micro-batch can hold, for a plan made before
        any data is read. Default: every row full, no images."""
        return seq_length * micro_batch_size, 0

    def activation_bytes(self, *, tokens: int, tiles: int, recompute: str | None, tp_size: int,
                         trained: Mapping[str, bool], offload_layers: int = 0,
                         adapted: Mapping[str, bool] | None = None,
                         recompute_modules: Sequence[str] | None = None,
                         sequence_parallel: bool = False) -> dict[str, float] | None:
        """Bytes one micro-batch of ``tokens`` tokens and ``tiles`` image tiles keeps on one rank for
        backward, by phase (``{"language model": ..., "vision tower": ...}``), under ``recompute``
        (``model.recompute_granularity``; ``recompute_modules``: selective's modules, None = the default)
        with ``offload_layers`` layers' activations on the host; ``sequence_parallel``
        (``model.sequence_parallel``, passed only when true) splits what lies between the TP regions;
        ``trained``: freeze group -> whether its base weights train; ``adapted``: freeze group -> whether
        a PEFT method's adapters sit in it (a frozen group with adapters keeps activations for them).
        Default: unknown (None), and the plan counts weights, gradients and optimizer state only."""
        return None

    def memory_phases(self) -> dict[str, str]:
        """Module name prefix -> the phase an out-of-memory there is reported as (``vision tower``);
        default: the :attr:`freeze_groups`, named by their group."""
        return {prefix: group.replace("_", " ") for group, prefix in self.freeze_groups.items()}

    # --------------------------------------------------------------------------------- generation
    def generator_for_model(self, model: torch.nn.Module, *, device: Any = None, dtype: Any = None,
                            cuda_graph: bool | None = None, **options: Any) -> Generator:
        """A :class:`nvlcore.generation.Generator` over a built and loaded model: its processor and decoder
        around it. :mod:`nvlcore.inference` calls it for ``nvl generate``, ``nvl eval`` and the
        Python API (after building the model, loading weights and a PEFT run), the trainer for
        ``validation.generate_eval_interval`` (``cuda_graph=False``).

        :param dtype: dtype of the media tensors (default: the model's parameters').
        :param cuda_graph: replay the decode step as a CUDA graph (None: the bridge's default).
        :param options: the bridge's own generation options, which its plugin's command options
            supply (:meth:`nvlcore.cli.plugin_options.CommandOptions.generator_options`); one it does
            not know raises ``ValueError`` naming it. Default: no generation.
        """
        raise NotImplementedError(f"model bridge {self.name!r} does not support generation")

    # ---------------------------------------------------------------------------------- config
    def recipe(self, *, peft: bool = False, adapted_groups: Sequence[str] = ()) -> Mapping[str, Any]:
        """Default config values (nested by section) for fine-tuning this model; ``peft``: the PEFT
        variant, whose adapters go on ``adapted_groups`` (:attr:`freeze_groups` names). Default: none."""
        return {}

    def default_config_file(self) -> Path | None:
        """A YAML file applied over the recipe unless ``--config-file`` replaces it; default none."""
        return None

    # --------------------------------------------------------------------------------- serving
    def vllm_serve_settings(self) -> dict[str, Any]:
        """The ``vllm serve`` settings this model is served with: option names in snake_case (``max_model_len``)
        -> values (``True``: a bare flag; a dict or list: JSON). :mod:`nvlcore.serve.vllm_backend` turns them into
        the command line. Default: none (vLLM's defaults)."""
        return {}

    def vllm_adapter_module(self, hf_module: str) -> str | None:
        """The name vLLM gives the module an adapter on HF module ``hf_module`` (an HF weight key without
        ``.weight``) attaches to, or ``None`` where vLLM serves no adapter (that part must be merged into the
        base vLLM serves instead). The vLLM adapter export (``nvl export --target vllm``) asks this per module.

        :raises BridgeError: naming the module vLLM cannot adapt; by default for every module (the bridge
            does not say how vLLM names this model's modules).
        """
        raise BridgeError(f"model bridge {self.name!r} does not say which modules vLLM serves adapters on "
                          f"({hf_module}); serve a merged model instead (`nvl convert export`)")


# ------------------------------------------------------------------------------------- helpers
#: How many offloaded layers' forwards are running now (:mod:`nvlcore.training.offload` counts them).
OFFLOADED_FORWARDS = [0]


def saved_tensors_offloaded() -> bool:
    """Whether the forward running now is a layer's whose saved tensors the core copies to host memory
    (``model.cpu_offloading``). A model that frees a saved tensor's memory itself and refills it in backward
    (output-discarding recomputation) skips that here: the copy may still be reading the tensor, and backward
    gets the host copy back, not the refilled one."""
    return OFFLOADED_FORWARDS[0] > 0


def freeze_parameters(model: torch.nn.Module, groups: Mapping[str, str], flags: Mapping[str, bool], *,
                      other: bool = False, skip: Callable[[str], bool] | None = None) -> dict[str, bool]:
    """Set ``requires_grad=False`` on the parameters under each flagged group's prefix (and, with
    ``other``, on those under none). Never sets ``requires_grad=True``. Returns the groups seen."""
    seen: dict[str, bool] = {}
    for name, p in model.named_parameters():
        if skip is not None and skip(name):
            continue
        group = next((g for g, prefix in groups.items() if name == prefix or name.startswith(prefix + ".")), "other")
        want = other if group == "other" else bool(flags.get(group))
        seen[group] = want
        if want:
            p.requires_grad_(False)
    return seen


def real_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens that are not padding: ``attention_mask`` ones (all of ``input_ids`` without a mask)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """An HF directory's ``config.json`` as a dict (:func:`nvlcore.hub.read_hf_config`); errors name the file."""
    from nvlcore.hub import HFConfigError
    from nvlcore.hub import read_hf_config as read_config_json

    try:
        return read_config_json(hf_dir)
    except HFConfigError as exc:
        raise BridgeError(str(exc)) from None


def is_hf_dir(path: str | Path) -> bool:
    """An HF model directory (``config.json``), not an nvl checkpoint (no ``iter_*`` layout)."""
    p = Path(path)
    return (p / "config.json").is_file() and not p.name.startswith("iter_") and not any(p.glob("iter_*"))


def first_matching_bridge(architectures: Iterable[str], bridges: Mapping[str, type]) -> str | None:
    """The name of the first bridge whose ``architectures`` intersect the given ones."""
    wanted = set(architectures)
    for name, cls in bridges.items():
        if wanted & set(cls.architectures):
            return name
    return None


def resolve_bridge(hf_dir_or_hub_id: str | Path | None, name: str | None = None, *, manager: Any = None,
                   revision: str | None = None, option: str = "--hf-model-path") -> ModelBridge:
    """The bridge instance for an HF model (a directory or a Hub id), by ``name`` or its ``architectures``.

    Every command resolves its model this way.

    :param name: a registered bridge name (``--bridge``, ``model.bridge``), overriding the match.
    :param manager: the plugin manager (default: the process's).
    :raises BridgeError: naming the file or option at fault and what to do (a ``ValueError``).
    """
    from nvlcore.hub import HubResolutionError, resolve_hf_model
    from nvlcore.registry import RegistryError

    if hf_dir_or_hub_id is None or str(hf_dir_or_hub_id) == "":
        raise BridgeError(f"no HF model: pass {option} DIR (or set model.hf_model_path)")
    try:
        hf = resolve_hf_model(hf_dir_or_hub_id, revision=revision, option=option)
    except HubResolutionError as exc:
        raise BridgeError(str(exc)) from None
    if manager is None:
        from nvlcore.plugins import get_plugin_manager

        manager = get_plugin_manager()
    registry = manager.registry("model_bridge")
    if name is None:
        archs = list(read_hf_config(hf).get("architectures") or [])
        if not archs:
            raise BridgeError(f"{hf / 'config.json'} has no 'architectures' field; name the bridge (--bridge NAME "
                              f"or model.bridge=NAME; installed: {', '.join(registry.names()) or 'none'})")
        classes: dict[str, Any] = {}
        broken: list[str] = []
        for n in registry.names():
            try:
                classes[n] = registry.get(n)
            except Exception as exc:  # one broken bridge must not hide the one that matches
                broken.append(f"{n}: {type(exc).__name__}: {exc}")
        name = first_matching_bridge(archs, classes)
        if name is None:
            known = sorted({a for c in classes.values() for a in c.architectures})
            raise BridgeError(
                f"{hf / 'config.json'}: no installed model bridge handles architectures {archs} (installed bridges "
                f"handle: {known or 'none'}); install the model's plugin or name the bridge (--bridge NAME, "
                "model.bridge=NAME; `nvl plugins list` shows what is installed)"
                + (f"; bridges that failed to load: {'; '.join(broken)}" if broken else "")
            )
    try:
        cls = registry.get(name)
    except RegistryError as exc:
        raise BridgeError(str(exc)) from None
    if not (isinstance(cls, type) and issubclass(cls, ModelBridge)):
        raise BridgeError(f"model bridge {name!r} ({cls!r}) does not subclass nvlcore.bridge.ModelBridge; "
                          "its plugin needs updating (see docs/plugin-authors.md)")
    try:
        return cls.from_hf_dir(hf)
    except BridgeError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # a damaged config.json: the message names it
        raise BridgeError(f"model bridge {name!r} cannot read {hf}: {exc}") from exc
