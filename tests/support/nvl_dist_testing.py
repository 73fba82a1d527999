"""Run a function in several gloo processes on CPU: the harness for tensor/data-parallel tests.

``run_distributed(fn, world, *args)`` spawns ``world`` processes, initialises a gloo process group in
each (``MASTER_ADDR``/``MASTER_PORT`` on a free local port), calls ``fn(rank, world, *args)``, and
returns the per-rank results (anything ``torch.save`` can write). A failing rank's traceback is raised
in the caller. Megatron's ``parallel_state`` is destroyed on exit if a worker initialised it.

``fn`` must be importable by module path (``torch.multiprocessing.spawn`` pickles it by name), so put
workers in a support module (``tests/support``, ``plugins/*/tests/support``: on pytest's ``pythonpath``,
which the spawned processes inherit), not in a test file collected with pytest's importlib mode.
torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], out_dir: str, args: tuple, threads: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        except ImportError:
            pass
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes and return each rank's result, in rank order."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="nvl-dist-") as tmp:
        try:
            mp.spawn(_entry, args=(world, free_port(), fn, tmp, args, threads), nprocs=world, join=True)
        except Exception as exc:
            detail = "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in sorted(Path(tmp).glob("*.err")))
            raise RuntimeError(f"distributed worker failed:\n{detail or exc}") from exc
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
