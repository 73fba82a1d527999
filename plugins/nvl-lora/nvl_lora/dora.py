"""The ``dora`` PEFT method: DoRA (weight-decomposed low-rank adaptation), Megatron-Bridge's
``peft_scheme="dora"``, as a variant of LoRA's layer (:class:`DoRAVariant`).

Same settings, targets, freezing and workflow flags as ``lora`` (``peft.method=dora`` with
``--lora-on-language-model`` / ``--lora-on-vision-model``); each adapted layer also learns a magnitude
per output row. The recipe's DoRA is ``DoRA(dim=16, alpha=32)`` on the same targets; dropout is not
supported (the recipe has none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from nvl_lora.config import LoRAConfig
from nvl_lora.layers import LoRAVariant
from nvl_lora.method import LoRAMethod

if TYPE_CHECKING:
    import torch
    from torch import nn

    from nvl_lora.layers import LoRAAdapter


class DoRAVariant(LoRAVariant):
    """DoRA (Liu et al. 2024): LoRA's ``B @ A`` plus a magnitude per output row.

    The adapted layer computes ``y = m / ||W + s·B·A||_row ⊙ (W x + s·B·A x) + bias`` where the row norm
    is detached (no gradient flows through it, as in the paper §4.3, the ``peft`` library and
    Megatron-Bridge). At initialisation ``m = ||W + s·B·A||_row`` (= ``||W||`` with B = 0), so a fresh
    adapter leaves the layer unchanged. Merging gives ``W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A)``.

    ``magnitude`` (``adapter.magnitude.weight``, held as ``[out, 1]`` so that it takes the weight
    mapping's row layout exactly like B) is split like the base's output rows for a column-parallel
    base, per component for a fused one (Mamba ``in_proj``), and replicated for a row-parallel base.
    The row norm of a column-parallel base is local (each rank has whole rows); a row-parallel base
    splits each row over the TP ranks, so the squared norms are summed with an all-reduce over the
    TP group (every rank merges, so every rank makes the same collectives). In eval mode the local
    squared norms are cached on the adapter until a weight changes (generation computes ``B·A`` once).
    """

    name = "dora"

    def check(self, adapter: LoRAAdapter) -> None:
        from torch import nn

        if adapter.kind == "column" and adapter.gather_output and adapter.tp_size > 1:
            raise NotImplementedError("DoRA on a column-parallel layer that gathers its output is not supported")
        if isinstance(adapter.dropout, nn.Dropout):
            raise ValueError("DoRA with dropout is not supported (the recipe uses peft.dropout=0.0); "
                             "set peft.dropout=0")
        adapter.__dict__["_norm_cache"] = None

    def init(self, adapter: LoRAAdapter, weight: torch.Tensor) -> None:
        from nvl_lora.layers import Weight, split_like

        ref = adapter.linear_out.matrix()
        rows = ref.shape[0]
        local = None
        if adapter.linear_out.components is not None:
            local = [(c, adapter.linear_out.weight[c].shape[0]) for c in adapter.linear_out.components]
        import torch

        adapter.magnitude = Weight(torch.ones(rows, 1, dtype=ref.dtype, device=ref.device), local)
        if adapter.kind == "column" and adapter.tp_size > 1:
            from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

            for _, p in adapter.magnitude.params():
                set_tensor_model_parallel_attributes(p, True, 0, 1)
        norms = self.weight_norm(adapter, weight)
        for (_, p), part in zip(adapter.magnitude.params(), split_like(norms, adapter.magnitude), strict=True):
            p.copy_(part.reshape(p.shape).to(p.dtype))

    def params(self, adapter: LoRAAdapter) -> list[tuple[str, nn.Parameter, int | None]]:
        """``magnitude.weight`` (or ``magnitude.weight.<component>``), split like B."""
        m_dim = 0 if adapter.kind == "column" else None
        return [(f"magnitude.{n}", p, m_dim) for n, p in adapter.magnitude.params()]

    def full_shape(self, adapter: LoRAAdapter, rel_name: str) -> tuple[int, int] | None:
        if not rel_name.startswith("magnitude"):
            return None
        comp = rel_name.split(".")[-1] if rel_name.count(".") == 2 else None
        if comp is not None and adapter.row_components:
            return (dict(adapter.row_components)[comp], 1)
        return (adapter.out_features, 1)

    def weight_norm(self, adapter: LoRAAdapter, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s·B·A||`` per local output row, fp32, detached (all-reduced over TP for a row base).

        The local squared row sums are cached in eval mode (keyed on the tensors' versions); the
        all-reduce of a row-parallel base runs on every call, so every rank makes the same
        collectives whatever its cache holds.
        """
        import torch

        with torch.no_grad():
            squared = self._squared_norms(adapter, weight)
            if adapter.kind == "row" and adapter.tp_size > 1:
                squared = squared.clone()
                torch.distributed.all_reduce(squared, group=adapter.tp_group)
            return squared.sqrt()

    @staticmethod
    def _squared_norms(adapter: LoRAAdapter, weight: torch.Tensor) -> torch.Tensor:
        import torch

        key = None
        if not adapter.training:
            try:
                key = tuple((p.data_ptr(), p._version) for p in [weight, *(p for _, p, _ in adapter.lora_params())])
            except RuntimeError:  # inference tensors have no version counter: do not cache
                key = None
            cached = adapter.__dict__.get("_norm_cache")
            if key is not None and cached is not None and cached[0] == key:
                return cached[1]
        # .to(dtype), not .float(): a quantised base (QLoRA's NF4Tensor) dequantises only through .to
        combined = weight.to(torch.float32) + adapter.delta_weight().to(weight.device)
        squared = combined.square().sum(dim=1)
        adapter.__dict__["_norm_cache"] = (key, squared) if key is not None else None
        return squared

    def magnitude_scale(self, adapter: LoRAAdapter, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s·B·A||_row`` (fp32), the factor on each output row; differentiable in ``m``."""
        return adapter.magnitude.matrix()[:, 0].float() / self.weight_norm(adapter, weight)

    def output(self, module: nn.Module, adapter: LoRAAdapter, output: Any, delta: torch.Tensor) -> Any:
        """``m/||V|| ⊙ (W x + s·B·A x) + bias`` from the base's output (which may or may not include the bias)."""
        scale = self.magnitude_scale(adapter, module.weight)
        if isinstance(output, tuple):
            y, bias = output[0], output[1]
            if bias is None:  # the bias (if any) was added inside
                out = _scaled(y, delta, scale, getattr(module, "bias", None))
            else:  # skip_bias_add: the bias comes back separately and stays so
                out = _scaled(y, delta, scale, None)
            return (out, *output[1:])
        return _scaled(output, delta, scale, getattr(module, "bias", None))

    def merged_weight(self, adapter: LoRAAdapter, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        import torch

        scale = self.magnitude_scale(adapter, weight).detach()
        return scale[:, None] * (weight.to(torch.float32) + delta)

    def train(self, adapter: LoRAAdapter, mode: bool) -> None:
        adapter.__dict__["_norm_cache"] = None


def _scaled(y: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    base = y.float() if bias is None else y.float() - bias.float()
    out = scale * (base + delta.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(y.dtype)


#: The DoRA variant (stateless; one instance serves every layer).
DORA = DoRAVariant()


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
    """The registered ``dora`` method (aliases ``DoRA``): :class:`LoRAMethod` with the DoRA variant."""

    name = "dora"
    Config = DoRAConfig
    variant = DORA
