"""Process groups and launching: tensor parallel x data parallel over ``torch.distributed``.

The layout is Megatron-Core's (``parallel_state.initialize_model_parallel``): consecutive ranks form
a tensor-parallel group, and the ranks holding the same tensor-parallel shard form a data-parallel
group. gloo is used on CPU, NCCL on GPUs.

A single process (no ``torchrun`` environment) still gets a one-rank process group, so the model's
Megatron layers and the trainer's collectives run the same code at every size.

This module is the one place that sets process groups up: the trainer, ``nvl eval`` and model
plugins (building a model, loading a generator, tests, benchmarks) all call :func:`init_parallel`,
and models are built over a :class:`TPContext`.

:func:`launch` starts ``nproc_per_node`` copies of a module through ``torch.distributed.run`` (the
library behind ``torchrun``), with torchrun's own rendezvous options for several machines.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

#: Environment variables that torchrun (or any launcher following its protocol) sets in each worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@attrs.frozen
class TPContext:
    """The tensor-parallel group a model is built over: the group, its size and this process's rank in it.

    Models take one (:meth:`current` for the groups :func:`init_parallel` set up, :meth:`of` for a
    given group) instead of reading global state in every layer.
    """

    group: Any
    size: int
    rank: int

    @classmethod
    def of(cls, group: Any) -> TPContext:
        return cls(group=group, size=group.size(), rank=group.rank())

    @classmethod
    def current(cls) -> TPContext:
        """Megatron's tensor-parallel group, as :func:`init_parallel` set it up."""
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("no tensor-parallel group is set up; call nvlcore.parallel.init_parallel first")
        return cls.of(parallel_state.get_tensor_model_parallel_group())


@attrs.frozen
class ParallelContext:
    """Where this process sits in the TP x DP layout.

    :param rank: global rank.
    :param world_size: number of processes.
    :param local_rank: rank on this machine (selects the GPU).
    :param tp_size: tensor-parallel size.
    :param tp_rank: rank inside the tensor-parallel group.
    :param dp_size: data-parallel size (``world_size // tp_size``).
    :param dp_rank: rank inside the data-parallel group.
    :param device: the device this rank computes on.
    :param backend: ``gloo`` or ``nccl``.
    :param owns_process_group: this module created the default process group (and destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: str
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: prints, logs and writes files shared by all ranks."""
        return self.rank == 0

    @property
    def tp_group(self) -> Any:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    @property
    def tp(self) -> TPContext:
        """This process's tensor-parallel group, as models take it."""
        return TPContext.of(self.tp_group)

    @property
    def dp_group(self) -> Any:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def dp_group_gloo(self) -> Any:
        """A gloo group over the same ranks, for Python objects and CPU tensors on GPU runs."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group_gloo()


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    """True when this process is one worker of a ``torchrun`` (or compatible) launch."""
    env = dict(os.environ if env is None else env)
    return "WORLD_SIZE" in env and "RANK" in env


def node_rank(env: dict[str, str] | None = None) -> int:
    """This machine's rank in a torchrun launch (``GROUP_RANK``, which the rendezvous assigns), 0 outside one."""
    env = dict(os.environ if env is None else env)
    return int(env.get("GROUP_RANK", "0") or 0)


def spans_nodes(env: dict[str, str] | None = None) -> bool:
    """Whether this launch has more processes (``WORLD_SIZE``) than this machine runs (``LOCAL_WORLD_SIZE``)."""
    env = dict(os.environ if env is None else env)
    world = int(env.get("WORLD_SIZE", "1") or 1)
    return int(env.get("LOCAL_WORLD_SIZE", world) or world) < world


def node_prefix(env: dict[str, str] | None = None) -> str:
    """``[node N] `` before the lines a worker prints when the launch spans several machines, else ``""``:
    the logs of all nodes gathered in one place (Slurm's one output file) still say where each line came from."""
    return f"[node {node_rank(env)}] " if spans_nodes(env) else ""


def die_with_parent(*, grace_s: float | None = None) -> None:
    """Make this worker stop when the process that started it dies (a ``kill -9`` of the launcher).

    On Linux the kernel sends SIGTERM the moment the parent exits (``prctl(PR_SET_PDEATHSIG)``); a
    watchdog thread that polls the parent pid does the same elsewhere, and after a parent-pid change
    also gives the worker ``grace_s`` seconds (``NVL_ORPHAN_GRACE_S``, default 30) to stop on its own:
    the trainer saves a checkpoint at the next iteration boundary on SIGTERM, then exits. A worker still
    alive after that (stuck in a collective whose peer is gone) exits at once with status 143.
    """
    import signal
    import threading
    import time

    parent = os.getppid()
    if grace_s is None:
        grace_s = float(os.environ.get("NVL_ORPHAN_GRACE_S", "30"))
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog below still works
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except OSError:
            pass
        time.sleep(grace_s)
        print(f"nvl: worker {os.getpid()}: the launcher (pid {parent}) died and this worker did not stop within "
              f"{grace_s:.0f} s; exiting", file=sys.stderr, flush=True)
        os._exit(143)

    threading.Thread(target=watch, name="nvl-parent-watchdog", daemon=True).start()


def default_device_type() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (``NVL_DEVICE`` overrides)."""
    forced = os.environ.get("NVL_DEVICE")
    if forced:
        if forced not in ("cpu", "cuda"):
            raise ValueError(f"NVL_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def init_parallel(
    tensor_model_parallel_size: int = 1,
    *,
    device_type: str | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    backend: str | None = None,
) -> ParallelContext:
    """Initialise ``torch.distributed`` (if needed) and Megatron-Core's TP/DP groups.

    :param tensor_model_parallel_size: ranks that share one copy of the model (``model.tensor_model_parallel_size``).
    :param device_type: ``cpu`` or ``cuda``; default: :func:`default_device_type`.
    :param seed: seeds Megatron's CUDA RNG tracker (model-parallel regions draw different numbers per
        TP rank, the rest the same), which Megatron layers need to initialise weights on a GPU.
    :param timeout_minutes: collective timeout.
    :param backend: ``nccl`` or ``gloo`` (``dist.distributed_backend``); default: nccl on GPUs, gloo on CPU.
    :raises ValueError: when the world size is not a multiple of the tensor-parallel size.
    """
    import torch
    import torch.distributed as dist

    from nvlcore.megatron_import import import_megatron_core

    import_megatron_core()
    from megatron.core import parallel_state

    device_type = device_type or default_device_type()
    if backend is None:
        backend = "nccl" if device_type == "cuda" else "gloo"
    elif backend not in ("nccl", "gloo"):
        raise ValueError(f"dist.distributed_backend={backend!r}: choose nccl or gloo")
    elif backend == "nccl" and device_type != "cuda":
        raise ValueError(f"dist.distributed_backend=nccl needs GPUs but this run is on {device_type}; "
                         "use gloo or leave it null")
    env = os.environ
    owns = False
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(env.get("LOCAL_RANK", 0))
        backend = str(dist.get_backend())  # the caller's process group decides
    elif launched_by_torchrun():
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        owns = True
    else:
        # One process: an in-memory store is enough and needs no free port.
        rank, world, local_rank = 0, 1, 0
        if device_type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        owns = True

    tp = int(tensor_model_parallel_size)
    if tp < 1 or world % tp != 0:
        raise ValueError(tensor_parallel_mismatch(tp, world))
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError(
                "process groups are already initialised with tensor-parallel size "
                f"{parallel_state.get_tensor_model_parallel_world_size()}, not {tp}; call destroy_parallel() first"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, distributed_timeout_minutes=timeout_minutes,
        )
    if device_type == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    return ParallelContext(
        rank=rank, world_size=world, local_rank=local_rank,
        tp_size=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(), dp_rank=parallel_state.get_data_parallel_rank(),
        device=device, backend=backend, owns_process_group=owns,
    )


def tensor_parallel_mismatch(tp: int, world: int, *, gpus: int | None = None) -> str:
    """One line for a tensor-parallel size that does not divide the process count, naming what runs here.

    :param gpus: GPUs on this machine (default: ``torch.cuda.device_count()``, 0 without CUDA).
    """
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    import math

    fits = math.gcd(tp, world)  # divides the recipe's TP too, so the model's head counts still split
    keep = f"model.tensor_model_parallel_size={fits} (keeps {world} process(es))"
    if gpus >= tp > 0:
        run = f"--nproc-per-node {gpus // tp * tp} (this machine has {gpus} GPU(s)) or {keep}"
    elif gpus:
        run = f"{keep}; this machine has {gpus} GPU(s), fewer than {tp}"
    else:
        run = f"{keep}, or --nproc-per-node {tp} (CPU processes; no GPU here)"
    return (f"model.tensor_model_parallel_size={tp} does not divide the number of processes ({world}); "
            f"to run on this machine use {run}")


def destroy_parallel(ctx: ParallelContext | None = None) -> None:
    """Tear down Megatron's groups, and the default group when :func:`init_parallel` created it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and (ctx is None or ctx.owns_process_group):
        dist.destroy_process_group()


@contextlib.contextmanager
def owned_process_groups() -> Iterator[None]:
    """Tear down, on the way out, the process groups set up inside the block (a command's own: PyTorch
    warns at exit about a default group never destroyed); groups that existed before (a test's, a
    notebook's) are left alone."""
    import torch.distributed as dist

    had = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not had and dist.is_available() and dist.is_initialized():
            destroy_parallel()


def build_launch_args(
    *,
    nproc_per_node: int,
    module: str,
    module_args: Sequence[str],
    nnodes: str = "1",
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_backend: str | None = None,
    rdzv_id: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_conf: str | None = None,
    max_restarts: int | None = None,
) -> list[str]:
    """The ``torch.distributed.run`` argument list for one machine's share of a launch.

    One machine with no rendezvous options uses ``--standalone`` (torchrun picks a free port).
    ``rdzv_conf`` (``join_timeout=600,read_timeout=60``) and ``max_restarts`` are torchrun's own.
    """
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    args = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes)]
    multi = str(nnodes) not in ("1", "1:1") or rdzv_endpoint or master_addr
    if not multi:
        args.append("--standalone")
    if node_rank is not None:
        args += ["--node-rank", str(node_rank)]
    if rdzv_endpoint:
        args += ["--rdzv-endpoint", rdzv_endpoint, "--rdzv-backend", rdzv_backend or "c10d"]
    elif rdzv_backend:
        args += ["--rdzv-backend", rdzv_backend]
    if rdzv_id:
        args += ["--rdzv-id", rdzv_id]
    if master_addr:
        args += ["--master-addr", master_addr]
    if master_port is not None:
        args += ["--master-port", str(master_port)]
    if rdzv_conf:
        args += ["--rdzv-conf", rdzv_conf]
    if max_restarts is not None:
        if max_restarts < 0:
            raise ValueError(f"--max-restarts must be at least 0, got {max_restarts}")
        args += ["--max-restarts", str(max_restarts)]
    return args + ["-m", module, *module_args]


def describe_rendezvous_failure(exc: BaseException, args: Any) -> str:
    """One line for a rendezvous that failed (timed out, unreachable, closed), naming the endpoint.

    :param args: torchrun's parsed arguments (``rdzv_endpoint``, ``rdzv_id``, ``nnodes``, ``rdzv_conf``).
    """
    from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousTimeoutError

    endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
    where = f"the rendezvous at {endpoint} (--rdzv-id {args.rdzv_id}, --nnodes {args.nnodes})"
    conf = dict(kv.split("=", 1) for kv in (args.rdzv_conf or "").split(",") if "=" in kv)
    if isinstance(exc, RendezvousTimeoutError):
        waited = conf.get("join_timeout", "600")
        return (f"{where} timed out after {waited} s: not every node joined; start `nvl finetune` on every node "
                "with the same --rdzv-endpoint, --rdzv-id and --nnodes, or wait longer with --rdzv-conf "
                "join_timeout=SECONDS")
    if isinstance(exc, RendezvousClosedError):
        return f"{where} was closed by another node (it finished or failed); start a new job with a new --rdzv-id"
    cause = exc.__cause__ or exc
    said = (str(cause).strip().splitlines() or [""])[0][:120]
    return (f"cannot reach {where} ({type(cause).__name__}: {said}); check that HOST:PORT is node "
            "0's address and port, that the port is open between the nodes, and that node 0 has started "
            "(--rdzv-conf read_timeout=SECONDS waits longer)")


def launch(launch_args: Sequence[str]) -> int:
    """Run ``torch.distributed.run`` in this process (it spawns and supervises the workers).

    :returns: 0 when every worker succeeded, 128 + the signal number when stopped by SIGTERM/SIGINT,
        75 (:data:`nvlcore.interrupt.EXIT_STOPPED_EARLY`) when every worker stopped early after saving,
        else 1 (the workers print their own tracebacks).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(list(launch_args))
    if args.max_restarts > 0:
        # restarted workers must not share the rendezvous store of the attempt they replace: its keys (gloo's
        # and NCCL's peer addresses) would send them to dead peers (pytorch/pytorch#135712); a store per attempt
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)
    except RendezvousError as exc:  # a node that never arrives, an endpoint nobody serves: one line, not a hang
        print(f"nvl: {describe_rendezvous_failure(exc, args)}", file=sys.stderr)
        return 1
    except SignalException as exc:
        # torchrun has passed the signal on to the workers and waited for them (they save at the next
        # iteration boundary); exit as a process killed by that signal would.
        print(f"nvl: stopped by signal {exc.sigval.name if hasattr(exc.sigval, 'name') else exc.sigval}; "
              "the workers were told to stop", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        failures = getattr(exc, "failures", {}) or {}
        from nvlcore.interrupt import EXIT_STOPPED_EARLY

        codes = [getattr(f, "exitcode", None) for f in failures.values()]
        # the launcher stops the other workers when the first exits; those show as killed by a signal
        if EXIT_STOPPED_EARLY in codes and all(c == EXIT_STOPPED_EARLY or (c is not None and c < 0) for c in codes):
            print("nvl: the workers stopped early and saved a checkpoint", file=sys.stderr)
            return EXIT_STOPPED_EARLY
        ranks = ", ".join(str(r) for r in sorted(failures)) or "?"
        print(f"nvl: worker(s) {ranks} failed (exit codes above); see their tracebacks", file=sys.stderr)
        return 1
    return 0
