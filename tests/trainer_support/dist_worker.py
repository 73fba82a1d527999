"""Worker for two-process (gloo) trainer tests: one run of the tiny model per rank, see test_config_keys.py.

Imported by module name in the spawned processes (``nvl_dist_testing.run_distributed``), so it
lives next to ``tiny_plugin`` on the path the test puts first.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def train(rank: int, world: int, hf: str, overrides: list[str]) -> list[str]:
    """Train the tiny model as ``run_finetune`` does on every rank; returns rank 0's printed lines."""
    import tiny_plugin
    from run_tiny import DEFAULTS

    from nvlcore.config import load_config, resolve_config
    from nvlcore.training.finetune import run_finetune

    manager = tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           *overrides], plugins=manager)
    resolve_config(cfg)
    lines: list[str] = []
    run_finetune(cfg, manager=manager, device_type="cpu", print_fn=lines.append)
    return lines


def save_replicated(rank: int, world: int, out: str, spread: bool) -> None:
    """Every rank passes the same two 40 kB tensors (replicas, as data-parallel ranks do)."""
    import torch

    from nvlcore.checkpoint import SaveOptions, save_checkpoint

    state = {"a": torch.arange(10_000, dtype=torch.float32), "b": torch.ones(10_000)}
    save_checkpoint(out, 1, model_state=state, options=SaveOptions(spread_replicated_writes=spread))
