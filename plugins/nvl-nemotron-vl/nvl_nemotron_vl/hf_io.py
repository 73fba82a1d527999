"""Streaming access to an HF directory's safetensors weights (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError, read_safetensors_header, weight_files


class HFWeights:
    """Key -> tensor, reading one tensor at a time (memory stays bounded by the largest tensor)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.hf_dir = Path(hf_dir)
        files = weight_files(self.hf_dir)
        if not files:
            raise ConfigError(
                f"{self.hf_dir}: no model.safetensors or model.safetensors.index.json; nothing to load"
            )
        self._where: dict[str, Path] = {}
        self._meta: dict[str, dict] = {}
        for f in files:
            header = read_safetensors_header(f)
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if k in self._where:
                    raise ConfigError(f"{self.hf_dir}: tensor {k!r} appears in both {self._where[k].name} and {f.name}")
                self._where[k], self._meta[k] = f, v
        self._open: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> list[int]:
        return list(self._meta[key]["shape"])

    def dtype(self, key: str) -> str:
        return self._meta[key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._where:
            raise KeyError(f"{self.hf_dir}: no tensor {key!r} in the checkpoint")
        f = self._where[key]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def close(self) -> None:
        """Release the open shard files (tensors already returned stay valid)."""
        self._open.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._where:
            yield k, self.get(k)


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
