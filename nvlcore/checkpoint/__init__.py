"""Megatron-style sharded checkpoints (nothing model-specific).

Layout (Megatron-Bridge's)::

    <root>/latest_train_state.pt  <root>/latest_checkpointed_iteration.txt   trackers, updated last
    <root>/iter_0000200/  .metadata __R_K.distcp (PyTorch DCP)  run_config.yaml  train_state.pt
                          extra_state.pt  rank_states/rank_00000.pt  nvl_checkpoint.json  tokenizer/

Public API:

- :func:`resolve_checkpoint_dir` (base dir -> latest ``iter_N``; an ``iter_N`` dir as is),
  :func:`list_iterations`, :func:`read_tracker`, :func:`iter_dir_name`;
- :func:`save_checkpoint` (collective; how it writes: :class:`SaveOptions`; DTensor shards via
  :func:`shard_tensor`; streamed saves via :class:`StreamedState`), :func:`write_tracker`, :func:`apply_most_recent_k`;
- :class:`Checkpoint` / :func:`open_checkpoint` / :func:`load_model_state` (full tensors or into a
  target layout), plus ``extra_state()``, ``rank_state()``, ``train_state()``, ``run_config()``;
- :func:`capture_rng_state` / :func:`restore_rng_state`;
- Megatron-Bridge's own ``torch_dist`` checkpoints: :func:`megatron_bridge_iter_dir` (detection),
  :class:`MegatronBridgeView` (read under a bridge's keys, given its :class:`MegatronBridgeNames`),
  :mod:`nvlcore.checkpoint.megatron_bridge` (the writer);
- :class:`RunLock` (one writer per run directory, :mod:`nvlcore.checkpoint.lock`);
- :func:`atomic_output_dir`, :func:`atomic_write`, :func:`atomic_torch_save` for other writers, and
  :func:`scratch_dir` for their temporary files beside the final output.

See docs/checkpoints.md. Importing this package does not import torch.
"""

from __future__ import annotations

from nvlcore.checkpoint.atomic import (
    OutputExistsError,
    atomic_output_dir,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    check_can_write,
    scratch_dir,
)
from nvlcore.checkpoint.layout import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    is_iteration_dir,
    iter_dir_name,
    list_iterations,
    parse_iteration,
    read_tracker,
    resolve_checkpoint_dir,
)
from nvlcore.checkpoint.load import Checkpoint, CheckpointKeyError, load_model_state, open_checkpoint
from nvlcore.checkpoint.lock import RunDirectoryLocked, RunLock
from nvlcore.checkpoint.megatron_bridge import (
    MegatronBridgeError,
    MegatronBridgeNames,
    MegatronBridgeView,
    megatron_bridge_iter_dir,
)
from nvlcore.checkpoint.rng import capture_rng_state, restore_rng_state
from nvlcore.checkpoint.save import (
    CheckpointSaveError,
    PendingSave,
    SaveOptions,
    StreamedState,
    TensorSpec,
    apply_most_recent_k,
    save_checkpoint,
    shard_tensor,
    write_tracker,
)

__all__ = [
    "Checkpoint",
    "CheckpointKeyError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "MegatronBridgeError",
    "MegatronBridgeNames",
    "MegatronBridgeView",
    "OutputExistsError",
    "PendingSave",
    "RunDirectoryLocked",
    "RunLock",
    "SaveOptions",
    "StreamedState",
    "TensorSpec",
    "apply_most_recent_k",
    "atomic_output_dir",
    "CheckpointCorruptError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "capture_rng_state",
    "check_can_write",
    "is_iteration_dir",
    "iter_dir_name",
    "list_iterations",
    "load_model_state",
    "megatron_bridge_iter_dir",
    "open_checkpoint",
    "parse_iteration",
    "read_tracker",
    "resolve_checkpoint_dir",
    "restore_rng_state",
    "scratch_dir",
    "save_checkpoint",
    "shard_tensor",
    "write_tracker",
]
