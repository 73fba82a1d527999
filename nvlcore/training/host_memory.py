"""Host memory of the offloaded optimizer (:class:`~nvlcore.training.host_offload.HostOffloadAdamW`) as the
memory plan counts it: PyTorch's pinned-allocator rounding, the pipeline's chunk size and its ring of pinned
gradient buffers. A leaf module, shared by the plan and the optimizer."""

from __future__ import annotations

from collections.abc import Sequence

#: fp32 bytes of host-updated parameters per chunk of the offloaded optimizer's pipelined step
#: (:class:`~nvlcore.training.host_offload.HostOffloadAdamW`)
OFFLOAD_CHUNK_BYTES = 64 << 20
#: chunks of that step whose pinned gradient buffers exist at once: a ring of this many slots, each sized for
#: the largest chunk, which the copies to the host fill while the CPU updates the chunks before
LANDING_SLOTS = 4


def pinned_size(nbytes: float) -> int:
    """What PyTorch's pinned host-memory allocator takes for ``nbytes``: the next power of two (its caching
    allocator rounds every request up to one before it pins memory)."""
    n = int(nbytes)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def offload_host_bytes(params: Sequence[tuple[int, float, bool]], fraction: float, *, pinned: bool,
                       chunk_bytes: int | None = OFFLOAD_CHUNK_BYTES) -> int:
    """Host bytes of the optimizer state :class:`~nvlcore.training.host_offload.HostOffloadAdamW` keeps for
    ``params`` (``(values, gradient bytes per value, stays fp32 on the device)`` in the optimizer's order) with
    ``fraction`` of the values offloaded: each parameter's fp32 master (pinned on a GPU where the device keeps
    an fp32 parameter, whose value crosses from and to it), two fp32 moments, and on a GPU the ring of
    :data:`LANDING_SLOTS` pinned gradient buffers (per gradient dtype, each sized for the largest chunk) plus an
    fp32 scratch for upcasting a chunk's bf16 gradients."""
    total = sum(n for n, _, _ in params)
    chosen: list[tuple[int, float, bool]] = []
    taken = 0
    for n, grad_bytes, fp32 in params:
        if taken >= fraction * total:
            break
        chosen.append((n, grad_bytes, fp32))
        taken += n
    masters = sum(pinned_size(4 * n) if pinned and fp32 else 4 * n for n, _, fp32 in chosen)
    chunks: list[list[tuple[int, float, bool]]] = []
    size = 0
    for item in chosen:
        if not chunks or (chunk_bytes is not None and size >= chunk_bytes):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += 4 * item[0]
    landing = scratch = 0
    if pinned:  # a CPU run's host update reads the gradients where they are
        slot: dict[float, float] = {}  # gradient bytes per value -> the most bytes one chunk has of them
        for c in chunks:
            for gb in {g for _, g, _ in c}:
                slot[gb] = max(slot.get(gb, 0), sum(n * g for n, g, _ in c if g == gb))
            scratch = max(scratch, sum(n for n, g, _ in c if g != 4))
        landing = min(LANDING_SLOTS, len(chunks)) * sum(pinned_size(b) for b in slot.values())
    return int(masters + 8 * taken + landing + 4 * scratch)


__all__ = ["LANDING_SLOTS", "OFFLOAD_CHUNK_BYTES", "offload_host_bytes", "pinned_size"]
