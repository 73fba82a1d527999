"""Saving checkpoints: DCP tensors from every rank, small states from rank 0, all or nothing.

Protocol of :func:`save_checkpoint` (``group`` = the ranks that save together, the world by default):

1. the coordinator (rank 0 of ``group``) refuses an existing ``iter_N`` unless ``overwrite``, removes
   leftovers of crashed saves (temp dirs whose owner is dead, see :func:`_clean_leftovers`) and creates
   ``<root>/.iter_N.tmp-<host>-<pid>-<id>``; every rank learns the outcome and the temp dir's name;
2. each rank writes its ``rank_state`` (RNG, ...) to ``rank_states/rank_<global rank>.pt``;
3. ``torch.distributed.checkpoint.save`` writes the tensors: DTensor shards from the TP ranks that own
   them, plain tensors once (DCP deduplicates items with the same key and offset across ranks, so DP
   replicas and replicated tensors are written by one rank only);
4. the coordinator writes ``extra_state.pt``, ``train_state.pt``, ``run_config.yaml``, copied files
   and the manifest, renames the temp dir to ``iter_N``, then updates the trackers (each file written
   to a temp file and ``os.replace``'d), then applies ``most_recent_k``.

A failure at any step removes the temp dir on the coordinator and raises on every rank; the tracker is
untouched, so the previous checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvlcore import interrupt
from nvlcore.checkpoint.atomic import (
    OutputExistsError,
    atomic_torch_save,
    atomic_write_text,
    publish_dir,
    remove_tree,
    temp_sibling,
)
from nvlcore.checkpoint.layout import (
    DCP_METADATA,
    EXTRA_STATE,
    MANIFEST,
    OLD_MARK,
    RANK_STATES_DIR,
    RUN_CONFIG,
    TMP_MARK,
    TRACKER_PT,
    TRACKER_TXT,
    TRAIN_STATE,
    iter_dir_name,
    list_iterations,
    parse_iteration,
)

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "nvl-dcp"
FORMAT_VERSION = 1
STATE_SEP = "/"
"""Separator between a sharded state's name and its keys in the DCP key space (``optimizer/<key>``).

Model keys are stored verbatim and may not contain it (parameter names never do)."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that will be produced later."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        import torch

        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamedState:
    """A model state whose tensors are produced on demand, for saves in bounded memory.

    ``specs`` lists every key with its shape and dtype, in the order the tensors will be requested;
    ``produce(key)`` returns the tensor (full shape). The writer requests keys in ``specs`` order and
    writes each to its own file before requesting the next, so a producer that computes a group of
    tensors at a time and hands them out in order holds one group in memory.
    """

    def __init__(self, specs: Mapping[str, TensorSpec], produce: Callable[[str], torch.Tensor]) -> None:
        self.specs = dict(specs)
        self.produce = produce

    def __len__(self) -> int:
        return len(self.specs)

    def keys(self) -> Iterable[str]:
        return self.specs.keys()


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the message names the rank and the cause."""


class NoSpaceError(CheckpointSaveError):
    """The file system of the checkpoint ran out of space; the message is the same on every rank:
    ``no space left on DEVICE for iter_N: need X GB, Y GB free``."""


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = existing_parent(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def existing_parent(path: str | os.PathLike[str]) -> Path:
    """``path`` itself or its nearest parent that exists."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes free for this user on the file system of ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(existing_parent(path)).free


def is_no_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it, or a DCP rank failure inside it) is a full disk."""
    import errno

    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        # torch.save's zip writer reports a failed write of a full disk as a position mismatch
        if "No space left on device" in text or "Disk quota exceeded" in text or (
            "inline_container" in text and ("unexpected pos" in text or "file write failed" in text)
        ):
            return True
        todo += [e.__cause__, e.__context__]
        todo += _dcp_failures(e)
    return False


def _dcp_failures(exc: BaseException | None) -> list[BaseException]:
    """The per-rank exceptions inside DCP's ``CheckpointException`` (values are ``(exception, trace)``)."""
    out: list[BaseException] = []
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for f in failures.values():
            f = f[0] if isinstance(f, tuple) and f else f
            if isinstance(f, BaseException):
                out.append(f)
    return out


def _state_nbytes(state: Mapping[str, Any]) -> int:
    total = 0
    for t in state.values():
        shape = tuple(t.shape)  # a DTensor's shape is the logical (global) one
        n = 1
        for d in shape:
            n *= int(d)
        total += n * t.element_size()
    return total


def human_bytes(n: int) -> str:
    """``12.3 GB`` (or ``4.5 MB`` below 0.1 GB)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def no_space_message(root: Path, iteration: int, need: int) -> str:
    """``no space left on DEVICE for iter_N: need X GB, Y GB free`` for a save under ``root``."""
    return (f"no space left on {mount_point(root)} for {iter_dir_name(iteration)}: need {human_bytes(need)}, "
            f"{human_bytes(free_bytes(root))} free (checkpoint root {root}; the previous checkpoint is intact)")


# --------------------------------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)


def _dist_state(group: Any) -> tuple[bool, int, int, int]:
    """(several ranks save together?, rank in group, group size, global rank).

    A group of one (``torch.distributed`` initialised for a single process, as a one-rank
    ``init_parallel`` does for one process) saves like a plain single process: no collectives.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False, 0, 1, 0
    size = dist.get_world_size(group)
    return size > 1, dist.get_rank(group), size, dist.get_rank()


def _agree(error: BaseException | None, group: Any, dist_on: bool, what: str) -> None:
    """Raise on every rank if any rank had an error (prevents the others from hanging in a collective)."""
    if not dist_on:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    msgs: list[Any] = [None] * dist.get_world_size(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(msgs, mine, group=group)
    full = [m for m in msgs if m is not None and m.startswith(f"{NoSpaceError.__name__}: ")]
    if full:  # the same one line on every rank
        raise NoSpaceError(full[0][len(NoSpaceError.__name__) + 2:]) from error
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        detail = "; ".join(f"rank {r}: {m}" for r, m in bad)
        raise CheckpointSaveError(f"checkpoint save failed during {what} ({detail})")


_MESH_CACHE: dict[tuple[int, str], Any] = {}


def shard_tensor(local: torch.Tensor, dim: int, group: Any = None, *, global_size: int | None = None) -> Any:
    """Wrap this rank's shard of a logical tensor as a DTensor over ``group`` (``Shard(dim)``).

    Rank ``r`` of ``group`` must hold the ``r``-th chunk along ``dim``, as a tensor-parallel column or
    row split does. ``global_size`` is the logical size along ``dim``; by default the chunks are
    assumed equal (``local.shape[dim] * group size``). The returned DTensor can be put in
    ``model_state`` (to save the shard) or in a load template (to read exactly that shard back).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    group = group if group is not None else dist.group.WORLD
    dev = local.device.type
    key = (id(group), dev)
    mesh = _MESH_CACHE.get(key)
    if mesh is None:
        mesh = DeviceMesh.from_group(group, device_type=dev)
        _MESH_CACHE[key] = mesh
    world = dist.get_world_size(group)
    dim = dim % local.dim()
    shape = list(local.shape)
    shape[dim] = global_size if global_size is not None else local.shape[dim] * world
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride)


# --------------------------------------------------------------------------------------------------


def _flatten_states(
    model_state: Mapping[str, Any] | StreamedState | None,
    sharded_states: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[dict[str, Any], StreamedState | None]:
    import torch

    out: dict[str, Any] = {}
    stream: StreamedState | None = None
    if isinstance(model_state, StreamedState):
        stream = model_state
        for k, spec in model_state.specs.items():
            out[k] = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    elif model_state is not None:
        out.update(model_state)
    for k in out:
        if STATE_SEP in k:
            raise ValueError(f"model_state key {k!r} contains {STATE_SEP!r}, which is reserved for sharded states")
    for name, state in (sharded_states or {}).items():
        if not name or STATE_SEP in name:
            raise ValueError(f"sharded state name {name!r} must be non-empty and contain no {STATE_SEP!r}")
        for k, v in state.items():
            out[f"{name}{STATE_SEP}{k}"] = v
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"checkpoint tensor {k!r} is a {type(v).__name__}; model_state/sharded_states hold tensors "
                "(or DTensors); put other objects in extra_state or rank_state"
            )
    return out, stream


def _make_planner(stream: StreamedState | None, *, spread: bool = True) -> Any:
    from torch.distributed.checkpoint import DefaultSavePlanner

    # DCP writes a tensor that several ranks hold (a DP replica, a TP-replicated weight) once: spread
    # over the ranks that hold it (balanced by size), or always by the lowest of them.
    if stream is None:
        return DefaultSavePlanner(dedup_save_to_lowest_rank=not spread)

    class _StreamingPlanner(DefaultSavePlanner):
        # DCP asks the planner for each item's data right before writing it; producing it there (and
        # not in the state dict) is what keeps a streamed save to one tensor group in memory.
        error: BaseException | None = None

        def resolve_data(self, write_item: Any) -> Any:
            fqn = write_item.index.fqn
            if fqn not in stream.specs:
                return super().resolve_data(write_item)
            try:
                tensor = stream.produce(fqn)
                spec = stream.specs[fqn]
                if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
                    raise ValueError(
                        f"{fqn}: produced {tuple(tensor.shape)} {tensor.dtype}, announced {spec.shape} {spec.dtype}"
                    )
            except BaseException as exc:
                # DCP wraps it in a CheckpointException with a long remote-style traceback; keep the
                # producer's own error (a shape mismatch naming the key, say) to re-raise as is.
                self.error = exc
                raise
            return tensor

    return _StreamingPlanner(dedup_save_to_lowest_rank=not spread)


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """Silence DCP's warning that a single-process save/load is single-process (nvl asks for it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _copy_into(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _remove_iteration_dir(path: Path) -> None:
    # Rename first: a directory half-way through rmtree must never look like a complete iteration.
    aside = temp_sibling(path, OLD_MARK)
    os.replace(path, aside)
    remove_tree(aside)


def _clean_leftovers(root: Path) -> None:
    """Remove what saves killed with SIGKILL (or on a lost machine) left under ``root``, saying so on stderr.

    A temp dir ``.iter_N.tmp-<host>-<pid>-<id>`` (or ``.old-``) names the process that made it: one
    of a process of this host that no longer runs is a leftover; one of a live process is another
    writer's live save and is kept. Temps of other hosts, and those of older nvl versions that name no
    owner (``.iter_N.tmp-save``), are removed only while this process holds the run directory's lock
    (:mod:`nvlcore.checkpoint.lock`), which no live writer can hold at the same time.
    """
    from nvlcore.checkpoint.atomic import pid_alive, temp_owner, this_host
    from nvlcore.checkpoint.lock import holds_run_lock

    locked, host = holds_run_lock(root), this_host()
    for child in root.iterdir():
        name = child.name
        mark = TMP_MARK if TMP_MARK in name else OLD_MARK if OLD_MARK in name else None
        if not name.startswith(".iter_") or mark is None or not child.is_dir():
            continue
        owner = temp_owner(name, mark)
        if owner is not None and owner[0] == host:
            if owner[1] == os.getpid() or pid_alive(owner[1]):
                continue
            why = f"left by process {owner[1]} that no longer runs (an interrupted checkpoint save)"
        elif not locked:
            continue
        elif owner is None:
            why = "left by an interrupted checkpoint save"
        else:
            why = f"left by process {owner[1]} on {owner[0]} (an interrupted checkpoint save; this run holds the lock)"
        remove_tree(child)
        print(f"nvl: removed {child}, {why}", file=sys.stderr)


def write_tracker(root: Path, iteration: int, train_state: Mapping[str, Any] | None = None) -> None:
    """Point the trackers of ``root`` at ``iteration`` (each file replaced atomically, ``.pt`` last)."""
    state = dict(train_state or {})
    state["iteration"] = iteration
    state.setdefault("step", iteration)  # Megatron-Bridge's TrainState calls it "step"
    atomic_write_text(root / TRACKER_TXT, f"{iteration}\n")
    atomic_torch_save(root / TRACKER_PT, state)


def apply_most_recent_k(root: Path, k: int, *, keep: int | None = None) -> list[int]:
    """Remove all but the ``k`` newest iterations under ``root`` (``k <= 0``: keep all); returns the removed ones."""
    if k is None or k <= 0:
        return []
    its = list_iterations(root)
    doomed = [it for it in its[:-k] if it != keep]
    for it in doomed:
        _remove_iteration_dir(root / iter_dir_name(it))
    return doomed


@dataclass(frozen=True)
class SaveOptions:
    """How :func:`save_checkpoint` writes a checkpoint (what it writes are its other arguments).

    :param overwrite: replace an existing ``iter_N`` (otherwise :class:`OutputExistsError`).
    :param most_recent_k: after the save, keep only the ``k`` newest iterations (``-1``: keep all).
    :param update_tracker: point the tracker at this iteration (the default).
    :param group: the ranks that save together (default: the world when torch.distributed is initialised).
    :param single_file_per_rank: DCP layout; one file per rank (default) or one file per tensor
        (forced for a :class:`StreamedState`: DCP holds every tensor of a file until the file closes).
    :param thread_count: DCP writer threads per rank.
    :param spread_replicated_writes: a tensor held by several ranks is written by one of them, chosen
        to balance the bytes each rank writes (``checkpoint.fully_parallel_save``, the default); with
        False always by the lowest rank that holds it.
    :param async_write: write the tensors in the background (``checkpoint.async_save``): the tensors
        are copied to host memory (DCP's staging) before the call returns, then written by a thread;
        the call returns a :class:`PendingSave` whose ``wait()`` (collective, every rank at the same
        point) finishes the save exactly as a synchronous one does: small states, manifest, rename,
        trackers. Until then the iteration is a temp dir and the trackers point at the previous checkpoint.
    :param async_group: the process group of the background writes: it must have a CPU backend (gloo)
        and be used by nothing else meanwhile (default: ``group``; pass a dedicated gloo group when the
        main thread runs collectives while the save is pending).
    """

    overwrite: bool = False
    most_recent_k: int = -1
    update_tracker: bool = True
    group: Any = None
    single_file_per_rank: bool | None = None
    thread_count: int = 1
    spread_replicated_writes: bool = True
    async_write: bool = False
    async_group: Any = None


@dataclass(frozen=True)
class CheckpointContent:
    """What one save writes (the arguments of :func:`save_checkpoint` of the same names)."""

    model_state: Mapping[str, torch.Tensor] | StreamedState | None
    sharded_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    extra_state: Mapping[str, Any] | None = None
    rank_state: Mapping[str, Any] | None = None
    run_config: Mapping[str, Any] | None = None
    train_state: Mapping[str, Any] | None = None
    files: Mapping[str, str | os.PathLike[str]] | None = None


def save_checkpoint(
    root: str | os.PathLike[str],
    iteration: int,
    *,
    model_state: Mapping[str, torch.Tensor] | StreamedState | None,
    sharded_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, Any] | None = None,
    run_config: Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
    options: SaveOptions | None = None,
) -> Path | PendingSave:
    """Save one iteration under ``root``; collective over ``options.group`` when torch.distributed is initialized.

    :param model_state: logical tensors by name (the bridge's component keys). A plain tensor is the
        full tensor (identical on every rank that passes it); a DTensor (see :func:`shard_tensor`) is
        this rank's shard of it. A :class:`StreamedState` produces tensors on demand (imports).
    :param sharded_states: more tensor states saved the same way and resharded the same way on load,
        by name: ``{"optimizer": {"<param>.exp_avg": DTensor, ...}}`` is stored as ``optimizer/<key>``.
    :param extra_state: global objects from the coordinator (scheduler, data-loader position, ...),
        saved as ``extra_state.pt``; must load with ``weights_only=True`` (checked now).
    :param rank_state: this rank's own objects (RNG states: :func:`nvlcore.checkpoint.capture_rng_state`),
        saved as ``rank_states/rank_<global rank>.pt``; every rank may pass one.
    :param run_config: the resolved run config (``config_to_dict``), saved as ``run_config.yaml``.
    :param train_state: iteration counters etc. (``train_state.pt`` and the tracker ``latest_train_state.pt``).
    :param files: extra files or directories copied in, by name inside the iteration dir (``tokenizer``).
    :param options: how to write (:class:`SaveOptions`: overwrite, most_recent_k, async_write, ...).
    :returns: the ``iter_N`` directory, or a :class:`PendingSave` with ``options.async_write``.
    """
    content = CheckpointContent(model_state, sharded_states, extra_state, rank_state, run_config, train_state, files)
    return _Save(root, iteration, content, options or SaveOptions()).run()


class _Save:
    """One call of :func:`save_checkpoint`, its steps as methods (the module docstring's protocol)."""

    def __init__(self, root: str | os.PathLike[str], iteration: int, content: CheckpointContent,
                 opts: SaveOptions) -> None:
        self.root = Path(root).expanduser().absolute()
        self.iteration, self.content, self.opts = iteration, content, opts
        self.dist_on, grank, self.group_size, self.global_rank = _dist_state(opts.group)
        self.coordinator = grank == 0
        self.final = self.root / iter_dir_name(iteration)
        self.tmp: Path | None = None
        self.need = 0  # bytes of tensors, for the no-space line

    def run(self) -> Path | PendingSave:
        self.prepare()
        try:
            state, stream = _flatten_states(self.content.model_state, self.content.sharded_states)
            if stream is not None and self.dist_on:
                raise ValueError("a StreamedState model_state is for single-process saves (imports)")
            self.need = _state_nbytes(state)
            self.write_rank_state()
            future = self.write_tensors(state, stream)
        except BaseException:
            self.discard()
            raise
        if future is not None:
            return PendingSave(self.final, lambda: self.finish(future))
        return self.finish(None)

    def agree(self, error: BaseException | None, what: str) -> None:
        _agree(error, self.opts.group, self.dist_on, what)

    def no_space(self, exc: BaseException) -> BaseException:
        if isinstance(exc, NoSpaceError) or not is_no_space(exc):
            return exc
        return NoSpaceError(no_space_message(self.root, self.iteration, self.need))

    def discard(self) -> None:
        if self.coordinator:
            if self.tmp is not None:
                remove_tree(self.tmp)
            interrupt.note_discarded(self.final)

    def prepare(self) -> None:
        """Coordinator: refuse an existing ``iter_N``, clean dead saves' leftovers, make the temp dir."""
        err: BaseException | None = None
        name = None
        if self.coordinator:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if self.final.exists() and not self.opts.overwrite:
                    raise OutputExistsError(f"checkpoint {self.final} exists; pass overwrite=True "
                                            "(--overwrite / checkpoint.overwrite) to replace it")
                _clean_leftovers(self.root)
                tmp = temp_sibling(self.final, TMP_MARK)  # names its owner: only a dead owner's is a leftover
                tmp.mkdir()
                name = tmp.name
            except BaseException as exc:
                err = exc
        self.agree(err, "preparation")
        self.tmp = self.root / _from_coordinator(name, self.opts.group, self.dist_on)

    def write_rank_state(self) -> None:
        assert self.tmp is not None
        err = None
        try:
            if self.content.rank_state is not None:
                (self.tmp / RANK_STATES_DIR).mkdir(exist_ok=True)
                atomic_torch_save(self.tmp / RANK_STATES_DIR / f"rank_{self.global_rank:05d}.pt",
                                  dict(self.content.rank_state))
        except BaseException as exc:
            err = self.no_space(exc)
        self.agree(err, "rank_state writes")

    def write_tensors(self, state: dict[str, Any], stream: StreamedState | None) -> Any:
        """DCP writes the tensors now, or starts writing them in the background (returns its future)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        o = self.opts
        one_file = o.single_file_per_rank if o.single_file_per_rank is not None else stream is None
        # Durability before the rename: a multi-rank save lets DCP fsync each file on the rank that
        # wrote it; a single process (imports: one file per tensor) fsyncs all files once at the end,
        # which lets the kernel write back in bulk instead of stalling on every file.
        writer = FileSystemWriter(str(self.tmp), single_file_per_rank=one_file and stream is None,
                                  thread_count=o.thread_count, sync_files=self.dist_on)
        planner = _make_planner(stream, spread=o.spread_replicated_writes)
        if o.async_write:
            if stream is not None:
                raise ValueError("a StreamedState model_state cannot be saved asynchronously")
            # the background thread runs after quiet_dcp() has restored the filters: silence DCP's
            # "single process" warning for good (nvl asks for single-process saves on purpose)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            with quiet_dcp():
                future = dcp.async_save(state, storage_writer=writer, planner=planner,
                                        process_group=o.async_group if o.async_group is not None else o.group,
                                        no_dist=not self.dist_on)
            return getattr(future, "upload_completion", future)  # an AsyncSaveResponse holds two futures
        try:
            with quiet_dcp():
                dcp.save(state, storage_writer=writer, planner=planner, process_group=o.group, no_dist=not self.dist_on)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            self.raise_write_failure(exc, planner)
        return None

    def raise_write_failure(self, exc: BaseException, planner: Any) -> None:
        """One error for a failed ``dcp.save``: the producer's own, a Ctrl-C, no space, or the ranks' causes."""
        original = getattr(planner, "error", None)
        if original is not None:
            raise original from None
        for failure in _dcp_failures(exc):  # DCP wraps even a Ctrl-C / SIGTERM of a rank: unwrap it
            if isinstance(failure, KeyboardInterrupt):
                raise failure from None
        if is_no_space(exc):
            # every rank got DCP's gathered failure; rank 0's figures make the line the same everywhere
            self.agree(NoSpaceError(no_space_message(self.root, self.iteration, self.need)), "the tensor writes")
        causes = "; ".join(f"{type(f).__name__}: {(str(f).strip().splitlines() or [''])[0][:200]}"
                           for f in _dcp_failures(exc)) or str(exc).strip().splitlines()[0]
        raise CheckpointSaveError(f"writing the tensors of {self.final.name} failed: {causes}") from exc

    def finish(self, future: Any) -> Path:
        """Wait for background writes (if any), then publish; on failure the temp dir goes."""
        try:
            if future is not None:
                err: BaseException | None = None
                try:
                    future.result()
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:
                    err = (NoSpaceError(no_space_message(self.root, self.iteration, self.need))
                           if is_no_space(exc) else
                           CheckpointSaveError(f"writing the tensors of {self.final.name} failed: {exc}"))
                self.agree(err, "background tensor writes")
            self.finalize()
        except BaseException:
            self.discard()
            raise
        return self.final

    def finalize(self) -> None:
        """Coordinator: small states and manifest, rename to ``iter_N``, trackers, ``most_recent_k``."""
        assert self.tmp is not None
        if not self.dist_on:
            _fsync_tree(self.tmp)
        err = None
        if self.coordinator:
            try:
                ts = self.write_small_states()
                publish_dir(self.tmp, self.final, overwrite=self.opts.overwrite)
                if self.opts.update_tracker:
                    write_tracker(self.root, self.iteration, ts)
                    apply_most_recent_k(self.root, self.opts.most_recent_k, keep=self.iteration)
            except BaseException as exc:
                err = self.no_space(exc)
        self.agree(err, "finalization")

    def write_small_states(self) -> dict[str, Any]:
        """``extra_state.pt``, ``train_state.pt``, ``run_config.yaml``, copied files, the manifest.

        Returns the train state.
        """
        import yaml

        tmp, c = self.tmp, self.content
        assert tmp is not None
        if not (tmp / DCP_METADATA).is_file():
            raise CheckpointSaveError(f"DCP wrote no {DCP_METADATA} in {tmp}")
        if c.extra_state is not None:
            atomic_torch_save(tmp / EXTRA_STATE, dict(c.extra_state))
        ts = dict(c.train_state or {})
        ts.setdefault("iteration", self.iteration)
        atomic_torch_save(tmp / TRAIN_STATE, ts)
        if c.run_config is not None:
            atomic_write_text(tmp / RUN_CONFIG, yaml.safe_dump(_plain(c.run_config), sort_keys=False))
        for name, src in (c.files or {}).items():
            _copy_into(Path(src), tmp / name)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "iteration": self.iteration,
            "saved_world_size": self.group_size,
            "sharded_states": sorted((c.sharded_states or {}).keys()),
            "extra_state": c.extra_state is not None,
            "rank_states": sorted(p.name for p in (tmp / RANK_STATES_DIR).glob("rank_*.pt")),
            "files": sorted((c.files or {}).keys()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return ts


def _from_coordinator(value: Any, group: Any, dist_on: bool) -> Any:
    """The coordinator's ``value`` on every rank of ``group``."""
    if not dist_on:
        return value
    import torch.distributed as dist

    box = [value]
    src = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class PendingSave:
    """A save whose tensors are being written in the background (``SaveOptions(async_write=True)``).

    :meth:`wait` is collective: every rank calls it at the same point of its program (the next save,
    the end of training); it raises if any rank's write failed, leaving the previous checkpoint the
    latest.
    """

    def __init__(self, path: Path, finish: Callable[[], Path]) -> None:
        self.path = path
        self._finish: Callable[[], Path] | None = finish

    def wait(self) -> Path:
        """Wait for the writes, then publish ``iter_N`` and update the trackers; returns ``iter_N``."""
        if self._finish is None:
            return self.path
        finish, self._finish = self._finish, None
        return finish()


def _plain(obj: Any) -> Any:
    """Make a config mapping YAML-safe (tuples -> lists, paths/dtypes -> str)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def iteration_of(path: str | os.PathLike[str]) -> int | None:
    """Iteration number of an ``iter_N`` path (``None`` otherwise)."""
    return parse_iteration(Path(path).name)
