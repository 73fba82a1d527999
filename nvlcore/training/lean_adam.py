"""AdamW with Adam's moments stored in bfloat16 or 8 bits (megatron-core's precision-aware optimizer:
``optimizer.use_precision_aware_optimizer`` with ``exp_avg_dtype`` / ``exp_avg_sq_dtype``).

``torch.uint8`` stores a moment as torchao's ``OptimState8bit`` (the state of torchao's ``AdamW8bit``,
after bitsandbytes' 8-bit Adam): one byte per value on a dynamic quantization map plus one fp32 scale
per block of 256 values. As in torchao and bitsandbytes, tensors under 4,096 values (or not a multiple
of the block) keep fp32 moments.

The update is torchao's (``torchao.optim``): every parameter's step runs in fp32 (``single_param_adam``:
the moments are read up to fp32, updated, and rounded back to their storage dtype), compiled by
``torch.compile`` on a GPU. torchao ships the update and the state handling as the base of its
low-bit AdamW classes; this class only chooses each moment's storage dtype. On the CPU the same
update runs eagerly (``torch.compiler.set_stance("force_eager")``): compiling it there costs tens of
seconds per parameter shape for a step that takes milliseconds.

Imported only when a run asks for low-precision moments (torch and torchao load with it).
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.optim.adam import _AdamBase
from torchao.optim.quant_utils import quantize_8bit_with_qmap
from torchao.optim.subclass_8bit import OptimState8bit

#: Config spelling (how ``torch.dtype`` prints, as in megatron-core's OptimizerConfig) -> moment storage.
MOMENT_DTYPES: dict[str, torch.dtype] = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16,
                                         "torch.uint8": torch.uint8}
#: Suffix of the checkpoint entry holding an 8-bit moment's block scales (one per value, the checkpoint's layout).
BLOCK_SCALE = ".block_scale"


class LeanAdamW(_AdamBase):
    """Decoupled-weight-decay Adam (as ``torch.optim.AdamW``) whose ``exp_avg`` and ``exp_avg_sq`` are
    stored in ``exp_avg_dtype`` / ``exp_avg_sq_dtype``; parameters and gradients stay fp32."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, exp_avg_dtype: torch.dtype = torch.float32,
                 exp_avg_sq_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, False, block_size=256, bf16_stochastic_round=False,
                         is_adamw=True)
        # torchao's _new_buffer(p, signed): signed is True for exp_avg, False for exp_avg_sq
        self.moment_dtypes = {True: exp_avg_dtype, False: exp_avg_sq_dtype}

    #: Tensors with fewer values keep fp32 moments under torch.uint8 (torchao's and bitsandbytes' rule).
    min_quantized_size = 4096

    def _new_buffer(self, p: torch.Tensor, signed: bool) -> torch.Tensor:
        dtype = self.moment_dtypes[signed]
        if dtype is not torch.uint8:
            return torch.zeros_like(p, dtype=dtype)
        if p.numel() >= self.min_quantized_size and p.numel() % self.block_size == 0:
            return OptimState8bit.zeros(p.shape, signed, self.block_size, p.device)
        return torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        # torchao keeps lr as a tensor; the trainer (and ZeroRedundancyOptimizer's group sync) set floats
        for group in self.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
        on_cpu = all(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        if on_cpu:
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)
        return super().step(closure)

    def adopt_fp32_moments(self, block_scales: dict[Any, dict[str, torch.Tensor]] | None = None) -> None:
        """Turn moments restored in fp32 (a checkpoint keeps them fp32) into their storage dtypes.

        An 8-bit moment whose block scales were saved (``block_scales[param][name]``, one per value)
        gets back exactly its codes and scales; without them it is quantized afresh.
        """
        for p, st in self.state.items():
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                if name not in st:
                    continue
                buf = self._new_buffer(p, signed)
                scale = (block_scales or {}).get(p, {}).get(name)
                blocks = scale.reshape(-1, self.block_size) if scale is not None else None
                # the saved scales fit this layout when each block holds one (not so after a TP change)
                if isinstance(buf, OptimState8bit) and blocks is not None and bool((blocks == blocks[:, :1]).all()):
                    compact = blocks[:, 0].to(buf.scale.device, torch.float32)
                    scaled = (st[name].reshape(-1, self.block_size) / compact[:, None]).view(buf.codes.shape)
                    buf.codes.copy_(quantize_8bit_with_qmap(scaled.to(buf.codes.device), buf.qmap))
                    buf.scale.copy_(compact)
                else:
                    buf.copy_(st[name])
                st[name] = buf
            if "step" in st and isinstance(st["step"], torch.Tensor):
                st["step"] = st["step"].detach().to("cpu", torch.float32)


def export_moment(value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A moment as the checkpoint keeps it: fp32 values (``""``), plus an 8-bit moment's block scales
    spread over its values (:data:`BLOCK_SCALE`), so that a resume gets the same codes and scales back."""
    if isinstance(value, OptimState8bit):
        spread = value.scale.repeat_interleave(value.block_size).view(value.codes.shape)
        return {"": value.dequantize(), BLOCK_SCALE: spread}
    return {"": value if value.dtype == torch.float32 else value.float()}


def state_bytes(value: torch.Tensor) -> int:
    """Bytes a state tensor really holds (an 8-bit moment: its codes and scales)."""
    if isinstance(value, OptimState8bit):
        return value.codes.numel() + value.scale.numel() * 4
    return value.numel() * value.element_size()


__all__ = ["BLOCK_SCALE", "LeanAdamW", "MOMENT_DTYPES", "export_moment", "state_bytes"]
