"""Directory layout of nvl checkpoints (Megatron-Bridge's) and the rules that resolve a path to one.

::

    <root>/
      latest_train_state.pt              tracker (Megatron-Bridge): the train state of the latest save
      latest_checkpointed_iteration.txt  tracker for Megatron-LM tools: the iteration number as text
      iter_0000000/                      "iter_{:07d}"; appears only once complete (temp dir + rename)
        .metadata  __R_K.distcp          PyTorch DCP: logical full-shape tensors, possibly sharded
        nvl_checkpoint.json              what this directory holds (format version, states, world size)
        run_config.yaml  train_state.pt  extra_state.pt  rank_states/rank_00000.pt  tokenizer/ ...

This module imports nothing heavy: ``torch`` is only imported to read ``latest_train_state.pt``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ITER_PREFIX = "iter_"
ITER_DIGITS = 7
ITER_RE = re.compile(r"^iter_(\d{7,})$")
TRACKER_PT = "latest_train_state.pt"
TRACKER_TXT = "latest_checkpointed_iteration.txt"
DCP_METADATA = ".metadata"
MANIFEST = "nvl_checkpoint.json"
RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.pt"
EXTRA_STATE = "extra_state.pt"
RANK_STATES_DIR = "rank_states"
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was expected; the message says what was looked for and what to do."""


class CheckpointCorruptError(ValueError):
    """A checkpoint file is damaged (truncated, missing, not what its name says); one line naming the file."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened: for one-line errors that wrap a library's."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def iter_dir_name(iteration: int) -> str:
    """``iter_0000042`` for iteration 42 (seven digits, as Megatron and Megatron-Bridge write them)."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"{ITER_PREFIX}{iteration:0{ITER_DIGITS}d}"


def parse_iteration(name: str) -> int | None:
    """The iteration of an ``iter_NNNNNNN`` directory name, or ``None`` for any other name."""
    m = ITER_RE.match(name)
    return int(m.group(1)) if m else None


def is_iteration_dir(path: str | os.PathLike[str]) -> bool:
    """True for a complete iteration directory: named ``iter_N`` and holding DCP metadata."""
    p = Path(path)
    return parse_iteration(p.name) is not None and (p / DCP_METADATA).is_file()


def list_iterations(root: str | os.PathLike[str]) -> list[int]:
    """Iterations with a complete directory under ``root``, ascending (temp and old dirs are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        it = parse_iteration(child.name)
        if it is not None and (child / DCP_METADATA).is_file():
            out.append(it)
    return sorted(out)


def read_tracker(root: str | os.PathLike[str]) -> int | None:
    """The iteration the tracker of ``root`` points at, or ``None`` when there is no tracker.

    ``latest_train_state.pt`` (Megatron-Bridge) wins; ``latest_checkpointed_iteration.txt`` (Megatron-LM)
    is the fallback, so a checkpoint written by Megatron-LM tools resolves too.
    """
    root = Path(root)
    pt = root / TRACKER_PT
    if pt.is_file():
        import torch

        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt tracker must say which file is at fault, in one line
            raise CheckpointCorruptError(
                f"the tracker {pt} is damaged (not a torch file nvl can read: {type(exc).__name__}); remove it (the "
                "iteration is then read from "
                f"{TRACKER_TXT}) or give an iter_N directory"
            ) from None
        for key in ("iteration", "step"):
            if isinstance(state, dict) and key in state:
                value = state[key]
                return int(value.item() if hasattr(value, "item") else value)
        raise CheckpointCorruptError(f"the tracker {pt} holds no 'iteration' or 'step' entry; remove it or give an "
                                     "iter_N directory")
    txt = root / TRACKER_TXT
    if txt.is_file():
        text = txt.read_text().strip()
        if text == "release":
            raise CheckpointNotFoundError(
                f"{txt} says 'release' (a Megatron-LM release checkpoint); nvl reads iter_N directories only"
            )
        try:
            return int(text)
        except ValueError:
            raise CheckpointNotFoundError(f"the tracker {txt} does not hold an iteration number: {text!r}") from None
    return None


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """Resolve a checkpoint path to one complete ``iter_N`` directory.

    - an ``iter_N`` directory (with DCP metadata) is returned as is;
    - a base directory resolves through its tracker to ``<path>/iter_N``; without a tracker (a save
      that stopped between the rename and the tracker update) the newest complete ``iter_N`` wins.

    :raises CheckpointNotFoundError: with what was found and what to pass instead.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint path {p} does not exist")
    if not p.is_dir():
        raise CheckpointNotFoundError(f"checkpoint path {p} is a file; pass a checkpoint directory or one of its "
                                      "iter_N dirs")
    if parse_iteration(p.name) is not None:
        if (p / DCP_METADATA).is_file():
            return p
        raise CheckpointNotFoundError(
            f"{p} is named like an iteration directory but holds no {DCP_METADATA} (an incomplete or foreign save)"
        )
    if (p / DCP_METADATA).is_file():
        return p  # a bare DCP directory (e.g. a copied iteration dir under another name)
    tracked = read_tracker(p)
    if tracked is not None:
        cand = p / iter_dir_name(tracked)
        if is_iteration_dir(cand):
            return cand
        raise CheckpointNotFoundError(
            f"the tracker in {p} points at iteration {tracked}, but {cand} is missing or incomplete; "
            f"complete iterations present: {list_iterations(p) or 'none'}. Pass an iter_N directory explicitly."
        )
    its = list_iterations(p)
    if its:
        return p / iter_dir_name(its[-1])
    entries = sorted(c.name for c in p.iterdir())[:8]
    raise CheckpointNotFoundError(
        f"{p} is not an nvl/Megatron checkpoint: no {TRACKER_PT}, no {TRACKER_TXT} and no iter_NNNNNNN directory "
        f"(found: {entries or 'an empty directory'}). Pass the directory that `nvl convert import` or the trainer "
        "wrote, or one of its iter_N directories."
    )


def checkpoint_root(iter_dir: str | os.PathLike[str]) -> Path:
    """The base directory holding the tracker for an ``iter_N`` directory."""
    return Path(iter_dir).parent
