"""The ``dora`` PEFT method: DoRA (weight-decomposed low-rank adaptation), Megatron-Bridge's
``peft_scheme="dora"``.

Same settings, targets, freezing and workflow flags as ``lora`` (``peft.method=dora`` with
``--lora-on-language-model`` / ``--lora-on-vision-model``); each adapted layer also learns a magnitude
per output row (see :class:`nvl_lora.layers.DoRAAdapter`). The recipe's DoRA is ``DoRA(dim=16,
alpha=32)`` on the same targets; dropout is not supported (the recipe has none).
"""

from __future__ import annotations

from typing import Any

import attrs

from nvl_lora.config import LoRAConfig
from nvl_lora.method import LoRAMethod


@attrs.frozen
class DoRAConfig(LoRAConfig):
    """:class:`nvl_lora.config.LoRAConfig`'s fields; ``dropout`` must be 0."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if float(self.dropout) != 0.0:
            raise ValueError(f"peft.dropout={self.dropout}: DoRA supports no dropout here; set peft.dropout=0.0")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "method": "dora"}


class DoRAMethod(LoRAMethod):
    """The registered ``dora`` method (aliases ``DoRA``): :class:`LoRAMethod` with DoRA adapters."""

    name = "dora"
    Config = DoRAConfig
    dora = True
