"""AdamW with Adam's moments stored in bfloat16 (megatron-core's precision-aware optimizer:
``optimizer.use_precision_aware_optimizer`` with ``exp_avg_dtype`` / ``exp_avg_sq_dtype``).

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

#: Config spelling (how ``torch.dtype`` prints, as in megatron-core's OptimizerConfig) -> moment storage.
MOMENT_DTYPES: dict[str, torch.dtype] = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16}


class LeanAdamW(_AdamBase):
    """Decoupled-weight-decay Adam (as ``torch.optim.AdamW``) whose ``exp_avg`` and ``exp_avg_sq`` are
    stored in ``exp_avg_dtype`` / ``exp_avg_sq_dtype``; parameters and gradients stay fp32."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, exp_avg_dtype: torch.dtype = torch.float32,
                 exp_avg_sq_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, False, block_size=1, bf16_stochastic_round=False,
                         is_adamw=True)
        # torchao's _new_buffer(p, signed): signed is True for exp_avg, False for exp_avg_sq
        self.moment_dtypes = {True: exp_avg_dtype, False: exp_avg_sq_dtype}

    def _new_buffer(self, p: torch.Tensor, signed: bool) -> torch.Tensor:
        return torch.zeros_like(p, dtype=self.moment_dtypes[signed])

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

    def adopt_fp32_moments(self) -> None:
        """Round moments restored in fp32 (a checkpoint keeps them fp32) to their storage dtypes."""
        for st in self.state.values():
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                if name in st and st[name].dtype != self.moment_dtypes[signed]:
                    st[name] = st[name].to(self.moment_dtypes[signed])
            if "step" in st and isinstance(st["step"], torch.Tensor):
                st["step"] = st["step"].detach().to("cpu", torch.float32)


__all__ = ["LeanAdamW", "MOMENT_DTYPES"]
