"""AdamW whose state for a fraction of the parameters lives in host memory (megatron-core's
``optimizer.optimizer_cpu_offload`` / ``optimizer_offload_fraction``, the idea of its
``HybridDeviceOptimizer``).

The first ``offload_fraction`` of the parameter values (in the optimizer's order) are updated on the
host: each step copies their fp32 values and gradients to host memory, runs ``torch.optim.AdamW`` there
(moments in host memory) and copies the new values back; the rest are updated on the device by the
usual AdamW. The device update is launched first, so it runs on the GPU while the host one runs on
the CPU. The host copies are refreshed from the device at every step, so weights loaded after the
optimizer was built (a resume) are what the host updates.

The wrapper is a ``torch.optim.Optimizer`` over the device parameters: its ``param_groups`` take the
trainer's learning rate and weight decay, and ``state[param]`` is the very dictionary the inner
optimizer updates (a host parameter's moments are host tensors), so checkpoints save and load the
state like any other optimizer's, under ``ZeroRedundancyOptimizer`` too.
"""

from __future__ import annotations

from typing import Any

import torch

_HYPER = ("lr", "betas", "eps", "weight_decay")


class HostOffloadAdamW(torch.optim.Optimizer):
    """AdamW with the state of the first ``offload_fraction`` of parameter values in host memory."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, offload_fraction: float = 1.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        ordered = [p for g in self.param_groups for p in g["params"]]
        budget, taken = offload_fraction * sum(p.numel() for p in ordered), 0
        self.host_of: dict[torch.Tensor, torch.Tensor] = {}
        for p in ordered:
            if taken >= budget:
                break
            pin = p.device.type == "cuda"
            self.host_of[p] = torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p.detach())
            taken += p.numel()
        dev, host = [], []
        # (index of the wrapper's group, inner group): load_state_dict replaces the wrapper's group dicts
        self._links: list[tuple[int, dict]] = []
        for gi, g in enumerate(self.param_groups):
            opts = {k: v for k, v in g.items() if k != "params"}
            on_dev = [p for p in g["params"] if p not in self.host_of]
            on_host = [self.host_of[p] for p in g["params"] if p in self.host_of]
            if on_dev:
                dev.append((gi, {**opts, "params": on_dev}))
            if on_host:
                host.append((gi, {**opts, "params": on_host}))
        fused = {"fused": True} if ordered[0].device.type == "cuda" else {"foreach": True}
        self.device_opt = torch.optim.AdamW([i for _, i in dev], lr=lr, **fused) if dev else None
        self.host_opt = torch.optim.AdamW([i for _, i in host], lr=lr, foreach=True) if host else None
        for pairs, inner in ((dev, self.device_opt), (host, self.host_opt)):
            if inner is not None:
                self._links += [(gi, ig) for (gi, _), ig in zip(pairs, inner.param_groups, strict=True)]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for gi, inner in self._links:
            inner.update({k: self.param_groups[gi][k] for k in _HYPER})
        moved = [(p, h) for p, h in self.host_of.items() if p.grad is not None]
        for p, h in moved:
            h.copy_(p.detach())
            h.grad = p.grad.to("cpu")
        if self.device_opt is not None:
            self.device_opt.step()  # asynchronous on a GPU: overlaps the host update below
        if self.host_opt is not None:
            self.host_opt.step()
        for p, h in moved:
            p.copy_(h, non_blocking=True)
            h.grad = None
        self._link_state()

    def _link_state(self) -> None:
        """Make ``self.state[param]`` the inner optimizers' state dictionaries (created at their first step)."""
        for p in (p for g in self.param_groups for p in g["params"]):
            h = self.host_of.get(p)
            inner = self.host_opt.state.get(h) if h is not None else self.device_opt.state.get(p)
            if inner is not None:
                self.state[p] = inner

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore as any optimizer (values on the parameters' devices), then move each host parameter's
        state to host memory and hand every state to the optimizer that updates it."""
        super().load_state_dict(state_dict)
        for p, st in list(self.state.items()):
            h = self.host_of.get(p)
            if h is not None:
                st = {k: (v.to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                self.host_opt.state[h] = st
            else:
                if self.device_opt.defaults.get("fused") and isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(p.device)
                self.device_opt.state[p] = st
            self.state[p] = st


__all__ = ["HostOffloadAdamW"]
