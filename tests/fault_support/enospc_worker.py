"""Two gloo ranks save a checkpoint; rank ``failing`` (or every rank, -1) finds the disk full while writing."""

from __future__ import annotations

import errno
from typing import Any


def full_disk_save(rank: int, world: int, root: str, failing: int, where: str) -> tuple[str, str]:
    import torch
    from torch.distributed.checkpoint import FileSystemWriter

    from nvlcore.checkpoint import save as save_mod

    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}
    save_mod.save_checkpoint(root, 1, model_state=state, train_state={"iteration": 1})
    if failing in (-1, rank):
        def full(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        if where == "tensors":
            FileSystemWriter.write_data = full  # type: ignore[method-assign]
        else:
            save_mod.atomic_torch_save = full  # type: ignore[assignment]
    try:
        save_mod.save_checkpoint(root, 2, model_state=state, train_state={"iteration": 2},
                                 extra_state={"x": 1})
    except Exception as exc:  # the test compares what each rank raised
        return type(exc).__name__, str(exc)
    return "no error", ""
