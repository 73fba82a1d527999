"""Two gloo ranks exercising nvlcore.checkpoint: TP=2 save -> TP=1 load, TP=1 save -> TP=2 load, DP dedup.

Run as ``python ckpt_dist_worker.py OUT_DIR``; exits non-zero (with the failing rank's traceback) on failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def full_tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "col.weight": torch.randn(8, 6, generator=g),  # split on dim 0 at TP=2
        "row.weight": torch.randn(6, 8, generator=g).to(torch.bfloat16),  # split on dim 1
        "norm.weight": torch.randn(6, generator=g),  # replicated
    }


SPLIT = {"col.weight": 0, "row.weight": 1}


def worker(rank: int, world: int, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    from nvlcore.checkpoint import open_checkpoint, save_checkpoint, shard_tensor

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = full_tensors()
        root = Path(out)
        # --- TP=2 save: each rank holds its chunk; the replicated tensor from both ranks --------
        state = {}
        for k, t in full.items():
            if k in SPLIT:
                local = t.chunk(world, dim=SPLIT[k])[rank].clone()
                state[k] = shard_tensor(local, SPLIT[k])
            else:
                state[k] = t.clone()
        opt = {"col.weight.exp_avg": shard_tensor(full["col.weight"].chunk(world, 0)[rank] * 2, 0)}
        save_checkpoint(
            root / "tp2",
            7,
            model_state=state,
            sharded_states={"optimizer": opt},
            extra_state={"scheduler": {"last_step": 7}} if rank == 0 else None,
            rank_state={"rank": rank, "seed": torch.tensor([rank])},
            train_state={"iteration": 7},
            run_config={"model": {"tensor_model_parallel_size": world}},
        )
        # --- TP=1 save (both ranks pass full tensors: DP replicas) ------------------------------
        save_checkpoint(root / "tp1", 3, model_state={k: v.clone() for k, v in full.items()})
        # --- load TP=1 checkpoint into TP=2 shards ---------------------------------------------
        ck = open_checkpoint(root / "tp1")
        tmpl = {
            k: shard_tensor(torch.zeros_like(t.chunk(world, SPLIT[k])[rank]), SPLIT[k])
            for k, t in full.items()
            if k in SPLIT
        }
        got = ck.load(tmpl)
        for k, d in got.items():
            want = full[k].chunk(world, SPLIT[k])[rank]
            assert torch.equal(d.to_local(), want), f"rank {rank}: TP=1 -> TP=2 shard of {k} differs"
        # --- load TP=2 checkpoint into TP=2 shards (optimizer state too) ------------------------
        ck2 = open_checkpoint(root / "tp2")
        got = ck2.load({"col.weight.exp_avg": shard_tensor(torch.zeros(4, 6), 0)}, state="optimizer")
        assert torch.equal(got["col.weight.exp_avg"].to_local(), full["col.weight"].chunk(world, 0)[rank] * 2)
        assert ck2.rank_state()["rank"] == rank
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    out = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, out, port), nprocs=2, join=True)


if __name__ == "__main__":
    main()
