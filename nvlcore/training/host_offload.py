"""AdamW whose state for a fraction of the parameters lives in host memory (megatron-core's
``optimizer.optimizer_cpu_offload`` / ``optimizer_offload_fraction``, the idea of its
``HybridDeviceOptimizer``).

The first ``offload_fraction`` of the parameter values (in the optimizer's order) are updated on the
host: each step copies their gradients (and the values of fp32 parameters) to host memory, runs
``torch.optim.AdamW`` there (moments in host memory) and copies the new values back; the rest are
updated on the device by the usual AdamW. The host copies of fp32 parameters are refreshed from the
device at every step, so weights loaded after the optimizer was built (a resume) are what the host
updates.

How a step overlaps on a GPU. The host parameters are cut into chunks of about ``chunk_bytes`` of fp32
values (whole parameters, in order; a chunk may span parameter groups). The step

1. queues the first :data:`~nvlcore.training.host_memory.LANDING_SLOTS` chunks' device-to-host copies
   (gradients into a ring of pinned buffers allocated once, one slot per chunk in flight, each sized for the
   largest chunk; fp32 values into their pinned masters) on a side stream, and records a CUDA event after each;
2. launches the device AdamW on the current stream (it runs on the GPU while the host works);
3. for each chunk in turn: waits for its event, updates it on the CPU, queues its host-to-device copies
   (``non_blocking`` from pinned memory) on a second side stream and records an event, then queues the
   copies of the chunk ``LANDING_SLOTS`` later into the slot this one used, ordered after that event on the
   GPU (the copy back reads a low-precision value staged in the slot), so later chunks arrive while the CPU
   updates this one, and this one goes back while the CPU updates the next;
4. makes the current stream wait for the last host-to-device copy (an event), so the next forward reads
   the new values without a host synchronisation.

The host AdamW is torch's fused CPU kernel (one vectorised, multithreaded pass over each chunk) where the
device parameters are on a GPU. It equals the ``foreach`` kernel to within fp32 rounding (about one unit
in the last place per step), not bit for bit, so where the device parameters are on the CPU (tests, a
CPU run) the host AdamW keeps ``foreach``, the kernel the plain CPU optimizer uses, and an offloaded CPU
run equals the plain one bit for bit; ``host_fused`` picks the kernel explicitly.

Low-precision device parameters (``optimizer.main_grads_dtype=torch.bfloat16``, megatron-core's
``HybridDeviceOptimizer`` layout): a parameter the trainer stores in bf16 on the device after this
optimizer captured it (:meth:`store_params_in`) has its fp32 master *only* on the host, and the master is
authoritative: it is never refreshed from the device, except once before the first step where the device
value no longer equals the rounded master (weights loaded after the optimizer was built, without a
checkpointed master). Its bf16 gradient crosses to a pinned bf16 buffer (half the bytes of an fp32 one)
and is upcast on the host, which costs the CPU less than a copy of fp32 values; after the host update the
CPU rounds the master to bf16 into the same pinned buffer and the device parameter becomes ``bf16(master)``.
The master is part of the optimizer state (``state[p]["main_param"]``, for every host parameter in this
mode), so a checkpoint restores it and a resume is exact.

With ``main_grads=True`` (``optimizer.use_precision_aware_optimizer=true`` fully offloaded with fp32 main
grads, megatron-core's default layout for that optimizer) such a parameter also gets an fp32 main gradient on
the device (``param.main_grad``, megatron-core's name): a hook adds each bf16 gradient autograd accumulates into
it and drops the bf16 one, so gradients are summed over micro-batches and reduced in fp32, as for an fp32
parameter, and :func:`grad_of` is what the trainer, the clipping and this optimizer read. The main gradient
crosses to a pinned fp32 buffer, whose first half then stages the master rounded to bf16 for the copy back.

Host memory beyond the masters and moments: the ring's pinned gradient buffers (per slot and gradient dtype,
the largest chunk's values at 4 bytes for fp32 gradients and 2 for bf16 ones), and one fp32 scratch of a chunk
for the upcast gradients (:meth:`HostOffloadAdamW.host_bytes`, the memory plan's
:func:`~nvlcore.training.host_memory.offload_host_bytes`). The masters of bf16-stored parameters need no
pinning (only their staged rounding crosses); with ``pin_masters=False`` they are not pinned.

The wrapper is a ``torch.optim.Optimizer`` over the device parameters: its ``param_groups`` take the
trainer's learning rate and weight decay, and ``state[param]`` is the very dictionary the inner
optimizers update (one dict per parameter; a host parameter's moments are host tensors), so checkpoints
save and load the state like any other optimizer's, under ``ZeroRedundancyOptimizer`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nvlcore.training.grads import grad_of
from nvlcore.training.host_memory import LANDING_SLOTS, OFFLOAD_CHUNK_BYTES, pinned_size

_HYPER = ("lr", "betas", "eps", "weight_decay")
#: fp32 bytes of host parameters per chunk of the pipeline (megatron-core's HybridDeviceOptimizer steps one
#: parameter at a time; chunks of tens of MB keep the per-call overhead small and the first/last copy short)
DEFAULT_CHUNK_BYTES = OFFLOAD_CHUNK_BYTES


@dataclass
class _Chunk:
    """Consecutive host parameters updated, and copied, together."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # (device parameter, host fp32 value)
    opt: torch.optim.Optimizer | None = None  # AdamW over these host values; its state is the host optimizer's
    #: this step's landing views into its ring slot's pinned buffers: device parameter -> (fp32 grad | bf16 stage)
    landing: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    #: views made before, per ring slot (remade when the slots are)
    views: dict[int, dict[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _into_main_grad(param: torch.Tensor) -> None:
    """Post-accumulate hook: the bf16 gradient autograd just accumulated goes into the fp32 main gradient."""
    param.main_grad.add_(param.grad)
    param.grad = None


def _host_adamw(groups: list[dict], lr: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {"foreach": True}))


def _grad_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float32 if getattr(param, "main_grad", None) is not None else param.dtype


def _stage(landing: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Pinned room for a low-precision parameter's new value: its gradient's landing buffer, which the update
    no longer needs (an fp32 main gradient's holds the bf16 value in its first half)."""
    if landing.dtype == param.dtype:
        return landing
    return landing.view(-1).view(param.dtype)[:param.numel()].view(param.shape)


def _slot_sizes(chunks: list[_Chunk]) -> dict[torch.dtype, int]:
    """Values of each gradient dtype a ring slot must hold: the most any chunk has."""
    sizes: dict[torch.dtype, int] = {}
    for c in chunks:
        mine: dict[torch.dtype, int] = {}
        for p, _ in c.pairs:
            dt = _grad_dtype(p)
            mine[dt] = mine.get(dt, 0) + p.numel()
        for dt, n in mine.items():
            sizes[dt] = max(sizes.get(dt, 0), n)
    return sizes


def _scratch_values(chunks: list[_Chunk]) -> int:
    """fp32 values the host needs to upcast one chunk's low-precision gradients: the most any chunk has."""
    return max((sum(p.numel() for p, _ in c.pairs if _grad_dtype(p) != torch.float32) for c in chunks), default=0)


def _views(c: _Chunk, slot: dict[torch.dtype, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
    """A chunk's per-parameter views into a ring slot's buffers, one buffer per gradient dtype."""
    views, offsets = {}, dict.fromkeys(slot, 0)
    for p, _ in c.pairs:
        dt = _grad_dtype(p)
        views[p] = slot[dt][offsets[dt]:offsets[dt] + p.numel()].view(p.shape)
        offsets[dt] += p.numel()
    return views


class HostOffloadAdamW(torch.optim.Optimizer):
    """AdamW with the state of the first ``offload_fraction`` of parameter values in host memory.

    ``chunk_bytes``: fp32 bytes of host parameters per pipeline chunk (``None``: one chunk).
    ``host_fused``: the host AdamW kernel, torch's fused CPU one (``True``) or ``foreach`` (``False``);
    ``None`` picks fused where the device parameters are on a GPU, foreach where they are on the CPU.
    ``pin_masters``: the masters of GPU parameters are allocated in pinned memory (their values cross to and
    from the GPU); ``False`` leaves that to :meth:`store_params_in`, which pins only those that stay fp32 (a
    pinned allocation is rounded up to a power of two, and PyTorch keeps freed pinned memory cached).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, offload_fraction: float = 1.0,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, host_fused: bool | None = None,
                 pin_masters: bool = True) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ValueError(f"HostOffloadAdamW chunk_bytes={chunk_bytes}: give a positive size or None (one chunk)")
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
            pin = pin_masters and p.device.type == "cuda"
            self.host_of[p] = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin).copy_(p.detach())
            taken += p.numel()
        self._cuda = any(p.device.type == "cuda" for p in self.host_of)
        self.host_fused = self._cuda if host_fused is None else host_fused
        dev, host = [], []
        # (index of the wrapper's group, inner group): load_state_dict replaces the wrapper's group dicts
        self._links: list[tuple[int, dict]] = []
        group_of: dict[torch.Tensor, int] = {}
        for gi, g in enumerate(self.param_groups):
            opts = {k: v for k, v in g.items() if k != "params"}
            on_dev = [p for p in g["params"] if p not in self.host_of]
            on_host = [self.host_of[p] for p in g["params"] if p in self.host_of]
            group_of.update((p, gi) for p in g["params"])
            if on_dev:
                dev.append((gi, {**opts, "params": on_dev}))
            if on_host:
                host.append((gi, {**opts, "params": on_host}))
        fused = {"fused": True} if ordered[0].device.type == "cuda" else {"foreach": True}
        self.device_opt = torch.optim.AdamW([i for _, i in dev], lr=lr, **fused) if dev else None
        try:
            self.host_opt = _host_adamw([i for _, i in host], lr, self.host_fused) if host else None
        except RuntimeError as exc:  # torch without a fused CPU AdamW (< 2.4)
            raise ValueError(f"HostOffloadAdamW host_fused=True: this torch has no fused CPU AdamW ({exc}); "
                             "pass host_fused=False") from None
        for pairs, inner in ((dev, self.device_opt), (host, self.host_opt)):
            if inner is not None:
                self._links += [(gi, ig) for (gi, _), ig in zip(pairs, inner.param_groups, strict=True)]
        self._chunks = self._make_chunks(chunk_bytes, group_of, lr)
        self._d2h: Any = None  # side streams and the last host-to-device event, made at the first GPU step
        self._h2d: Any = None
        self._h2d_done: Any = None
        #: the ring of pinned gradient buffers: per slot, dtype -> flat buffer sized for the largest chunk
        self._slots: list[dict[torch.dtype, torch.Tensor]] = []
        self._slot_sizes: dict[torch.dtype, int] = {}
        self._scratch = torch.empty(0)  # fp32 upcast of a chunk's bf16 gradients

    def _make_chunks(self, chunk_bytes: int | None, group_of: dict[torch.Tensor, int], lr: float) -> list[_Chunk]:
        """Cut the host parameters, in order, into chunks of at least ``chunk_bytes`` fp32 bytes (the last may
        be smaller); each gets an AdamW over its host values that shares the host optimizer's state."""
        chunks: list[_Chunk] = []
        size = 0
        for p, h in self.host_of.items():
            if not chunks or (chunk_bytes is not None and size >= chunk_bytes):
                chunks.append(_Chunk([]))
                size = 0
            chunks[-1].pairs.append((p, h))
            size += h.numel() * 4
        for c in chunks:
            groups: list[tuple[int, dict]] = []
            for p, h in c.pairs:
                gi = group_of[p]
                if not groups or groups[-1][0] != gi:
                    opts = {k: v for k, v in self.param_groups[gi].items() if k != "params"}
                    groups.append((gi, {**opts, "params": []}))
                groups[-1][1]["params"].append(h)
            c.opt = _host_adamw([g for _, g in groups], lr, self.host_fused)
            c.opt.state = self.host_opt.state  # one dict per parameter, the one checkpoints save
            self._links += [(gi, ig) for (gi, _), ig in zip(groups, c.opt.param_groups, strict=True)]
        return chunks

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, inner in self._links:
            inner.update({k: self.param_groups[gi][k] for k in _HYPER})
        if not self._checked_masters:
            self._adopt_changed_device_values()
        # the chunks whose host parameters have a gradient this step, with those parameters
        work = [(c, moved) for c in self._chunks if (moved := [(p, h) for p, h in c.pairs if grad_of(p) is not None])]
        events: list[Any] = []
        if self._cuda:
            self._begin_copies()
            events += [self._queue_device_to_host(i, *work[i]) for i in range(min(LANDING_SLOTS, len(work)))]
        if self.device_opt is not None:
            self.device_opt.step()  # asynchronous on a GPU: overlaps the host update below
        for i, (c, moved) in enumerate(work):
            if self._cuda:
                events[i].synchronize()  # this chunk's gradients (and values) have landed; later ones still move
                self._take_landed_grads(c, moved)
            else:
                for p, h in moved:
                    if p.dtype == torch.float32:  # an fp32 device parameter is its own master: take its value
                        h.copy_(p.detach())
                    h.grad = grad_of(p).to("cpu", torch.float32)
            c.opt.step()
            for _, h in moved:
                h.grad = None
            if self._cuda:
                self._queue_host_to_device(c, moved)
                if i + LANDING_SLOTS < len(work):  # its slot is free once the copy back just queued has read it
                    events.append(self._queue_device_to_host(i + LANDING_SLOTS, *work[i + LANDING_SLOTS]))
            else:
                for p, h in moved:
                    p.copy_(h)  # casts to a low-precision parameter's dtype (round to nearest even)
        if self._cuda and self._h2d_done is not None:
            # the next forward reads these parameters: order it after the copies, without blocking the host
            torch.cuda.current_stream().wait_event(self._h2d_done)
        self._link_state()
        return loss

    def _begin_copies(self) -> None:
        """At a GPU step's start: the side streams (made once) follow the current stream, and the ring's slots
        fit the largest chunk."""
        if self._d2h is None:
            self._d2h, self._h2d = torch.cuda.Stream(), torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self._d2h.wait_stream(current)  # the gradients are final on the current stream
        self._h2d.wait_stream(current)  # nothing queued before the step still reads the parameters
        sizes = _slot_sizes(self._chunks)
        if sizes != self._slot_sizes:
            slots = min(LANDING_SLOTS, len(self._chunks))
            self._slots = [{dt: torch.empty(n, dtype=dt, pin_memory=True) for dt, n in sizes.items()}
                           for _ in range(slots)]
            self._slot_sizes = sizes
            for c in self._chunks:
                c.views = {}
            most = _scratch_values(self._chunks)
            if most > self._scratch.numel():  # the host upcasts a chunk's bf16 gradients into it
                self._scratch = torch.empty(most, dtype=torch.float32)

    def _queue_device_to_host(self, i: int, c: _Chunk, moved: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """Queue the ``i``-th moving chunk's gradient (and fp32 value) copies into ring slot ``i % LANDING_SLOTS``
        on the side stream, after the copy back of the chunk that used the slot before; returns its event."""
        slot = i % len(self._slots)
        views = c.views.get(slot)
        if views is None:
            views = c.views[slot] = _views(c, self._slots[slot])
        c.landing = views
        with torch.cuda.stream(self._d2h):
            if i >= len(self._slots):  # the slot's last user read it in its copy back (the latest H2D event)
                self._d2h.wait_event(self._h2d_done)
            for p, h in moved:
                if p.dtype == torch.float32:
                    h.copy_(p.detach(), non_blocking=True)  # h is pinned: an fp32 parameter's value
                views[p].copy_(grad_of(p), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._d2h)
        return ev

    def _take_landed_grads(self, c: _Chunk, moved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        off = 0
        for p, h in moved:
            buf = c.landing[p]
            if buf.dtype == torch.float32:
                h.grad = buf
            else:  # upcast on the host into the chunk scratch (exact: bf16 -> fp32)
                h.grad = self._scratch[off:off + h.numel()].view(h.shape).copy_(buf)
                off += h.numel()

    def _queue_host_to_device(self, c: _Chunk, moved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Queue a chunk's new values to the device on the second side stream, from pinned memory: an fp32
        parameter from its master, a low-precision one from the master rounded on the host into its (pinned)
        gradient buffer, which the gradient no longer needs."""
        staged = {p: _stage(c.landing[p], p) for p, _ in moved if p.dtype != torch.float32}
        for p, h in moved:
            if p in staged:
                staged[p].copy_(h)  # round to nearest even, as a device-side cast would
        with torch.cuda.stream(self._h2d):
            for p, h in moved:
                p.copy_(staged.get(p, h), non_blocking=True)
            self._h2d_done = torch.cuda.Event()
            self._h2d_done.record(self._h2d)

    def _wait_copies(self) -> None:
        """Before the host writes a master outside a step: the last step's copies from it have finished."""
        if self._h2d_done is not None:
            self._h2d_done.synchronize()

    @torch.no_grad()
    def store_params_in(self, dtype: torch.dtype, keep: Any = None, *, main_grads: bool = False) -> int:
        """Store the host-updated parameters of >= 2 dims in ``dtype`` on the device from now on (their fp32
        masters stay on the host, authoritative and checkpointed); ``keep(param)`` true keeps one as it is.
        ``main_grads``: each converted parameter accumulates its gradients in an fp32 ``main_grad`` on its
        device (read through :func:`grad_of`) instead of in ``dtype``.
        Call it right after building the optimizer, while the device values still equal the masters.
        Returns the number of parameter values converted."""
        n = 0
        for p, h in self.host_of.items():
            if p.dim() < 2 or p.dtype == dtype or (keep is not None and keep(p)):
                if p.device.type == "cuda" and p.dtype == torch.float32 and not h.is_pinned():
                    h.data = torch.empty(h.shape, dtype=h.dtype, pin_memory=True).copy_(h)  # its value crosses
                continue
            # only the pinned gradient buffer, which stages the rounded master, crosses: the master is not pinned
            p.data = h.to(p.device, dtype)
            if main_grads:
                p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                p.register_post_accumulate_grad_hook(_into_main_grad)
            n += p.numel()
        self.keeps_main_params = True
        self._checked_masters = False
        return n

    def host_bytes(self) -> int:
        """Host memory this optimizer holds (or, before its first step, will hold): masters, moments, and on a
        GPU the chunks' pinned gradient buffers and the upcast scratch, each pinned allocation counted as
        PyTorch's pinned allocator makes it (:func:`~nvlcore.training.host_memory.pinned_size`)."""
        total = 0
        for h in self.host_of.values():
            total += pinned_size(h.nbytes) if h.is_pinned() else h.nbytes
            st = self.host_opt.state.get(h, {})
            total += sum(st[k].nbytes for k in ("exp_avg", "exp_avg_sq") if k in st) if st else 8 * h.numel()
        if self._cuda:
            slots = min(LANDING_SLOTS, len(self._chunks))
            total += slots * sum(pinned_size(n * dt.itemsize) for dt, n in _slot_sizes(self._chunks).items())
            total += 4 * _scratch_values(self._chunks)
        return total

    def _adopt_changed_device_values(self) -> None:
        """A low-precision device parameter that no longer equals its rounded master was loaded after the
        optimizer captured it (and no checkpointed master came with it): its value becomes the master."""
        self._wait_copies()
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
        self._wait_copies()
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


__all__ = ["DEFAULT_CHUNK_BYTES", "HostOffloadAdamW"]
