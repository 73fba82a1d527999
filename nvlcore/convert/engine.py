"""HF <-> nvl checkpoint conversion, streamed one tensor group at a time (model-agnostic).

The bridge supplies :class:`~nvlcore.convert.plan.ConversionGroup` s; this module does the I/O:

- **import**: safetensors (index-sharded or single file) -> groups -> checkpoint ``iter_0000000``
  (DCP, logical tensors) + ``tokenizer/`` + ``hf_source/`` (the HF config files and the source tensor
  inventory) + ``run_config.yaml``; the output directory appears atomically.
- **export**: checkpoint (any iteration, any TP it was saved at) -> groups -> safetensors shards +
  index + the source's config (``torch_dtype`` updated if it changed), tokenizer, generation and
  preprocessor configs and ``*.py`` files. Strict by default: every tensor of the source HF checkpoint
  is written with its shape and dtype, or nothing is written.

Both directions first run every group's function on ``meta`` tensors, so shape errors and missing
tensors are reported before any byte is written.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvlcore.checkpoint import (
    StreamedState,
    TensorSpec,
    atomic_output_dir,
    check_can_write,
    iter_dir_name,
    save_checkpoint,
)
from nvlcore.checkpoint.save import NoSpaceError, free_bytes, human_bytes, is_no_space, mount_point
from nvlcore.convert.plan import ConversionGroup
from nvlcore.convert.safetensors_io import (
    DEFAULT_SHARD_SIZE,
    SafetensorsError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
)

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# HF files other than weights and tokenizer that an export reproduces (plus every *.py).
CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                "video_preprocessor_config.json")
HF_SOURCE_DIR = "hf_source"
TOKENIZER_DIR = "tokenizer"
INVENTORY = "tensors.json"


class ConversionError(ValueError):
    """A conversion cannot proceed; the message names the file, key or option at fault."""


# ------------------------------------------------------------------------------------------------
# reporting


@dataclass
class ConversionSummary:
    """What a conversion did; :meth:`format` is what the CLI prints."""

    direction: str
    source: str
    target: str
    hf_tensors: int = 0
    checkpoint_tensors: int = 0
    carried_tensors: int = 0
    from_source_hf: int = 0
    skipped: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    dtype: str = ""
    tp: int | None = None

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gb_per_s"] = round(self.gb_per_s, 4)
        return d

    def format(self) -> str:
        lines = [f"{self.direction}: {self.source} -> {self.target}"]
        lines.append(
            f"  tensors : {self.hf_tensors} HF <-> {self.checkpoint_tensors} checkpoint"
            + (f" ({self.carried_tensors} HF-only carried losslessly)" if self.carried_tensors else "")
        )
        if self.from_source_hf:
            lines.append(f"  from source HF dir: {self.from_source_hf} HF-only tensor(s) the checkpoint did not hold")
        if self.skipped:
            lines.append(f"  SKIPPED (--not-strict): {len(self.skipped)} tensor(s), e.g. {self.skipped[:3]}")
        lines.append(f"  bytes   : {self.bytes_read / 1e9:.3f} GB read, {self.bytes_written / 1e9:.3f} GB written")
        lines.append(f"  time    : {self.seconds:.2f} s ({self.gb_per_s:.3f} GB/s written)")
        lines.append(f"  peak RSS: {self.peak_rss_bytes / 1e9:.3f} GB")
        if self.dtype:
            lines.append(f"  dtype   : {self.dtype}" + (f", tp {self.tp}" if self.tp else ""))
        return "\n".join(lines)


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class Progress:
    """The conversion's byte-counting bar (:class:`nvlcore.progress.Progress`).

    ``enabled=False`` is ``--no-progress``.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from nvlcore.progress import Progress as Bar

        self._bar = Bar(total, desc, enabled=enabled, unit="B")

    def update(self, nbytes: int, key: str = "") -> None:
        self._bar.update(nbytes, key)

    def close(self) -> None:
        self._bar.close()


def warm_imports() -> None:
    """Import what a conversion uses, so that the measured seconds are conversion, not interpreter start-up."""
    import torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import yaml  # noqa: F401
    from safetensors import safe_open  # noqa: F401
    from tqdm import tqdm  # noqa: F401

    # The first operator on "meta" tensors loads torch's meta kernels (seconds on a small CPU).
    torch.cat([torch.empty(1, device="meta"), torch.empty(1, device="meta")])


def _warn(msg: str) -> None:
    print(f"nvl convert: warning: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# helpers


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of an HF model directory, read as data (no remote code): the bridges' reader
    (:func:`nvlcore.hub.read_hf_config`), its errors as :class:`ConversionError`."""
    from nvlcore.hub import HFConfigError
    from nvlcore.hub import read_hf_config as read_config_json

    if not Path(hf_dir).expanduser().is_dir():
        raise ConversionError(f"HF model directory {hf_dir} does not exist")
    try:
        return read_config_json(Path(hf_dir).expanduser())
    except HFConfigError as exc:
        raise ConversionError(str(exc)) from None


def _dtype_from_name(name: Any) -> torch.dtype | None:
    import torch

    if not isinstance(name, str):
        return None
    d = getattr(torch, name.replace("torch.", ""), None)
    return d if isinstance(d, torch.dtype) else None


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    d = _dtype_from_name(name)
    if d is None or name not in ("bfloat16", "float16", "float32"):
        raise ConversionError(f"--dtype must be bfloat16, float16 or float32, not {name!r}")
    return d


def main_dtype(config: Mapping[str, Any], specs: Mapping[str, TensorSpec]) -> torch.dtype | None:
    """The model's dtype: config ``torch_dtype`` (or ``dtype``), else the floating dtype holding most bytes."""
    for key in ("torch_dtype", "dtype"):
        d = _dtype_from_name(config.get(key))
        if d is not None:
            return d
    return dominant_float_dtype(specs.values())


def dominant_float_dtype(specs: Any) -> torch.dtype | None:
    by: dict[Any, int] = {}
    for s in specs:
        if s.dtype.is_floating_point:
            by[s.dtype] = by.get(s.dtype, 0) + s.nbytes
    return max(by, key=by.__getitem__) if by else None


def _meta(specs: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in specs.items()}


def _check_coverage(groups: Sequence[ConversionGroup], hf_keys: Sequence[str], bridge_name: str) -> None:
    seen: dict[str, int] = {}
    dup_hf = []
    for i, g in enumerate(groups):
        for k in g.hf_keys:
            if k in seen:
                dup_hf.append(k)
            seen[k] = i
    missing = [k for k in hf_keys if k not in seen]
    extra = [k for k in seen if k not in set(hf_keys)]
    ck: set[str] = set()
    dup_ck = []
    for g in groups:
        for k in g.checkpoint_keys:
            if k in ck:
                dup_ck.append(k)
            ck.add(k)
    problems = []
    if missing:
        problems.append(f"HF tensors in no group: {missing[:5]}")
    if extra:
        problems.append(f"groups name HF tensors the checkpoint does not have: {extra[:5]}")
    if dup_hf:
        problems.append(f"HF tensors in several groups: {dup_hf[:5]}")
    if dup_ck:
        problems.append(f"checkpoint keys produced twice: {dup_ck[:5]}")
    if problems:
        raise ConversionError(f"bridge {bridge_name!r} gave an inconsistent conversion plan: " + "; ".join(problems))


def _run_meta(fn: Callable, inputs: Mapping[str, TensorSpec], expect: Sequence[str],
              what: str) -> dict[str, TensorSpec]:
    out = fn(_meta(inputs))
    if set(out) != set(expect):
        raise ConversionError(f"{what}: produced {sorted(out)[:6]}, declared {sorted(expect)[:6]}")
    return {k: TensorSpec(tuple(out[k].shape), out[k].dtype) for k in expect}


def _copy_files(src_dir: Path, names: Sequence[str], dst_dir: Path) -> list[str]:
    done = []
    for n in names:
        p = src_dir / n
        if p.is_file():
            dst_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst_dir / n)
            done.append(n)
    return done


def _py_files(src_dir: Path) -> list[str]:
    return sorted(p.name for p in src_dir.glob("*.py") if p.is_file())


def _side_bytes(src_dir: Path, names: Sequence[str]) -> int:
    """Bytes of the files among ``names`` that ``src_dir`` holds (what an output copies besides tensors)."""
    return sum((src_dir / n).stat().st_size for n in names if (src_dir / n).is_file())


def _no_space_line(out: Path, option: str, need: int) -> str:
    return (f"{option} {out}: not enough space on {mount_point(out)}: the output needs about {human_bytes(need)}, "
            f"{human_bytes(free_bytes(out))} free; nothing was written. Free some space or choose another {option}")


@contextmanager
def _space_for(out: Path, option: str, need: int) -> Iterator[None]:
    """Refuse before writing when the file system of ``out`` has less than ``need`` bytes free, and turn a
    full disk met while writing (free space can shrink meanwhile) into the same one line. Wraps the
    atomic output, so the line is raised after the temporary output is removed (its free figure is true)."""
    if need > free_bytes(out):
        raise ConversionError(_no_space_line(out, option, need))
    try:
        yield
    except (ConversionError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if isinstance(exc, NoSpaceError) or is_no_space(exc):
            raise ConversionError(_no_space_line(out, option, need)) from None
        raise


def _bridge_name(bridge: Any) -> str:
    return str(bridge.name)


# ------------------------------------------------------------------------------------------------
# streaming iterators (also usable outside the CLI, e.g. by merges and the trainer)


def iter_hf_to_checkpoint(
    groups: Sequence[ConversionGroup],
    read: Callable[[Sequence[str]], Mapping[str, torch.Tensor]],
    cast: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[ConversionGroup, dict[str, torch.Tensor]]]:
    """Yield ``(group, {checkpoint_key: tensor})`` group by group, reading HF tensors with ``read``."""
    for g in groups:
        hf = dict(read(g.hf_keys))
        if cast is not None:
            hf = {k: cast(k, v) for k, v in hf.items()}
        yield g, g.to_checkpoint(hf)


def iter_checkpoint_to_hf(
    groups: Sequence[ConversionGroup],
    load: Callable[[Sequence[str]], Mapping[str, torch.Tensor]],
) -> Iterator[tuple[ConversionGroup, dict[str, torch.Tensor]]]:
    """Yield ``(group, {hf_key: tensor})`` group by group, loading checkpoint tensors with ``load``."""
    for g in groups:
        yield g, g.to_hf(dict(load(g.checkpoint_keys)))


# ------------------------------------------------------------------------------------------------
# import


def _open_import_source(bridge: Any, hf_dir: Path, out: Path, *, tp: int, overwrite: bool) -> SafetensorsReader:
    """Refuse what cannot work before anything is read: the TP size, the output, the source's tensors."""
    if tp < 1:
        raise ConversionError(f"--tp must be >= 1, got {tp}")
    bridge.check_tensor_parallel(tp)
    check_can_write(out, overwrite=overwrite, what="--megatron-path")
    if out == hf_dir or hf_dir in out.parents:
        raise ConversionError(f"--megatron-path {out} must not be inside --hf-model {hf_dir}")
    try:
        return SafetensorsReader(hf_dir)
    except SafetensorsError as exc:
        raise ConversionError(str(exc)) from None


def _checkpoint_specs(groups: Sequence[ConversionGroup], in_specs: Mapping[str, TensorSpec]
                      ) -> tuple[dict[str, TensorSpec], dict[str, int]]:
    """Every checkpoint tensor's spec (each group run on meta tensors) and the index of the group making it."""
    ck_specs: dict[str, TensorSpec] = {}
    owner: dict[str, int] = {}
    for gi, g in enumerate(groups):
        got = _run_meta(g.to_checkpoint, {k: in_specs[k] for k in g.hf_keys}, g.checkpoint_keys,
                        f"group {g.name or g.hf_keys[0]!r} (import)")
        for k in g.checkpoint_keys:
            ck_specs[k] = got[k]
            owner[k] = gi
    return ck_specs, owner


class _ImportProducer:
    """Makes checkpoint tensors on demand, one group at a time: a group's HF tensors are read when the
    writer first asks for one of its outputs, and each output is dropped once handed over."""

    def __init__(self, groups: Sequence[ConversionGroup], owner: Mapping[str, int], reader: SafetensorsReader,
                 in_specs: Mapping[str, TensorSpec], summary: ConversionSummary, bar: Progress) -> None:
        self.groups, self.owner, self.reader, self.in_specs = groups, owner, reader, in_specs
        self.summary, self.bar = summary, bar
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.cache:
            g = self.groups[self.owner[key]]
            hf = self.reader.read(g.hf_keys)
            self.summary.bytes_read += sum(t.numel() * t.element_size() for t in hf.values())
            hf = {k: v.to(self.in_specs[k].dtype) for k, v in hf.items()}
            self.cache.update(g.to_checkpoint(hf))
            del hf
        t = self.cache.pop(key)
        self.summary.bytes_written += t.numel() * t.element_size()
        self.bar.update(t.numel() * t.element_size(), key)
        return t


def _import_run_config(hf_dir: Path, config: Mapping[str, Any], name: str, tp: int, src_main: Any, dtype: str,
                       extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "model": {"tensor_model_parallel_size": tp, "bridge": name},
        "convert": {
            "tool": "nvl convert import",
            "source": str(hf_dir),
            "source_architectures": list(config.get("architectures") or []),
            "source_dtype": str(src_main).replace("torch.", "") if src_main else None,
            "dtype": dtype,
            "tensor_model_parallel_size": tp,
            "note": "tensors are logical (full-shape); the checkpoint loads at any TP that divides the model",
        },
        **dict(extra or {}),
    }


def _stage_import_side_files(hf_dir: Path, staging: Path, hf_specs: Mapping[str, TensorSpec]) -> dict[str, Path]:
    """The tokenizer, the HF config and code files and the source's tensor inventory, staged for the save."""
    files: dict[str, Path] = {}
    for n in _copy_files(hf_dir, TOKENIZER_FILES, staging / TOKENIZER_DIR):
        files[f"{TOKENIZER_DIR}/{n}"] = staging / TOKENIZER_DIR / n
    if not any(k.startswith(TOKENIZER_DIR) for k in files):
        _warn(f"no tokenizer files in {hf_dir}; the checkpoint has no tokenizer/")
    for n in _copy_files(hf_dir, list(CONFIG_FILES) + _py_files(hf_dir), staging / HF_SOURCE_DIR):
        files[f"{HF_SOURCE_DIR}/{n}"] = staging / HF_SOURCE_DIR / n
    inv = {k: {"shape": list(s.shape), "dtype": str(s.dtype).replace("torch.", "")} for k, s in hf_specs.items()}
    (staging / HF_SOURCE_DIR / INVENTORY).write_text(json.dumps(inv, indent=0) + "\n")
    files[f"{HF_SOURCE_DIR}/{INVENTORY}"] = staging / HF_SOURCE_DIR / INVENTORY
    return files


def import_hf_checkpoint(
    bridge: Any,
    hf_dir: str | os.PathLike[str],
    megatron_path: str | os.PathLike[str],
    *,
    tp: int = 1,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_run_config: Mapping[str, Any] | None = None,
) -> ConversionSummary:
    """Convert an HF model directory into an nvl checkpoint at ``megatron_path`` (iteration 0).

    Peak memory: the largest group's HF tensors plus its checkpoint tensors (about twice the group).
    ``tp`` is validated against the model's dimensions and recorded; the checkpoint itself stores
    logical tensors and loads at any TP size.
    """

    warm_imports()
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir).expanduser().absolute()
    out = Path(megatron_path).expanduser().absolute()
    config = read_hf_config(hf_dir)
    target = parse_dtype(dtype)
    reader = _open_import_source(bridge, hf_dir, out, tp=tp, overwrite=overwrite)
    hf_specs = {k: TensorSpec(t.shape, t.dtype) for k, t in reader.tensors.items()}
    name = _bridge_name(bridge)
    groups = list(bridge.conversion_groups(hf_specs))
    _check_coverage(groups, list(hf_specs), name)
    src_main = main_dtype(config, hf_specs)

    def cast_dtype(spec: TensorSpec) -> torch.dtype:
        # --dtype converts the model's own dtype; tensors the source keeps in another dtype (fp32
        # buffers such as a vision encoder's input norm_mean) stay as they are, so nothing is silently rounded.
        if target is not None and spec.dtype == src_main and spec.dtype.is_floating_point:
            return target
        return spec.dtype

    in_specs = {k: TensorSpec(s.shape, cast_dtype(s)) for k, s in hf_specs.items()}
    ck_specs, owner = _checkpoint_specs(groups, in_specs)
    summary = ConversionSummary("import", str(hf_dir), str(out / iter_dir_name(0)), tp=tp)
    summary.hf_tensors = len(hf_specs)
    summary.checkpoint_tensors = len(ck_specs)
    summary.carried_tensors = sum(len(g.hf_keys) for g in groups if g.carried)
    summary.dtype = str(target or src_main).replace("torch.", "")
    bar = Progress(sum(s.nbytes for s in ck_specs.values()), "import", progress)
    produce = _ImportProducer(groups, owner, reader, in_specs, summary, bar)
    run_config = _import_run_config(hf_dir, config, name, tp, src_main, summary.dtype, extra_run_config)
    side = TOKENIZER_FILES + CONFIG_FILES + tuple(_py_files(hf_dir))
    need = sum(s.nbytes for s in ck_specs.values()) + 2 * _side_bytes(hf_dir, side)  # side files: staged, then copied
    try:
        with _space_for(out, "--megatron-path", need), \
                atomic_output_dir(out, overwrite=overwrite, what="--megatron-path") as tmp_root:
            staging = tmp_root / ".staging"
            files = _stage_import_side_files(hf_dir, staging, hf_specs)
            save_checkpoint(tmp_root, 0, model_state=StreamedState(ck_specs, produce), run_config=run_config,
                            train_state={"iteration": 0, "consumed_train_samples": 0}, files=files)
            shutil.rmtree(staging)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


# ------------------------------------------------------------------------------------------------
# export


def _source_inventory(hf_model: Path, ck_path: Path) -> tuple[SafetensorsReader | None, dict[str, TensorSpec]]:
    try:
        reader = SafetensorsReader(hf_model)
        return reader, {k: TensorSpec(t.shape, t.dtype) for k, t in reader.tensors.items()}
    except SafetensorsError as exc:
        inv = ck_path / HF_SOURCE_DIR / INVENTORY
        if not inv.is_file():
            raise ConversionError(
                f"{exc}; and the checkpoint has no {HF_SOURCE_DIR}/{INVENTORY} to say which tensors to write"
            ) from None
        _warn(f"no weights in {hf_model}; using the tensor inventory recorded at import ({inv})")
        data = json.loads(inv.read_text())
        specs = {k: TensorSpec(tuple(v["shape"]), _dtype_from_name(v["dtype"])) for k, v in data.items()}
        return None, specs


def _export_sources(groups: list[ConversionGroup], ck_specs: Mapping[str, Any], reader: Any, *, ck_path: Path,
                    hf_model: Path, strict: bool) -> tuple[list[tuple[ConversionGroup, str]], list[str]]:
    """Where each group's tensors come from (``"checkpoint"``, or ``"hf"`` for carried HF-only tensors) and the
    HF keys skipped; a tensor that cannot be produced, or a checkpoint tensor nothing uses, fails ``strict``."""
    use: list[tuple[ConversionGroup, str]] = []
    missing: list[tuple[ConversionGroup, list[str]]] = []
    for g in groups:
        absent = [k for k in g.checkpoint_keys if k not in ck_specs]
        if not absent:
            use.append((g, "checkpoint"))
        elif g.carried and reader is not None:
            use.append((g, "hf"))  # HF-only tensors a trainer's checkpoint does not hold
        else:
            missing.append((g, absent))
    consumed = {k for g in groups for k in g.checkpoint_keys}
    unused = [k for k in ck_specs if k not in consumed]
    skipped: list[str] = []
    if missing:
        miss_hf = [k for g, _ in missing for k in g.hf_keys]
        miss_ck = [k for _, a in missing for k in a]
        msg = (
            f"{len(miss_hf)} tensor(s) of the source HF checkpoint cannot be produced from {ck_path}: "
            f"{miss_hf[:5]} (checkpoint lacks {miss_ck[:5]})"
        )
        if strict:
            raise ConversionError(msg + "; nothing was written. Pass --not-strict to export without them.")
        _warn(msg + "; skipped (--not-strict)")
        skipped = miss_hf
    if unused:
        msg = (
            f"{len(unused)} checkpoint tensor(s) map to no HF tensor of {hf_model}: {unused[:5]} "
            "(a different model, or unmerged adapters?)"
        )
        if strict:
            raise ConversionError(msg + "; nothing was written. Pass --not-strict to ignore them.")
        _warn(msg + "; ignored (--not-strict)")

    return use, skipped


def export_hf_checkpoint(
    bridge: Any,
    hf_model: str | os.PathLike[str],
    megatron_path: str | os.PathLike[str],
    hf_path: str | os.PathLike[str],
    *,
    strict: bool = True,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    progress: bool = True,
) -> ConversionSummary:
    """Write an HF model directory at ``hf_path`` from a checkpoint and the reference ``hf_model``.

    :param strict: every tensor of the source HF checkpoint must be written with its shape and dtype
        (dtype: the export dtype for the model's own tensors); otherwise fail before writing. With
        ``strict=False`` tensors that cannot be produced are skipped with a warning.
    :param dtype: cast the model's own tensors to this dtype (default: as stored in the checkpoint).
    """
    warm_imports()
    t0 = time.perf_counter()
    hf_model = Path(hf_model).expanduser().absolute()
    out = Path(hf_path).expanduser().absolute()
    config = read_hf_config(hf_model)
    target = parse_dtype(dtype)
    ck = bridge.open_checkpoint(megatron_path)  # nvl's layout or Megatron-Bridge's, by layout
    check_can_write(out, overwrite=overwrite, what="--hf-path")
    if out in (hf_model, ck.path) or ck.path in out.parents or hf_model in out.parents:
        raise ConversionError(f"--hf-path {out} must not be, or be inside, the source model or the checkpoint")
    reader, src_specs = _source_inventory(hf_model, ck.path)
    name = _bridge_name(bridge)
    groups = list(bridge.conversion_groups(src_specs))
    _check_coverage(groups, list(src_specs), name)
    ck_specs = ck.specs()

    use, skipped = _export_sources(groups, ck_specs, reader, ck_path=ck.path, hf_model=hf_model, strict=strict)

    # dtype plan: the model's own tensors get one export dtype; others keep the source's dtype
    src_main = main_dtype(config, src_specs)
    recorded = _dtype_from_name(((ck.run_config() or {}).get("convert") or {}).get("dtype"))
    ck_main = target or recorded or dominant_float_dtype(
        ck_specs[k] for g, s in use if s == "checkpoint" and not g.carried for k in g.checkpoint_keys
    ) or src_main

    def out_dtype(k: str) -> torch.dtype:
        s = src_specs[k].dtype
        return ck_main if (s == src_main and s.is_floating_point) else s

    plan: list[tuple[str, tuple[int, ...], Any]] = []
    for g, source in use:
        if source == "checkpoint":
            got = _run_meta(g.to_hf, {k: ck_specs[k] for k in g.checkpoint_keys}, g.hf_keys,
                            f"group {g.name or g.hf_keys[0]!r} (export)")
        else:
            got = {k: src_specs[k] for k in g.hf_keys}
        for k in g.hf_keys:
            if tuple(got[k].shape) != tuple(src_specs[k].shape):
                raise ConversionError(
                    f"shape mismatch for {k}: the checkpoint gives {tuple(got[k].shape)}, the source HF checkpoint "
                    f"has {tuple(src_specs[k].shape)} (checkpoint {ck.path} does not match --hf-model {hf_model})"
                )
            plan.append((k, tuple(src_specs[k].shape), out_dtype(k)))

    summary = ConversionSummary("export", str(ck.path), str(out))
    summary.hf_tensors = len(plan)
    summary.checkpoint_tensors = sum(len(g.checkpoint_keys) for g, s in use if s == "checkpoint")
    summary.carried_tensors = sum(len(g.hf_keys) for g, s in use if g.carried and s == "checkpoint")
    summary.from_source_hf = sum(len(g.hf_keys) for g, s in use if s == "hf")
    summary.skipped = skipped
    summary.dtype = str(ck_main).replace("torch.", "")
    total = sum(TensorSpec(s, d).nbytes for _, s, d in plan)
    bar = Progress(total, "export", progress)
    need = total + _side_bytes(hf_model, TOKENIZER_FILES + CONFIG_FILES + tuple(_py_files(hf_model)))
    try:
        with _space_for(out, "--hf-path", need), atomic_output_dir(out, overwrite=overwrite, what="--hf-path") as tmp:
            writer = ShardedSafetensorsWriter(tmp, plan, max_shard_size=shard_size)
            try:
                for g, source in use:
                    if source == "checkpoint":
                        loaded = ck.load(list(g.checkpoint_keys))
                        summary.bytes_read += sum(t.numel() * t.element_size() for t in loaded.values())
                        hf = g.to_hf(loaded)
                        del loaded
                    else:
                        assert reader is not None
                        hf = reader.read(g.hf_keys)
                        summary.bytes_read += sum(t.numel() * t.element_size() for t in hf.values())
                    for k in g.hf_keys:
                        t = hf.pop(k).to(out_dtype(k))
                        writer.write(k, t)
                        bar.update(t.numel() * t.element_size(), k)
                writer.finish()
            finally:
                writer.close()
            summary.bytes_written = writer.total_size
            _write_hf_side_files(hf_model, ck.path, tmp, config, src_main, ck_main)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


def _update_dtype(cfg: Any, old: str, new: str) -> Any:
    # config.json may carry torch_dtype (or transformers 5's "dtype") at the top and in sub-configs.
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            if k in ("torch_dtype", "dtype") and v == old:
                out[k] = new
            else:
                out[k] = _update_dtype(v, old, new)
        return out
    if isinstance(cfg, list):
        return [_update_dtype(v, old, new) for v in cfg]
    return cfg


def _write_hf_side_files(hf_model: Path, ck_path: Path, tmp: Path, config: dict, src_main: Any, ck_main: Any) -> None:
    cfg = config
    if src_main is not None and ck_main is not None and ck_main != src_main:
        cfg = _update_dtype(config, str(src_main).replace("torch.", ""), str(ck_main).replace("torch.", ""))
        if not any(k in cfg for k in ("torch_dtype", "dtype")):
            cfg["torch_dtype"] = str(ck_main).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    others = [n for n in CONFIG_FILES if n != "config.json"]
    got = set(_copy_files(hf_model, others + _py_files(hf_model), tmp))
    src_dir = ck_path / HF_SOURCE_DIR  # files the import recorded, for what --hf-model lacks
    if src_dir.is_dir():
        _copy_files(src_dir, [n for n in others + _py_files(src_dir) if n not in got], tmp)
    if not (tmp / "generation_config.json").is_file():
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
    tok = set(_copy_files(hf_model, TOKENIZER_FILES, tmp))
    if (ck_path / TOKENIZER_DIR).is_dir():
        _copy_files(ck_path / TOKENIZER_DIR, [n for n in TOKENIZER_FILES if n not in tok], tmp)
    if not any((tmp / n).is_file() for n in TOKENIZER_FILES):
        _warn(f"no tokenizer files in {hf_model} or {ck_path / TOKENIZER_DIR}; the export has no tokenizer")


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A minimal generation_config.json (as transformers derives it) when the source has none."""
    out: dict[str, Any] = {"_from_model_config": True}
    sub = config.get("llm_config") or config.get("text_config") or {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = config.get(k, sub.get(k) if isinstance(sub, Mapping) else None)
        if v is not None:
            out[k] = v
    return out
