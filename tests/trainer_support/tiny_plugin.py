"""A tiny model bridge + dataset maker that follow nvl's contracts, for trainer tests.

The model is real tensor-parallel code (Megatron ``VocabParallelEmbedding``, ``ColumnParallelLinear``,
``RowParallelLinear``, vocab-parallel cross-entropy), so TP=2 tests exercise the same collectives as
the real bridge; it is small enough for many iterations per second on one CPU core.

"HF directory": ``config.json`` (``architectures: ["TinyVLM"]``) + ``model.safetensors`` with full
tensors under the training parameter names; each TP rank loads its slice.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

from nvlcore.hookspecs import hookimpl

# The bridge, processor, model and maker are the installable example's (docs/examples/nvl-bridge-example):
# the tests train the same code that the plugin-author guide shows.
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "nvl-bridge-example"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from nvl_bridge_example import (  # noqa: E402,F401  (re-exported for the tests)
    IMAGE_ID,
    PATCH,
    VOCAB,
    TinyBridge,
    TinyMaker,
    TinyProcessor,
    init_full,
    make_model,
    write_tiny_hf_dir,
)


class TinyTrainOnly(TinyMaker):
    splits: ClassVar[tuple[str, ...]] = ("train",)


class TinyWithTest(TinyMaker):
    """``tiny_with_test``: ``tiny_copy`` with a test split too."""

    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")


@hookimpl
def nvl_register_model_bridges(register: Any) -> None:
    register("tiny_vlm", TinyBridge)


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register("tiny_copy", TinyMaker)
    register("tiny_train_only", TinyTrainOnly)
    register("tiny_with_test", TinyWithTest)


def manager() -> Any:
    """A plugin manager with the built-ins, the installed plugins and this module."""
    from nvlcore.plugins import NvlPluginManager

    return NvlPluginManager(plugins=[("tiny_plugin", sys.modules[__name__])])
