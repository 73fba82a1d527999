"""LoRA settings (the ``peft`` config section when ``peft.method=lora``).

Field names follow Megatron-Bridge's ``LoRA``/``VLMLoRA`` dataclasses (``dim``, ``alpha``,
``target_modules``, ...) so a ``run_config.yaml`` reads the same; ``rank`` is accepted as an alias
of ``dim``. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

#: Megatron-Bridge's default targets: attention QKV and output projection, MLP fc1/fc2 (in the LM,
#: the ViT and the projector). The 28 Mamba mixers of Nemotron-H get no adapters unless asked for.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
#: Mamba mixer projections, available on request (``peft.target_modules=[...,in_proj,out_proj]``).
MAMBA_TARGET_MODULES: tuple[str, ...] = ("in_proj", "out_proj")

_INITS = ("xavier", "kaiming", "zero", "normal")


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v) for v in value)


@attrs.frozen
class LoRAConfig:
    """Settings of one LoRA application.

    :param target_modules: patterns selecting the linear layers to adapt. A pattern matches a module
        when it equals the module's short name (``linear_qkv``) or when the module's full dotted name
        matches it as a glob where ``*`` is any run of characters, anchored at both ends
        (``*language_model*.linear_qkv``). Everything else in a pattern is literal.
    :param exclude_modules: patterns of modules never adapted. With ``target_modules`` empty, every
        linear layer except these is adapted (Megatron-Bridge's exclusive alternative).
    :param dim: the rank ``r``.
    :param alpha: the scale numerator; the adapter output is multiplied by ``alpha / dim``.
    :param dropout: dropout probability on the adapter input.
    :param dropout_position: ``pre`` (on the adapter input) is the only position supported.
    :param lora_A_init_method: ``xavier`` (uniform, Megatron-Bridge's default) or ``kaiming``
        (uniform with a=sqrt(5), like ``nn.Linear`` and the ``peft`` library).
    :param lora_B_init_method: ``zero`` (so a fresh adapter leaves the model unchanged) or ``normal``.
    :param lora_dtype: adapter dtype (``float32``, ``bfloat16``, ``float16``); ``None`` = the base
        weight's dtype.
    :param seed: the seed of the adapter initialisation. Each adapter's A is drawn from a generator
        seeded with this and the module's name over the full logical shape, then sliced for its
        tensor-parallel rank, so the adapters do not depend on the TP size or on the global RNG.
    :param base_dtype: how the frozen base's linear weights are stored during training: ``None`` (the
        compute dtype, as plain LoRA) or ``"nf4"`` (QLoRA: 4-bit NormalFloat through torchao, see
        :mod:`nvl_lora.qlora`). Checkpoints, merge and generation use the base as loaded.
    :param freeze_language_model: freeze the base language model (``language_model.*``).
    :param freeze_vision_model: freeze the base vision model (``vision_model.*``).
    :param freeze_vision_projection: freeze the base projector (``vision_projection.*``).
    :param freeze_other: freeze base parameters outside those three submodules (a model that has
        none of them, for instance a plain LM, is frozen entirely with the default).
    """

    target_modules: tuple[str, ...] = attrs.field(default=DEFAULT_TARGET_MODULES, converter=_as_tuple)
    exclude_modules: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)
    dim: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: str | None = None
    seed: int = 1234
    base_dtype: str | None = None
    freeze_language_model: bool = True
    freeze_vision_model: bool = True
    freeze_vision_projection: bool = True
    freeze_other: bool = True

    def __attrs_post_init__(self) -> None:
        if not self.target_modules and not self.exclude_modules:
            raise ValueError(
                "peft.target_modules is empty: name at least one module (e.g. linear_qkv), or give "
                "peft.exclude_modules to adapt every linear layer except those"
            )
        if int(self.dim) < 1:
            raise ValueError(f"peft.dim (the LoRA rank) must be >= 1, got {self.dim}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.dropout_position != "pre":
            raise ValueError(f"peft.dropout_position={self.dropout_position!r} is not supported; use 'pre'")
        if self.lora_A_init_method not in ("xavier", "kaiming"):
            raise ValueError(f"peft.lora_A_init_method must be 'xavier' or 'kaiming', got {self.lora_A_init_method!r}")
        if self.lora_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"peft.lora_dtype must be float32, bfloat16, float16 or null, got {self.lora_dtype!r}")
        if self.base_dtype not in (None, "nf4"):
            raise ValueError(f"peft.base_dtype must be nf4 or null (the compute dtype), got {self.base_dtype!r}")
        if self.lora_B_init_method not in ("zero", "normal"):
            raise ValueError(f"peft.lora_B_init_method must be 'zero' or 'normal', got {self.lora_B_init_method!r}")

    @property
    def scale(self) -> float:
        """``alpha / dim``, the factor on the adapter's output."""
        return float(self.alpha) / int(self.dim)

    @property
    def torch_dtype(self) -> Any:
        """``lora_dtype`` as a torch dtype (``None`` = follow the base weight)."""
        if self.lora_dtype is None:
            return None
        import torch

        return getattr(torch, self.lora_dtype)

    @property
    def freeze_flags(self) -> dict[str, bool]:
        return {
            "freeze_language_model": self.freeze_language_model,
            "freeze_vision_model": self.freeze_vision_model,
            "freeze_vision_projection": self.freeze_vision_projection,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``run_config.yaml`` (``method`` included so a reader can pick the class)."""
        out: dict[str, Any] = {"method": "lora"}
        for f in attrs.fields(LoRAConfig):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str = "peft") -> LoRAConfig:
        """Build from a config section, ignoring keys that belong to other methods or to the core.

        ``rank`` is accepted for ``dim``; ``_target_`` (Megatron-Bridge) and ``method`` are ignored.
        Unknown keys that look like LoRA settings are an error naming them.
        """
        data = dict(data or {})
        if "rank" in data:
            if "dim" in data and data["dim"] != data["rank"]:
                raise ValueError(f"{where}: both dim={data['dim']} and rank={data['rank']} given; use one")
            data["dim"] = data.pop("rank")
        known = {f.name for f in attrs.fields(cls)}
        ignorable = {"method", "_target_", "enabled", "name", "peft_scheme"}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in ignorable and value is not None:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"{where}: unknown LoRA setting(s) {sorted(unknown)}; known: {sorted(known | {'rank'})}"
            )
        for key in ("dim", "seed"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        for key in ("alpha", "dropout"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)
