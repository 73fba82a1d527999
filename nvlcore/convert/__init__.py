"""HF <-> nvl checkpoint conversion (model-agnostic): streaming safetensors I/O and the engine.

A bridge supplies :class:`ConversionGroup` s (``conversion_groups(hf_specs)``) and
``check_tensor_parallel(tp)``; :func:`import_hf_checkpoint` / :func:`export_hf_checkpoint` do the rest.
Importing this package does not import torch. See docs/convert.md.
"""

from __future__ import annotations

from nvlcore.convert.plan import ConversionGroup

__all__ = ["ConversionGroup", "export_hf_checkpoint", "import_hf_checkpoint"]


def __getattr__(name: str):  # lazy: the engine imports torch-facing modules
    if name in ("import_hf_checkpoint", "export_hf_checkpoint", "ConversionError", "ConversionSummary",
                "iter_hf_to_checkpoint", "iter_checkpoint_to_hf"):
        from nvlcore.convert import engine

        return getattr(engine, name)
    raise AttributeError(name)
