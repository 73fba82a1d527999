"""Every node sees the run directory: checked once at start, not discovered at the first save.

A run over several machines writes one checkpoint together: each rank its shards, global rank 0 the
trackers and small files, all into ``checkpoint.save``. That only works when every node mounts the
same directory at that path (NFS, Lustre, GPFS, ...). A node-local path would let training run for
hours and then leave each checkpoint split over machines, or hang a collective at the first save.

So, at start, global rank 0 writes a marker holding a fresh nonce into the directory; after a
collective, every rank looks for it (re-listing the directory for a few seconds: an NFS client may
cache that the name did not exist); rank 0 removes it; any rank that did not find it makes every
rank refuse the run in one line naming the path, the node and its host.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

MARKER_PREFIX = ".nvl-shared-check-"

#: How long a rank re-lists the directory before it decides the marker is not there.
VISIBILITY_WAIT_S = 5.0


class SharedDirectoryError(RuntimeError):
    """A node does not see the run directory global rank 0 writes to; the message names path, node and host."""


def write_marker(root: str | os.PathLike[str]) -> str:
    """Write a marker with a fresh nonce into ``root`` (which exists); returns the nonce."""
    nonce = uuid.uuid4().hex
    path = Path(root) / f"{MARKER_PREFIX}{nonce}"
    with open(path, "w") as f:
        f.write(nonce)
        f.flush()
        os.fsync(f.fileno())
    return nonce


def sees_marker(root: str | os.PathLike[str], nonce: str, *, wait_s: float = VISIBILITY_WAIT_S) -> bool:
    """Whether ``root`` holds the marker ``nonce`` (looked for until ``wait_s`` has passed)."""
    name = f"{MARKER_PREFIX}{nonce}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # listing the directory revalidates an NFS client's cached "no such name"
            if name in os.listdir(root) and (Path(root) / name).read_text() == nonce:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def remove_marker(root: str | os.PathLike[str], nonce: str) -> None:
    try:
        (Path(root) / f"{MARKER_PREFIX}{nonce}").unlink()
    except FileNotFoundError:
        pass


def describe_blind(root: str, blind: list[tuple[int, str, str]], *, main_root: str, key: str) -> str:
    """The one-line refusal: which node(s) (rank, host, their path) do not see rank 0's directory."""
    nodes = sorted({(node, host, path) for node, host, path in blind})
    where = "; ".join(f"node {n} (host {h})" + (f" with {key}={p}" if p != main_root else "") for n, h, p in nodes)
    return (f"{key}={main_root} is not visible from {where}: it must be a directory every node mounts at the same "
            f"path (a shared filesystem: NFS, Lustre, ...); checkpoints written there by global rank 0 would be "
            "incomplete. Point it at shared storage on every node")


def check_shared_directory(root: str, *, rank: int, world_size: int, node: int, key: str = "checkpoint.save",
                           group: Any = None) -> None:
    """Collective: every rank checks it sees the marker global rank 0 wrote into ``root``.

    :param root: the run directory as this rank's config names it; it exists on rank 0.
    :param node: this machine's rank (:func:`nvlcore.parallel.node_rank`), named in the refusal.
    :raises SharedDirectoryError: on every rank, when any rank does not see the marker.
    """
    import torch.distributed as dist

    box: list[Any] = [write_marker(root) if rank == 0 else None, str(root)]
    dist.broadcast_object_list(box, src=0, group=group)
    nonce, main_root = box
    ok = sees_marker(root, nonce) if rank != 0 else True
    mine = (ok, node, socket.gethostname(), str(root))
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    if rank == 0:
        remove_marker(root, nonce)
    blind = [(node, host, path) for ok, node, host, path in gathered if not ok]
    if blind:
        raise SharedDirectoryError(describe_blind(str(root), blind, main_root=main_root, key=key))
