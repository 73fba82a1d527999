"""Training data: a checkpointable, deterministic, cyclic shuffled stream sharded over data-parallel ranks.

The *global* stream of samples does not depend on how many ranks consume it: epoch ``e`` is a
permutation of the dataset drawn from ``seed + e``, epochs follow each other without a gap, and
global batch ``i`` is positions ``[i * GBS, (i + 1) * GBS)`` of that stream. Data-parallel rank ``r``
takes the ``r``-th contiguous slice of each global batch and cuts it into micro-batches. So a run on
one process and a run on two see the same global batches (the losses match), and the position to
resume from is one integer, ``consumed_samples``.

Each sample is processed with Python's and NumPy's RNG seeded from ``(seed, stream position)``, so
a processor that draws random numbers gives the same result in any DataLoader worker and after a
resume.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

    from nvlcore.contracts import MadeDataset, Processor


@attrs.define
class GlobalBatchSampler:
    """Yields, for one DP rank, the micro-batches of each global batch as lists of ``(position, index)``.

    :param num_samples: dataset length.
    :param global_batch_size: samples per optimizer update over all DP ranks.
    :param micro_batch_size: samples per forward/backward on one rank.
    :param dp_rank: this rank's index in the data-parallel group.
    :param dp_size: data-parallel size.
    :param seed: shuffling seed (``rng.seed``).
    :param consumed_samples: stream position to start from (``train_state.consumed_samples``).
    :param shuffle: ``False`` reads the dataset in order (validation).
    """

    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    consumed_samples: int = 0
    shuffle: bool = True
    _perm_epoch: int = attrs.field(default=-1, init=False, repr=False)
    _perm: Any = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError("the dataset is empty: the maker returned 0 examples for this split")
        per_rank, rem = divmod(self.global_batch_size, self.dp_size)
        if rem or per_rank % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size}) x data-parallel size ({self.dp_size})"
            )

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per rank per global batch (the gradient-accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def index_at(self, position: int) -> int:
        """Dataset index at a stream position."""
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            import torch

            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pos = self.consumed_samples
        per_rank = self.global_batch_size // self.dp_size
        while True:
            start = pos + self.dp_rank * per_rank
            for m in range(self.num_microbatches):
                first = start + m * self.micro_batch_size
                yield [(p, self.index_at(p)) for p in range(first, first + self.micro_batch_size)]
            pos += self.global_batch_size


class ProcessedDataset:
    """Maps ``(position, index)`` to one processed sample: ``processor(made[index])``.

    Errors name the split and the row, so a bad example can be found in the source data.
    """

    def __init__(self, made: MadeDataset, processor: Processor, *, seed: int, split: str = "train",
                 process_options: dict[str, Any] | None = None) -> None:
        self.made = made
        self.processor = processor
        self.seed = seed
        self.split = split
        self.process_options = dict(process_options or {})

    def __len__(self) -> int:
        return len(self.made)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        import numpy as np

        position, index = key
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed((self.seed * 1_000_003 + position) & 0xFFFFFFFF)
        np.random.seed((self.seed * 7_919 + position) & 0xFFFFFFFF)
        try:
            try:
                conversation = self.made[index]
            except Exception as exc:
                raise RuntimeError(f"dataset split {self.split!r}, row {index}: the maker failed: {exc}") from exc
            try:
                return self.processor(conversation, **self.process_options)
            except Exception as exc:
                raise RuntimeError(f"dataset split {self.split!r}, row {index}: the processor failed: {exc}") from exc
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def build_loader(
    dataset: ProcessedDataset,
    sampler: GlobalBatchSampler,
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``sampler``'s micro-batches, collated by the bridge's processor.

    ``persistent_workers`` (``dataset.persistent_workers``, with ``num_workers > 0``) keeps the worker
    processes between iterations of the loader (each validation re-iterates the same loader).
    """
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
