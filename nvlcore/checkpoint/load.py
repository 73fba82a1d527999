"""Reading checkpoints: full tensors, or exactly the shards a target layout needs.

DCP stores each tensor as chunks with their offsets in the logical tensor; a load names the tensors it
wants and gives each a destination (a full tensor, or a DTensor whose local shard is filled). DCP
reads only the byte ranges that overlap each destination, so a checkpoint written at TP=N loads at
TP=M, and a single process can read one tensor group at a time in bounded memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from nvlcore.checkpoint.layout import (
    DCP_METADATA,
    EXTRA_STATE,
    MANIFEST,
    RANK_STATES_DIR,
    RUN_CONFIG,
    TRAIN_STATE,
    CheckpointCorruptError,
    first_line,
    parse_iteration,
    resolve_checkpoint_dir,
)
from nvlcore.checkpoint.save import STATE_SEP, TensorSpec

if TYPE_CHECKING:
    import torch


class CheckpointKeyError(KeyError):
    """Requested tensors are not in the checkpoint; the message lists them and some that are."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0]) if self.args else ""


class Checkpoint:
    """One resolved ``iter_N`` directory (see :func:`resolve_checkpoint_dir` for what ``path`` may be)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = resolve_checkpoint_dir(path)
        self._metadata: Any = None
        self._specs: dict[str | None, dict[str, TensorSpec]] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    # -- small files ------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        it = parse_iteration(self.path.name)
        if it is not None:
            return it
        return int(self.manifest().get("iteration", self.train_state().get("iteration", 0)))

    def manifest(self) -> dict[str, Any]:
        p = self.path / MANIFEST
        return json.loads(p.read_text()) if p.is_file() else {}

    def _torch_load(self, p: Path) -> Any:
        import torch

        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointCorruptError(f"{p} is damaged (not a torch file nvl can read: {type(exc).__name__}); the "
                                         f"checkpoint {self.path} "
                                         "cannot be used") from None

    def train_state(self) -> dict[str, Any]:
        """``train_state.pt`` (empty dict when absent, as in imported checkpoints of other tools)."""
        p = self.path / TRAIN_STATE
        return dict(self._torch_load(p)) if p.is_file() else {}

    def extra_state(self) -> dict[str, Any] | None:
        """The coordinator's ``extra_state`` (scheduler, data position...), or ``None`` if not saved."""
        p = self.path / EXTRA_STATE
        return dict(self._torch_load(p)) if p.is_file() else None

    def rank_state(self, rank: int | None = None) -> dict[str, Any] | None:
        """The ``rank_state`` saved by global ``rank`` (default: this process's), or ``None``.

        ``None`` also when the job that saved had fewer ranks: callers re-seed and say so.
        """
        if rank is None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        p = self.path / RANK_STATES_DIR / f"rank_{rank:05d}.pt"
        return dict(self._torch_load(p)) if p.is_file() else None

    def run_config(self) -> dict[str, Any] | None:
        p = self.path / RUN_CONFIG
        if not p.is_file():
            return None
        return yaml.safe_load(p.read_text()) or {}

    # -- tensor metadata --------------------------------------------------------------------------
    def _md(self) -> Any:
        if self._metadata is None:
            from torch.distributed.checkpoint import FileSystemReader

            try:
                md = FileSystemReader(str(self.path)).read_metadata()
            except Exception as exc:
                raise CheckpointCorruptError(
                    f"{self.path / DCP_METADATA} is damaged ({first_line(exc, 80)}); the checkpoint {self.path} cannot "
                    "be used"
                ) from None
            self._check_files(md)
            self._metadata = md
        return self._metadata

    def _check_files(self, md: Any) -> None:
        """Every shard file the metadata names exists and holds the byte ranges it lists."""
        need: dict[str, int] = {}
        for info in (getattr(md, "storage_data", None) or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is None:
                continue
            end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
            need[rel] = max(need.get(rel, 0), end)
        for rel, end in sorted(need.items()):
            f = self.path / rel
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                raise CheckpointCorruptError(
                    f"{f} is missing: the checkpoint {self.path} is incomplete (copy it again, or use another "
                    "iteration)"
                ) from None
            if size < end:
                raise CheckpointCorruptError(
                    f"{f} is truncated ({size} bytes, the metadata needs {end}): the checkpoint {self.path} is damaged "
                    "(copy it again, or use another iteration)"
                )

    def _reader(self) -> Any:
        # Reads the metadata once per Checkpoint, not once per load: exports load group by group.
        from torch.distributed.checkpoint import FileSystemReader

        md = self._md()

        class _Reader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                return md

        return _Reader(str(self.path))

    def specs(self, state: str | None = None) -> dict[str, TensorSpec]:
        """Shape and dtype of every tensor of the model (``state=None``) or of a sharded state, by key."""
        if state in self._specs:
            return dict(self._specs[state])
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        out: dict[str, TensorSpec] = {}
        prefix = None if state is None else f"{state}{STATE_SEP}"
        for k, md in self._md().state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                continue
            if prefix is None:
                if STATE_SEP in k:
                    continue
                name = k
            elif k.startswith(prefix):
                name = k[len(prefix) :]
            else:
                continue
            out[name] = TensorSpec(tuple(md.size), md.properties.dtype)
        self._specs[state] = out
        return dict(out)

    def keys(self, state: str | None = None) -> list[str]:
        return list(self.specs(state))

    def sharded_state_names(self) -> list[str]:
        names = {k.split(STATE_SEP, 1)[0] for k in self._md().state_dict_metadata if STATE_SEP in k}
        return sorted(names)

    # -- tensors ----------------------------------------------------------------------------------
    def load(
        self,
        template: Mapping[str, torch.Tensor] | Iterable[str] | None = None,
        *,
        state: str | None = None,
        group: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Load tensors of the model (or of sharded ``state``).

        :param template: ``None`` for every tensor in full; an iterable of keys for those in full; or a
            mapping key -> destination: a tensor of the full shape, or a DTensor (see
            :func:`nvlcore.checkpoint.shard_tensor`) whose local shard is filled. Destinations may have
            another dtype (values are cast).
        :param group: run the load as a collective over this group (not needed: each rank reads its
            own byte ranges independently; by default no collective is made).
        :returns: the destinations by key (DTensors as given).
        """
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.tensor import DTensor

        specs = self.specs(state)
        if template is None:
            template = list(specs)
        if not isinstance(template, Mapping):
            keys = list(template)
            self._check_keys(keys, specs, state)
            dest: dict[str, torch.Tensor] = {k: torch.empty(specs[k].shape, dtype=specs[k].dtype) for k in keys}
        else:
            dest = dict(template)
            self._check_keys(dest, specs, state)
            for k, t in dest.items():
                if tuple(t.shape) != tuple(specs[k].shape):
                    raise ValueError(
                        f"shape mismatch for {k!r}: checkpoint {tuple(specs[k].shape)} vs target {tuple(t.shape)} "
                        f"({self.path})"
                    )
        if not dest:
            return {}
        prefix = "" if state is None else f"{state}{STATE_SEP}"
        sd = {prefix + k: v for k, v in dest.items()}
        # A load needs no coordination between ranks: each reads the byte ranges its destinations
        # overlap (DTensor shards included), so it runs without collectives unless a group is given.
        distributed = group is not None and any(isinstance(v, DTensor) for v in dest.values())
        from nvlcore.checkpoint.save import quiet_dcp

        try:
            with quiet_dcp():
                dcp.load(sd, storage_reader=self._reader(), process_group=group, no_dist=not distributed)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            raise CheckpointCorruptError(
                f"reading the tensors of {self.path} failed ({first_line(exc, 160)}); its .distcp files may be damaged"
            ) from None
        return {k: sd[prefix + k] for k in dest}

    def _check_keys(self, keys: Iterable[str], specs: Mapping[str, TensorSpec], state: str | None) -> None:
        missing = [k for k in keys if k not in specs]
        if missing:
            have = list(specs)[:5]
            where = "the model" if state is None else f"state {state!r}"
            raise CheckpointKeyError(
                f"{len(missing)} tensor(s) not in {where} of checkpoint {self.path}: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (it holds {len(specs)}, e.g. {have})"
            )


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Resolve ``path`` (base dir -> latest iteration, or an ``iter_N`` dir) and open it."""
    return Checkpoint(path)


def load_model_state(
    path: str | os.PathLike[str],
    template: Mapping[str, torch.Tensor] | Iterable[str] | None = None,
    *,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """Load model tensors from a checkpoint path: all in full, some keys in full, or into a template."""
    return Checkpoint(path).load(template, group=group)
