"""AdamW whose state for a fraction of the parameters lives in host memory (megatron-core's
``optimizer.optimizer_cpu_offload`` / ``optimizer_offload_fraction``, the idea of its
``HybridDeviceOptimizer``).

The first ``offload_fraction`` of the parameter values (in the optimizer's order) are updated on the
host: each step copies their fp32 values and gradients to host memory, runs ``torch.optim.AdamW`` there
(moments in host memory) and copies the new values back; the rest are updated on the device by the
usual AdamW. The device update is launched first, so it runs on the GPU while the host one runs on
the CPU. The host copies of fp32 parameters are refreshed from the device at every step, so weights
loaded after the optimizer was built (a resume) are what the host updates.

Low-precision device parameters (``optimizer.main_grads_dtype=torch.bfloat16``, megatron-core's
``HybridDeviceOptimizer`` layout): a parameter the trainer stores in bf16 on the device after this
optimizer captured it (:meth:`store_params_in`) has its fp32 master *only* on the host, and the master is
authoritative: it is never refreshed from the device, except once before the first step where the device
value no longer equals the rounded master (weights loaded after the optimizer was built, without a
checkpointed master). Its bf16 gradient is upcast on the host, and after the host update the device
parameter becomes ``bf16(master)``. The master is part of the optimizer state (``state[p]["main_param"]``,
for every host parameter in this mode), so a checkpoint restores it and a resume is exact.

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
        #: the host masters are authoritative and checkpointed (``state[p]["main_param"]``): set by store_params_in
        self.keeps_main_params = False
        #: before the first step, compare each low-precision device parameter with its rounded master once
        self._checked_masters = False
        for p in ordered:
            if taken >= budget:
                break
            pin = p.device.type == "cuda"
            self.host_of[p] = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin).copy_(p.detach())
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
        if not self._checked_masters:
            self._adopt_changed_device_values()
        moved = [(p, h) for p, h in self.host_of.items() if p.grad is not None]
        for p, h in moved:
            if p.dtype == torch.float32:  # an fp32 device parameter is its own master: take its value
                h.copy_(p.detach())
            h.grad = p.grad.to("cpu", torch.float32)
        if self.device_opt is not None:
            self.device_opt.step()  # asynchronous on a GPU: overlaps the host update below
        if self.host_opt is not None:
            self.host_opt.step()
        for p, h in moved:
            p.copy_(h, non_blocking=True)  # casts to a low-precision parameter's dtype (round to nearest even)
            h.grad = None
        self._link_state()

    @torch.no_grad()
    def store_params_in(self, dtype: torch.dtype, keep: Any = None) -> int:
        """Store the host-updated parameters of >= 2 dims in ``dtype`` on the device from now on (their fp32
        masters stay on the host, authoritative and checkpointed); ``keep(param)`` true keeps one as it is.
        Call it right after building the optimizer, while the device values still equal the masters.
        Returns the number of parameter values converted."""
        n = 0
        for p, h in self.host_of.items():
            if p.dim() < 2 or p.dtype == dtype or (keep is not None and keep(p)):
                continue
            p.data = h.to(p.device, dtype)
            n += p.numel()
        self.keeps_main_params = True
        self._checked_masters = False
        return n

    def _adopt_changed_device_values(self) -> None:
        """A low-precision device parameter that no longer equals its rounded master was loaded after the
        optimizer captured it (and no checkpointed master came with it): its value becomes the master."""
        for p, h in self.host_of.items():
            if p.dtype != torch.float32 and not torch.equal(p.detach().cpu(), h.to(p.dtype)):
                h.copy_(p.detach())
        self._checked_masters = True

    def master_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The fp32 host master of a low-precision device parameter (None for fp32 or device-updated ones)."""
        h = self.host_of.get(p)
        return h if h is not None and p.dtype != torch.float32 else None

    def _link_state(self) -> None:
        """Make ``self.state[param]`` the inner optimizers' state dictionaries (created at their first step)."""
        for p in (p for g in self.param_groups for p in g["params"]):
            h = self.host_of.get(p)
            inner = self.host_opt.state.get(h) if h is not None else self.device_opt.state.get(p)
            if inner is not None:
                if h is not None and self.keeps_main_params:
                    inner["main_param"] = h  # the live master: saved with the moments (AdamW ignores the key)
                self.state[p] = inner

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore as any optimizer (values on the parameters' devices), then move each host parameter's
        state to host memory and hand every state to the optimizer that updates it."""
        if self.keeps_main_params:
            # torch's load casts state values to the parameter's dtype: fp32 moments and masters of a bf16
            # parameter must keep fp32, so their values are placed here, by the saved parameter order
            saved = state_dict["state"]
            super().load_state_dict({**state_dict, "state": {}})
            ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            self.state.clear()
            for i, p in zip(ids, params, strict=True):
                if i in saved:
                    self.state[p] = dict(saved[i])
            self._checked_masters = False
        else:
            super().load_state_dict(state_dict)
        for p, st in list(self.state.items()):
            h = self.host_of.get(p)
            if h is not None:
                st = {k: (v.to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                master = st.pop("main_param", None)
                if master is not None:
                    h.copy_(master)
                if self.keeps_main_params:
                    st["main_param"] = h
                self.host_opt.state[h] = st
            else:
                if self.device_opt.defaults.get("fused") and isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(p.device)
                self.device_opt.state[p] = st
            self.state[p] = st


__all__ = ["HostOffloadAdamW"]
