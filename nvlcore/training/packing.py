"""Sequence packing: whole samples packed into rows of ``dataset.seq_length`` tokens.

The sample stream is the unpacked one (:class:`~nvlcore.training.data.GlobalBatchSampler`'s order:
epoch ``e`` a permutation drawn from ``seed + e``, epochs back to back). It is cut into *windows* of
``dataset.packing_buffer_size`` consecutive stream positions, the bounded look-ahead buffer. A DataLoader
worker processes a whole window and packs its samples into rows (:func:`pack_lengths`, first-fit or
best-fit, deterministic), so processing stays in the workers; the main process collates ``micro_batch_size``
rows at a time with the processor's ``collate_packed``.

Data-parallel rank ``r`` of ``dp`` packs windows ``r, r + dp, r + 2 dp, ...`` and takes
``global_batch_size / dp`` rows per iteration from them. Its position is two integers, the window it
is in and how many of that window's rows it has consumed; resuming reprocesses that window (the
processor is seeded per stream position, so the samples are the same) and skips the consumed rows.
The positions of all DP ranks are saved with each checkpoint (so a packed run resumes at the same DP size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

PACKING_MODES = ("none", "first_fit", "best_fit")


def pack_lengths(lengths: Sequence[int], capacity: int, mode: str) -> list[list[int]]:
    """Pack items of ``lengths`` into bins of ``capacity``; returns each bin's item indices (in stream order).

    ``first_fit``: each item, in order, goes to the first bin with room, else a new bin;
    ``best_fit``: to the bin it fills most tightly (least room left after it), else a new bin.
    Bins are returned in the order they were opened. Deterministic (ties go to the earlier bin).

    :raises ValueError: for an item longer than ``capacity`` or an unknown mode.
    """
    if mode not in ("first_fit", "best_fit"):
        raise ValueError(f"dataset.packing must be one of {', '.join(PACKING_MODES)}; got {mode!r}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit dataset.seq_length={capacity}")
        chosen = -1
        for b, r in enumerate(room):
            if r >= n and (chosen < 0 or (mode == "best_fit" and r < room[chosen])):
                chosen = b
                if mode == "first_fit":
                    break
        if chosen < 0:
            bins.append([])
            room.append(capacity)
            chosen = len(bins) - 1
        bins[chosen].append(i)
        room[chosen] -= n
    return bins


@attrs.define
class WindowSampler:
    """DataLoader ``batch_sampler``: yields this rank's windows as lists of ``(position, index)``.

    :param order: maps a stream position to a dataset index (``GlobalBatchSampler.index_at``).
    :param window: samples per window (``dataset.packing_buffer_size``).
    :param dp_rank: this rank's data-parallel index; :param dp_size: data-parallel size.
    :param start_window: the window to start from (a resumed position), on this rank's stride.
    """

    order: Callable[[int], int]
    window: int
    dp_rank: int = 0
    dp_size: int = 1
    start_window: int | None = None

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        w = self.dp_rank if self.start_window is None else self.start_window
        while True:
            yield [(p, self.order(p)) for p in range(w * self.window, (w + 1) * self.window)]
            w += self.dp_size


def num_tokens(sample: dict[str, Any]) -> int:
    """A processed sample's length in tokens."""
    return int(sample["input_ids"].numel())


class PackWindow:
    """Worker-side collate: a window of processed samples -> ``(window_position, rows)``, each row the
    samples packed into it (a picklable callable, so it runs in DataLoader workers)."""

    def __init__(self, capacity: int, mode: str, length: Callable[[dict[str, Any]], int] | None = None) -> None:
        self.capacity, self.mode = capacity, mode
        self.length = length or num_tokens

    def __call__(self, samples: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        bins = pack_lengths([self.length(s) for s in samples], self.capacity, self.mode)
        return [[samples[i] for i in b] for b in bins]


class PackedBatches:
    """Main-process iterator of packed micro-batches (``micro_batch_size`` rows each) over a loader of
    windows; :attr:`position` is ``(window, rows consumed in it)`` after the last batch yielded.

    With ``prefetch > 0`` a background thread takes windows from the loader, collates and pins up to
    ``prefetch`` micro-batches ahead, so the training loop never waits on a window's hand-over (a window
    of 128 MedPix samples is ~500 tensors received at once) or on collation; :attr:`position` still
    names the last batch handed to the caller. Call :meth:`close` (or drop the object) to stop it.

    :param windows: iterator of packed windows (lists of rows), in this rank's window order.
    :param collate: ``collate_packed(rows)``.
    :param micro_batch_size: rows per micro-batch.
    :param start: ``(window, rows)`` to resume from, or None for ``(dp_rank, 0)``.
    :param pin_memory: pin each batch's tensors (for non-blocking copies to ``device``).
    :param prefetch: micro-batches made ahead in a background thread (0: made on demand).
    :param device: the CUDA device pinned memory is allocated for (the prefetch thread's current device).
    """

    def __init__(self, windows: Iterator[list[list[dict[str, Any]]]],
                 collate: Callable[[Sequence[Any]], dict[str, Any]],
                 *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 start: tuple[int, int] | None = None, pin_memory: bool = False, prefetch: int = 0,
                 device: torch.device | None = None) -> None:
        self._maker = _BatchMaker(windows, collate, micro_batch_size, dp_size, start or (dp_rank, 0), pin_memory)
        self._position = self._maker.position()
        # The thread owns the maker, never this object: dropping this object stops the thread.
        self._prefetcher = _Prefetcher(self._maker.batches(), prefetch, device) if prefetch > 0 else None

    @property
    def position(self) -> tuple[int, int]:
        """``(window, rows consumed in it)`` after the last micro-batch handed out."""
        return self._position

    @property
    def rows_per_window(self) -> list[int]:
        """Rows of every window taken from the loader so far (with prefetch, that runs ahead)."""
        return self._maker.rows_per_window

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        batch, self._position = self._prefetcher.get() if self._prefetcher is not None else self._maker.make()
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (if any), which releases the loader."""
        if self._prefetcher is not None:
            self._prefetcher.close()


class _BatchMaker:
    """Rows from the windows, ``mbs`` at a time, collated (and pinned), each with the position after it."""

    def __init__(self, windows: Iterator[list[list[dict[str, Any]]]],
                 collate: Callable[[Sequence[Any]], dict[str, Any]],
                 mbs: int, dp_size: int, start: tuple[int, int], pin: bool) -> None:
        self.windows, self.collate, self.mbs, self.dp_size, self.pin = windows, collate, mbs, dp_size, pin
        self._window, self._skip = int(start[0]), int(start[1])
        self._rows: list[list[dict[str, Any]]] = []
        self._taken = 0  # rows of the current window consumed
        self._loaded = False
        self.rows_per_window: list[int] = []

    def position(self) -> tuple[int, int]:
        if self._loaded and self._taken >= len(self._rows):
            return (self._window + self.dp_size, 0)
        return (self._window, self._taken if self._loaded else self._skip)

    def _next_row(self) -> list[dict[str, Any]]:
        while not self._loaded or self._taken >= len(self._rows):
            if self._loaded:
                self._window += self.dp_size
            self._rows = next(self.windows)
            self.rows_per_window.append(len(self._rows))
            self._loaded = True
            self._taken = min(self._skip, len(self._rows))
            self._skip = 0
        row = self._rows[self._taken]
        self._taken += 1
        return row

    def make(self) -> tuple[dict[str, Any], tuple[int, int]]:
        batch = self.collate([self._next_row() for _ in range(self.mbs)])
        if self.pin:
            import torch

            batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return batch, self.position()

    def batches(self) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
        while True:
            yield self.make()


class _Prefetcher:
    """Runs ``items`` in a daemon thread, ``depth`` items ahead; an exception there is raised by :meth:`get`.

    The thread holds no reference to the object that owns this one, so dropping the owner (and with it
    this object) stops the thread through a finalizer.
    """

    def __init__(self, items: Iterator[Any], depth: int, device: torch.device | None) -> None:
        import queue
        import threading
        import weakref

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_prefetch_loop, args=(items, self._queue, self._stop, device),
                                        name="nvl-packed-prefetch", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_prefetch, self._stop, self._queue, self._thread)

    def get(self) -> Any:
        if self._stop.is_set():
            raise RuntimeError("the packed batches were closed; no more batches come from them")
        item = self._queue.get()
        if isinstance(item, _Raised):
            self._queue.put(item)  # every later get() raises too
            raise item.exc
        return item

    def close(self) -> None:
        self._finalizer()


@attrs.define
class _Raised:
    exc: BaseException


def _prefetch_loop(items: Iterator[Any], q: Any, stop: Any, device: torch.device | None) -> None:
    import queue

    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.set_device(device)  # pinned buffers belong to this rank's device
    try:
        while not stop.is_set():
            item: Any
            try:
                item = next(items)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                item = _Raised(exc)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Raised):
                return
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _stop_prefetch(stop: Any, q: Any, thread: Any) -> None:
    import queue

    stop.set()
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    # The thread wakes from a full queue within 0.1 s; one waiting on a loader window is a daemon
    # holding nothing to save, so it is not waited for long.
    thread.join(timeout=5)


def build_packed_loader(dataset: Any, order: Callable[[int], int], *, window: int, capacity: int, mode: str,
                        dp_rank: int, dp_size: int, start_window: int | None,
                        num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader whose items are this rank's windows, processed and packed in the workers."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_sampler=WindowSampler(order, window, dp_rank, dp_size, start_window),
        collate_fn=PackWindow(capacity, mode),
        num_workers=num_workers,
        persistent_workers=False,
        # A window is many samples (128 MedPix tiles are 400 MB in fp32): one in flight per worker.
        prefetch_factor=1 if num_workers > 0 else None,
    )


def packing_mode(cfg: Any) -> str:
    """The effective mode of config ``cfg``: ``dataset.packing``, or ``best_fit`` when only the original
    ``dataset.enable_in_batch_packing`` is set."""
    mode = cfg.dataset.packing or "none"
    if mode == "none" and cfg.dataset.enable_in_batch_packing:
        return "best_fit"
    return mode
