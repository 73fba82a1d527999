"""Megatron-Bridge checkpoints (megatron-core ``dist_checkpointing``, ``torch_dist`` backend): detect, read, write.

The layout Megatron-Bridge writes (its ``src/megatron/bridge/training/checkpointing.py`` and
megatron-core's ``dist_checkpointing/serialization.py``, repos NVIDIA-NeMo/Megatron-Bridge and NVIDIA/Megatron-LM)::

    <root>/latest_train_state.pt               tracker (Megatron-Bridge)
    <root>/latest_checkpointed_iteration.txt   tracker (Megatron-LM)
    <root>/iter_0000200/
        metadata.json                          {"sharded_backend": "torch_dist", ...}: what marks the layout
        .metadata  __0_0.distcp ...            PyTorch DCP: every ShardedTensor as its *global* tensor
        common.pt                              the non-sharded state (releases <= 0.5.1); later megatron-core
                                               keeps it as the ShardedObject ``common_state`` in the .distcp files
        run_config.yaml  train_state.pt

A ShardedTensor's global tensor is the concatenation of the TP ranks' local tensors along the split
axis, so a checkpoint written at any TP size reads the same here. Two conventions of megatron-core
matter for names: a homogeneous ``TransformerBlock`` stacks its layers on a leading axis
(``decoder.layers.mlp.linear_fc1.weight`` of shape ``[num_layers, ...]``), and a fused layer whose
rows are parts split separately over TP (an SSM mixer's ``in_proj``) is stored as its parts (``.z``, ``.x``...).

This module knows the layout and nothing of any model: :class:`MegatronBridgeNames` (given by a
model bridge) says how a model's tensors are named, and :class:`MegatronBridgeView` shows such a
checkpoint under the bridge's component keys, with the interface of :class:`~nvlcore.checkpoint.Checkpoint`
that loading, export and merging use. The mapping table is passed in (objects with ``megatron``,
``components``, ``row_parts``, ``local_to_components`` and ``components_to_local``, i.e.
:class:`nvlcore.mapping.ParamMapping`), so this floor imports no mapping code.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvlcore.checkpoint.layout import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    first_line,
    parse_iteration,
    resolve_checkpoint_dir,
)
from nvlcore.checkpoint.load import Checkpoint, CheckpointKeyError
from nvlcore.checkpoint.save import TensorSpec

if TYPE_CHECKING:
    import torch

MCORE_METADATA = "metadata.json"
COMMON_PT = "common.pt"
COMMON_STATE_KEY = "common_state"
TORCH_DIST = "torch_dist"


class MegatronBridgeError(ValueError):
    """A Megatron-Bridge checkpoint nvl cannot use as asked (another backend, model or PEFT method)."""


@dataclass(frozen=True)
class MegatronBridgeNames:
    """How Megatron-Bridge names one model's tensors in its checkpoints (a model bridge's
    :meth:`~nvlcore.bridge.ModelBridge.megatron_bridge_names`).

    :param prefix: put before every training parameter name (the model wrapper's attribute, e.g. ``llava_model.``).
    :param stacked: name prefixes of layer lists megatron-core stores stacked on a leading axis
        (homogeneous ``TransformerBlock`` s, e.g. ``encoder.decoder.layers.``).
    :param padded_rows: parameters whose stored rows megatron-core pads (vocabulary-parallel
        tensors, to a multiple of ``make_vocab_size_divisible_by`` x TP) -> the model's real rows.
    :param make_vocab_size_divisible_by: what the writer pads ``padded_rows`` to.
    :param model_target: the ``_target_`` of run_config.yaml's ``model`` section (the model provider
        class); a checkpoint whose provider class has another name is refused. ``None``: not checked.
    """

    prefix: str = ""
    stacked: tuple[str, ...] = ()
    padded_rows: Mapping[str, int] = field(default_factory=dict)
    make_vocab_size_divisible_by: int = 128
    model_target: str | None = None


def megatron_bridge_iter_dir(path: str | os.PathLike[str]) -> Path | None:
    """The ``iter_N`` directory of a Megatron-Bridge checkpoint at ``path`` (its run directory or an
    ``iter_N`` directory), or ``None`` when ``path`` is not one (detection by ``metadata.json``)."""
    try:
        it = resolve_checkpoint_dir(path)
    except (CheckpointNotFoundError, CheckpointCorruptError):
        return None
    return it if (it / MCORE_METADATA).is_file() else None


class MegatronBridgeCheckpoint(Checkpoint):
    """One ``iter_N`` directory of a Megatron-Bridge checkpoint under its own (raw) tensor keys."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        meta = self.path / MCORE_METADATA
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointCorruptError(f"{meta} is damaged ({first_line(exc, 80)})") from None
        if backend != TORCH_DIST:
            raise MegatronBridgeError(
                f"{meta}: sharded_backend {backend!r}; nvl reads Megatron-Bridge checkpoints saved with "
                "checkpoint.ckpt_format=torch_dist (re-save the run with that format)"
            )

    @property
    def iteration(self) -> int:
        it = parse_iteration(self.path.name)
        if it is not None:
            return it
        try:
            return int((self.common_state() or {}).get("iteration", 0))
        except CheckpointCorruptError:  # a directory named otherwise, whose common state nvl cannot read
            return 0

    def train_state(self) -> dict[str, Any]:
        """``train_state.pt`` with plain numbers (Megatron-Bridge stores 0-d tensors) and ``iteration`` = step."""
        raw = super().train_state()
        out = {k: (v.item() if hasattr(v, "item") else v) for k, v in raw.items()}
        if "step" in out:
            out.setdefault("iteration", int(out["step"]))
        return out

    def common_state(self) -> dict[str, Any] | None:
        """The non-sharded state: ``common.pt`` (releases <= 0.5.1) or the ``common_state`` object inside
        the .distcp files (later megatron-core); ``None`` when neither is there."""
        p = self.path / COMMON_PT
        if p.is_file():
            with open(p, "rb") as f:
                return dict(_safe_load(f.read(), p))
        md = self._md()
        for key, item in md.state_dict_metadata.items():
            if key.split("/", 1)[0] == COMMON_STATE_KEY and not hasattr(item, "size"):
                obj = self._read_object(md, key)
                # megatron-core's torch_dist stores a ShardedObject as the list of its local objects
                return dict(obj[0] if isinstance(obj, list) and len(obj) == 1 else obj)
        return None

    def _read_object(self, md: Any, key: str) -> Any:
        """A ShardedObject (bytes of ``torch.save``) straight from its byte range in a .distcp file."""
        for index, info in md.storage_data.items():
            if getattr(index, "fqn", None) == key:
                with open(self.path / info.relative_path, "rb") as f:
                    f.seek(int(info.offset))
                    data = f.read(int(info.length))
                return _safe_load(data, f"{self.path}: {key}")
        raise CheckpointCorruptError(f"{self.path}: {key} is listed in .metadata but has no stored bytes")


def _safe_load(data: bytes, what: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` (nvl unpickles no code from a checkpoint); one line if it fails."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointCorruptError(f"{what}: not readable as plain data with torch.load(weights_only=True) "
                                     f"({first_line(exc, 100)})") from None


def nvl_run_config(mb: Mapping[str, Any] | None, where: Path) -> dict[str, Any] | None:
    """The parts of a Megatron-Bridge ``run_config.yaml`` nvl reads, in nvl's shape:
    ``checkpoint.pretrained_checkpoint``, ``model.freeze_*``, and the ``peft`` section as it is (with its
    ``_target_``: the PEFT method plugin that reads the run translates it)."""
    if mb is None:
        return None
    model = dict(mb.get("model") or {})
    out: dict[str, Any] = {
        "model": {k: v for k, v in model.items() if k.startswith("freeze_")},
        "checkpoint": {"pretrained_checkpoint": (mb.get("checkpoint") or {}).get("pretrained_checkpoint")},
        "megatron_bridge": {"model_target": model.get("_target_"), "run_config": str(where / "run_config.yaml")},
    }
    if isinstance(mb.get("peft"), Mapping):
        out["peft"] = dict(mb["peft"])
    return out


class MegatronBridgeView:
    """A Megatron-Bridge checkpoint seen under a model bridge's component keys (nvl's checkpoint keys).

    ``specs``/``keys``/``load`` behave as :class:`~nvlcore.checkpoint.Checkpoint`'s (full tensors, or
    into a template whose DTensors get their shard); tensors the table does not name (adapters, trained
    extras) keep megatron-core's name with the prefix removed and stacked layers unstacked. Stacked
    tensors are read whole once and kept while the view lives (one layer list's worth of memory).
    """

    def __init__(self, path: str | os.PathLike[str], table: Iterable[Any], names: MegatronBridgeNames) -> None:
        self.raw = MegatronBridgeCheckpoint(path)
        self.path = self.raw.path
        self.names = names
        self._stack_cache: dict[str, torch.Tensor] = {}
        self._check_model()
        self._flat = self._flatten()
        self._sources: dict[str, tuple[str, Any]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._plan(list(table))

    def __repr__(self) -> str:
        return f"MegatronBridgeView({str(self.path)!r})"

    # -- small files --------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        return self.raw.iteration

    def mb_run_config(self) -> dict[str, Any] | None:
        """run_config.yaml as Megatron-Bridge wrote it."""
        return self.raw.run_config()

    def run_config(self) -> dict[str, Any] | None:
        """run_config.yaml in nvl's shape (:func:`nvl_run_config`)."""
        return nvl_run_config(self.mb_run_config(), self.path)

    def train_state(self) -> dict[str, Any]:
        return self.raw.train_state()

    def common_state(self) -> dict[str, Any] | None:
        return self.raw.common_state()

    def manifest(self) -> dict[str, Any]:
        return {}

    def extra_state(self) -> None:
        return None

    def rank_state(self, rank: int | None = None) -> None:
        return None

    def sharded_state_names(self) -> list[str]:
        return []

    def _check_model(self) -> None:
        want = self.names.model_target
        got = ((self.mb_run_config() or {}).get("model") or {}).get("_target_")
        if want and got and str(got).rsplit(".", 1)[-1] != want.rsplit(".", 1)[-1]:
            raise MegatronBridgeError(
                f"{self.path}/run_config.yaml: model._target_ is {got}, not {want}: a checkpoint of another model "
                "(pass --hf-model-path of the model it was trained from)"
            )

    # -- names --------------------------------------------------------------------------------
    def _flatten(self) -> dict[str, tuple[str, int | None, TensorSpec]]:
        """Per-layer names (prefix removed, stacked layers unstacked) -> (raw key, layer, spec)."""
        out: dict[str, tuple[str, int | None, TensorSpec]] = {}
        pre = self.names.prefix
        for key, spec in self.raw.specs().items():
            if not key.startswith(pre):
                continue  # optimizer state, other models' tensors
            name = key[len(pre):]
            stack = next((s for s in self.names.stacked if name.startswith(s)
                          and not name[len(s):][:1].isdigit()), None)
            if stack is None:
                out[name] = (key, None, spec)
                continue
            rest = name[len(stack):]
            for i in range(spec.shape[0]):
                out[f"{stack}{i}.{rest}"] = (key, i, TensorSpec(tuple(spec.shape[1:]), spec.dtype))
        if not out:
            raise MegatronBridgeError(
                f"{self.path} holds no tensor named {pre}...: not a Megatron-Bridge checkpoint of this model"
            )
        return out

    def _plan(self, table: list[Any]) -> None:
        import torch

        used: set[str] = set()
        for m in table:
            comps = tuple(m.components)
            if len(comps) > 1 and not m.row_parts:  # stored fused (its TP=1 layout), e.g. linear_qkv
                if m.megatron not in self._flat:
                    continue
                spec = self._flat[m.megatron][2]
                parts = m.local_to_components([torch.empty(spec.shape, dtype=spec.dtype, device="meta")])
                for c in comps:
                    self._sources[c] = ("fused", m)
                    self._specs[c] = TensorSpec(tuple(parts[c].shape), spec.dtype)
                used.add(m.megatron)
                continue
            for c in comps:  # one tensor, or parts megatron-core stores separately (in_proj .z, .x ...)
                if c in self._flat:
                    self._add_direct(c, self.names.padded_rows.get(m.megatron) if len(comps) == 1 else None)
                    used.add(c)
        for name in self._flat:
            if name not in used:
                self._add_direct(name, None)

    def _add_direct(self, name: str, rows: int | None) -> None:
        spec = self._flat[name][2]
        if rows is not None and spec.shape[0] != rows:
            if spec.shape[0] < rows:
                raise MegatronBridgeError(f"{self.path}: {name} has {spec.shape[0]} rows, the model needs {rows}")
            spec = TensorSpec((rows,) + tuple(spec.shape[1:]), spec.dtype)
        self._sources[name] = ("direct", rows)
        self._specs[name] = spec

    # -- tensors ------------------------------------------------------------------------------
    def specs(self, state: str | None = None) -> dict[str, TensorSpec]:
        """Shapes and dtypes by component key (no sharded states: optimizer state is not read)."""
        return {} if state is not None else dict(self._specs)

    def keys(self, state: str | None = None) -> list[str]:
        return list(self.specs(state))

    def load(self, template: Mapping[str, torch.Tensor] | Iterable[str] | None = None, *,
             state: str | None = None, group: Any = None) -> dict[str, torch.Tensor]:
        """Tensors by component key: all, the keys given, or into a template (a DTensor gets its shard)."""
        if state is not None:
            raise CheckpointKeyError(f"{self.path}: nvl reads no {state!r} state from a Megatron-Bridge checkpoint")
        keys = list(self._specs) if template is None else list(template)
        missing = [k for k in keys if k not in self._specs]
        if missing:
            raise CheckpointKeyError(f"{len(missing)} tensor(s) not in Megatron-Bridge checkpoint {self.path}: "
                                     f"{missing[:5]} (it holds {len(self._specs)})")
        full = self._full(keys)
        if template is None or not isinstance(template, Mapping):
            return full
        out = dict(template)
        for k, dest in out.items():
            _fill(dest, full[k], k, self.path)
        return out

    def _full(self, keys: list[str]) -> dict[str, torch.Tensor]:
        flat_names = {self._sources[k][1].megatron if self._sources[k][0] == "fused" else k for k in keys}
        raw = self._raw_tensors(flat_names)
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            how, arg = self._sources[k]
            if how == "fused":
                out[k] = arg.local_to_components([raw[arg.megatron]])[k]
            else:
                out[k] = raw[k] if arg is None else raw[k][:arg]
        return out

    def _raw_tensors(self, flat_names: Iterable[str]) -> dict[str, torch.Tensor]:
        want = {n: self._flat[n] for n in flat_names}
        need = sorted({key for key, layer, _ in want.values() if layer is None or key not in self._stack_cache})
        loaded = self.raw.load(need) if need else {}
        for key, layer, _ in want.values():
            if layer is not None and key in loaded:
                self._stack_cache[key] = loaded[key]
        return {n: (loaded[key] if layer is None else self._stack_cache[key][layer])
                for n, (key, layer, _) in want.items()}


def _fill(dest: Any, full: torch.Tensor, key: str, where: Path) -> None:
    """Copy ``full`` (the logical tensor) into ``dest``: a tensor of its shape, or a DTensor's local shard
    (``Shard(dim)`` with torch.chunk's split, as :func:`nvlcore.checkpoint.shard_tensor` makes them)."""
    if tuple(dest.shape) != tuple(full.shape):
        raise ValueError(f"shape mismatch for {key!r}: checkpoint {tuple(full.shape)} vs target "
                         f"{tuple(dest.shape)} ({where})")
    if not hasattr(dest, "to_local"):
        dest.copy_(full)
        return
    local = dest.to_local()
    (placement,) = dest.placements
    if not hasattr(placement, "dim"):
        local.copy_(full)
        return
    mesh = dest.device_mesh
    per = math.ceil(full.shape[placement.dim] / mesh.size())
    local.copy_(full.narrow(placement.dim, mesh.get_local_rank() * per, local.shape[placement.dim]))


# ------------------------------------------------------------------------------------------- writing
def to_megatron_bridge(table: Iterable[Any], names: MegatronBridgeNames,
                       comps: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Component tensors (every mapping's) -> Megatron-Bridge's global tensors by raw key: a tensor, or for a
    stacked layer list ``{layer: tensor}``. Inverse of :class:`MegatronBridgeView` (padding rows are zeros)."""
    import torch

    flat: dict[str, torch.Tensor] = {}
    for m in table:
        cs = tuple(m.components)
        missing = [c for c in cs if c not in comps]
        if missing:
            raise KeyError(f"{missing[0]!r} is needed for {m.megatron!r} but is missing")
        if len(cs) > 1 and not m.row_parts:
            flat[m.megatron] = m.components_to_local({c: comps[c] for c in cs}, 1, 0)
            continue
        for c in cs:
            t = comps[c]
            if len(cs) == 1 and m.megatron in names.padded_rows:
                pad = (-t.shape[0]) % names.make_vocab_size_divisible_by
                t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else t
            flat[c] = t
    out: dict[str, Any] = {}
    for name, t in flat.items():
        stack = next((s for s in names.stacked if name.startswith(s)), None)
        if stack is None:
            out[names.prefix + name] = t
            continue
        idx, _, rest = name[len(stack):].partition(".")
        out.setdefault(names.prefix + stack + rest, {})[int(idx)] = t
    return out


def _sharded_model_state(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """megatron-core ShardedTensors for one process holding every global tensor (replica 0); a stacked
    list gets megatron-core's prepended layer axis (``prepend_axis_num=1``), as ``TransformerBlock`` saves it."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out: dict[str, Any] = {}
    for key, t in tensors.items():
        if not isinstance(t, Mapping):
            out[key] = ShardedTensor.from_rank_offsets(key, t.contiguous(), replica_id=0)
            continue
        n = len(t)
        if sorted(t) != list(range(n)):
            raise ValueError(f"{key}: stacked layers {sorted(t)} are not 0..{n - 1}")
        for i, layer in t.items():
            out[f"{key}#{i}"] = ShardedTensor.from_rank_offsets(key, layer.contiguous(), (0, i, n), replica_id=0,
                                                                prepend_axis_num=1)
    return out


def _train_state(iteration: int) -> dict[str, Any]:
    """Megatron-Bridge's TrainState.state_dict() (training/state.py) of a weights-only checkpoint."""
    import torch

    i64 = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return {"step": i64(iteration), "consumed_train_samples": i64(0), "skipped_train_samples": i64(0),
            "consumed_valid_samples": i64(0), "floating_point_operations_so_far": torch.tensor(0.0,
                                                                                                dtype=torch.float64),
            "do_train": torch.tensor(False), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}


def save_megatron_bridge_checkpoint(root: str | os.PathLike[str], iteration: int, tensors: Mapping[str, Any], *,
                                    run_config: Mapping[str, Any], overwrite: bool = False,
                                    files: Mapping[str, str | os.PathLike[str]] | None = None,
                                    what: str = "--megatron-path") -> Path:
    """Write a Megatron-Bridge checkpoint at ``root`` (it appears whole, or not at all): ``iter_N/`` by
    megatron-core's own ``dist_checkpointing.save`` (``torch_dist``: ``.metadata``, ``*.distcp``,
    ``metadata.json``, ``common.pt``), ``run_config.yaml``, ``train_state.pt``, and both trackers.

    :param tensors: raw key -> global tensor, or ``{layer: tensor}`` for a stacked list (:func:`to_megatron_bridge`).
    :param files: files copied into ``iter_N`` by relative name (``tokenizer/tokenizer.json``), as Megatron-Bridge's
        import saves the HF tokenizer there.
    :returns: the ``iter_N`` directory.
    """
    import torch
    import yaml

    from nvlcore.megatron_import import import_megatron_core

    import_megatron_core()
    from megatron.core import dist_checkpointing

    from nvlcore.checkpoint.atomic import atomic_output_dir
    from nvlcore.checkpoint.layout import TRACKER_PT, TRACKER_TXT, iter_dir_name
    from nvlcore.checkpoint.save import _plain

    final = Path(root).expanduser().absolute()
    with _single_process_group(), cpu_without_cuda_sync(), \
            atomic_output_dir(final, overwrite=overwrite, what=what) as tmp:
        it_dir = tmp / iter_dir_name(iteration)
        it_dir.mkdir()
        state = {"checkpoint_version": 3.0, "iteration": iteration, "model": _sharded_model_state(tensors)}
        dist_checkpointing.save(state, str(it_dir), sharded_strategy=(TORCH_DIST, 1),
                                content_metadata={"singleton_local_shards": False, "chained_optim_avoid_prefix": True})
        ts = _train_state(iteration)
        torch.save(ts, it_dir / "train_state.pt")
        (it_dir / "run_config.yaml").write_text(yaml.safe_dump(_plain(run_config), sort_keys=False))
        for rel, src in (files or {}).items():
            (it_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, it_dir / rel)
        torch.save(ts, tmp / TRACKER_PT)
        (tmp / TRACKER_TXT).write_text(f"{iteration}\n")
    return final / iter_dir_name(iteration)


@contextlib.contextmanager
def cpu_without_cuda_sync() -> Iterator[None]:
    """Let megatron-core's torch_dist writer run on a host without CUDA.

    The writer (megatron-core 0.16 ``strategies/filesystem_async.py`` and ``state_dict_saver.py``) copies
    tensors to CPU with ``non_blocking=True`` and calls ``torch.cuda.synchronize()``, and puts its one-int
    failure flag on ``torch.cuda.current_device()`` before broadcasting it; both raise on a build
    without CUDA. Within the block, when CUDA is unavailable, the first does nothing (there is no stream
    to wait for) and the second names the CPU (the flag goes over gloo); with CUDA nothing is changed.
    """
    import torch

    if torch.cuda.is_available():
        yield
        return
    real = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = real  # type: ignore[assignment]


class _single_process_group:
    """A one-process gloo group for the block when torch.distributed has none (dist_checkpointing.save
    is collective); an existing group is used as it is."""

    def __enter__(self) -> None:
        import tempfile

        import torch.distributed as dist

        self.own = not dist.is_initialized()
        if self.own:
            self.tmp = tempfile.TemporaryDirectory(prefix="nvl-mb-")
            dist.init_process_group("gloo", init_method=f"file://{self.tmp.name}/store", rank=0, world_size=1)

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        if self.own:
            dist.destroy_process_group()
            self.tmp.cleanup()
