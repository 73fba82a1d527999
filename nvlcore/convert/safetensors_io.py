"""Streaming safetensors I/O: read a few tensors at a time, write sharded checkpoints tensor by tensor.

Reading uses ``safetensors.safe_open`` per group of tensors (the file is mapped only while the group
is read), so memory is bounded by the group, not by the model. Writing lays out every shard's header
up front from a plan of (key, shape, dtype) and then writes each tensor's bytes at its offset as it
arrives, so a 5 GB shard never has to be held in memory (``safetensors.torch.save_file`` would).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 1000**3  # transformers' "5GB" (decimal)

_ST_TO_TORCH = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class SafetensorsError(ValueError):
    """A problem with safetensors files; the message names the file (and key)."""


def st_dtype_to_torch(name: str) -> torch.dtype:
    import torch

    try:
        return getattr(torch, _ST_TO_TORCH[name])
    except KeyError:
        raise SafetensorsError(f"unsupported safetensors dtype {name!r}") from None


def torch_dtype_to_st(dtype: torch.dtype) -> str:
    import torch

    for st, tn in _ST_TO_TORCH.items():
        if getattr(torch, tn, None) == dtype:
            return st
    raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors")


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``1234`` -> 1234 (transformers' units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
            "TIB": 2**40}
    size = int(num * mult[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in an HF checkpoint and what it is (read from the file header only)."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: str | os.PathLike[str]) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), checked against the file.

    Every tensor's dtype, shape and byte range must be well formed and lie inside the file, and the data
    must end where the file does: a truncated, zero-byte or header-corrupted file raises
    :class:`SafetensorsError` naming it, before any tensor is read.
    """
    path = Path(path)
    bad = f"{path} is not a valid safetensors file"
    fix = "re-download or re-export it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise SafetensorsError(f"{bad}: {size} bytes, too short for a header; {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise SafetensorsError(f"{bad}: corrupt header length ({n} bytes in a {size}-byte file); {fix}")
            raw = f.read(n)
        header = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise SafetensorsError(f"safetensors file {path} does not exist") from None
    except IsADirectoryError:
        raise SafetensorsError(f"{path} is a directory, not a safetensors file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{bad}: corrupt JSON header ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{bad}: its header is not a JSON object; {fix}")
    data = size - 8 - n
    end_max = 0
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = [int(d) for d in meta["shape"]]
            begin, end = (int(x) for x in meta["data_offsets"])
            count = 1
            for d in shape:
                if d < 0:
                    raise ValueError(f"negative dimension {d}")
                count *= d
            width = _DTYPE_BYTES.get(dtype)
            if width is None:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not 0 <= begin <= end or end - begin != count * width:
                raise ValueError(f"byte range {begin}..{end} does not fit shape {shape} of {dtype}")
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"{bad}: corrupt header entry for {k!r} ({exc}); {fix}") from None
        end_max = max(end_max, end)
    if end_max != data:
        what = "truncated" if end_max > data else "has trailing bytes"
        raise SafetensorsError(f"{bad}: {what} (its header needs {end_max} data bytes, the file holds {data}); {fix}")
    return header


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class SafetensorsReader:
    """The tensors of an HF model directory: index-sharded or a single ``model.safetensors``.

    Only headers are read at construction; :meth:`read` loads a group of tensors.
    """

    def __init__(self, hf_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(hf_dir).expanduser()
        if not self.dir.is_dir():
            raise SafetensorsError(f"HF model directory {self.dir} does not exist")
        index = self.dir / INDEX_NAME
        files: dict[str, Path]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SafetensorsError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            files = {k: self.dir / v for k, v in weight_map.items()}
            missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
            if missing:
                raise SafetensorsError(f"{index} names shard file(s) that do not exist in {self.dir}: {missing}")
        elif (self.dir / SINGLE_NAME).is_file():
            files = {}
        else:
            others = sorted(p.name for p in self.dir.glob("*.safetensors"))
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            if others:
                raise SafetensorsError(
                    f"{self.dir} has safetensors files {others[:4]} but no {INDEX_NAME} or {SINGLE_NAME}; "
                    "add the index (it maps every key to its shard)"
                )
            hint = f" (found {bins[:3]}: pickled weights are not read; save them as safetensors)" if bins else ""
            raise SafetensorsError(f"no {INDEX_NAME} or {SINGLE_NAME} in {self.dir}{hint}")

        self.tensors: dict[str, TensorInfo] = {}
        by_file: dict[Path, list[str]] = {}
        if files:
            for k, p in files.items():
                by_file.setdefault(p, []).append(k)
        else:
            by_file[self.dir / SINGLE_NAME] = []
        for path, expected in by_file.items():
            header = read_header(path)
            header.pop("__metadata__", None)
            for k, meta in header.items():
                if files and files.get(k) != path:
                    continue  # the index is authoritative about which shard holds a key
                shape = tuple(int(s) for s in meta["shape"])
                begin, end = meta["data_offsets"]
                self.tensors[k] = TensorInfo(k, path, st_dtype_to_torch(meta["dtype"]), shape, int(end) - int(begin))
            absent = [k for k in expected if k not in header]
            if absent:
                raise SafetensorsError(f"{index.name} maps {absent[:3]} to {path.name}, which does not hold them")

    def __len__(self) -> int:
        return len(self.tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load these tensors (each file is opened, read and closed within the call)."""
        from safetensors import safe_open

        keys = list(keys)
        unknown = [k for k in keys if k not in self.tensors]
        if unknown:
            raise SafetensorsError(f"tensor(s) {unknown[:5]} are not in {self.dir}")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.tensors[k].file, []).append(k)
        out: dict[str, torch.Tensor] = {}
        for path, ks in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return {k: out[k] for k in keys}


# ------------------------------------------------------------------------------------------------


@dataclass
class _Planned:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    shard: int
    begin: int  # absolute file offset of the data
    written: bool = False


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Write a planned set of tensors into ``model-0000k-of-0000n.safetensors`` shards plus the index.

    ``plan`` is the ordered list of (key, shape, dtype); shards are filled in that order up to
    ``max_shard_size`` bytes each (a tensor larger than the limit gets a shard of its own, as in
    transformers). Tensors may then be written in any order; :meth:`finish` checks that every planned
    tensor was written exactly once and writes ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
        *,
        max_shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        import torch

        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.items: dict[str, _Planned] = {}
        shards: list[list[_Planned]] = [[]]
        size = 0
        for key, shape, dtype in plan:
            if key in self.items:
                raise SafetensorsError(f"tensor {key!r} planned twice")
            n = 1
            for s in shape:
                n *= int(s)
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            item = _Planned(key, tuple(int(s) for s in shape), dtype, nbytes, len(shards) - 1, 0)
            shards[-1].append(item)
            self.items[key] = item
            size += nbytes
        if not shards[-1]:
            shards.pop()
        self.n_shards = len(shards)
        self.names = [_shard_name(i, self.n_shards) for i in range(self.n_shards)]
        self.total_size = sum(it.nbytes for it in self.items.values())
        self._files: dict[int, BinaryIO] = {}
        self._remaining = [len(s) for s in shards]
        meta = {"format": "pt", **(metadata or {})}
        for i, items in enumerate(shards):
            header: dict[str, object] = {"__metadata__": meta}
            off = 0
            for it in items:
                header[it.key] = {
                    "dtype": torch_dtype_to_st(it.dtype),
                    "shape": list(it.shape),
                    "data_offsets": [off, off + it.nbytes],
                }
                off += it.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
            data_start = 8 + len(raw)
            for it in items:
                it.begin += data_start
                data_start += it.nbytes
            f = open(self.dir / self.names[i], "wb")
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(data_start)  # final size now; data filled in as tensors arrive
            self._files[i] = f
            if not items:
                f.close()
                del self._files[i]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (its shape and dtype must match the plan)."""
        it = self.items.get(key)
        if it is None:
            raise SafetensorsError(f"tensor {key!r} was not planned for this export")
        if it.written:
            raise SafetensorsError(f"tensor {key!r} written twice")
        if tuple(tensor.shape) != it.shape or tensor.dtype != it.dtype:
            raise SafetensorsError(
                f"tensor {key!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {it.shape} {it.dtype}"
            )
        f = self._files[it.shard]
        f.seek(it.begin)
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            f.write(memoryview(t.view(-1).view(dtype=_byte_dtype()).numpy()))
        it.written = True
        self._remaining[it.shard] -= 1
        if self._remaining[it.shard] == 0:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            del self._files[it.shard]

    def missing(self) -> list[str]:
        return [k for k, it in self.items.items() if not it.written]

    def finish(self) -> Path:
        """Check completeness, close the shards and write the index; returns the index path."""
        missing = self.missing()
        if missing:
            self.close()
            raise SafetensorsError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[:5]}")
        self.close()
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {k: self.names[it.shard] for k, it in sorted(self.items.items())},
        }
        path = self.dir / INDEX_NAME
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _byte_dtype() -> torch.dtype:
    import torch

    return torch.uint8
