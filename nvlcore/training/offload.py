"""Activation offloading to host memory (megatron-core's ``model.cpu_offloading``,
``cpu_offloading_activations``, ``cpu_offloading_num_layers``), model-agnostic.

While the forward runs through one of the first N decoder layers (the bridge's ``decoder_layers``),
every tensor autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``) is copied
to pinned host memory on a side CUDA stream, and the GPU copy is released as soon as the forward has no
other use for it. In the backward, when a layer's backward starts, the saved tensors of the layer
before it are copied back on a second side stream (a prefetch, overlapped with this layer's backward);
a tensor not yet prefetched is copied back when autograd asks for it. Events order each copy with
the compute stream, and ``record_stream`` keeps the allocator from reusing a tensor's memory before
its copy has read it. The two directions have a stream each: PCIe copies both ways at once, and when the
forward's copies to the host fall behind the compute, a copy back would otherwise queue behind all of them.

Parameters and small tensors (under :data:`MIN_ELEMENTS` values) stay where they are: a parameter is
already resident, and small copies cost more in launches than they save. On the CPU the "host copy"
is a plain copy (there is nothing to free); the CPU tests check this path's numerics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nvlcore.bridge import OFFLOADED_FORWARDS

if TYPE_CHECKING:
    import torch

#: Saved tensors with fewer values than this are left in place.
MIN_ELEMENTS = 1024


class _Saved:
    """One offloaded tensor: its host copy, the event that ends the copy, and (after a prefetch) its
    device copy."""

    __slots__ = ("device", "host", "event", "back", "back_event")

    def __init__(self, device: Any, host: Any, event: Any) -> None:
        self.device, self.host, self.event = device, host, event
        self.back: Any = None
        self.back_event: Any = None


class ActivationOffloader:
    """Offloads the saved activations of ``layers`` (see the module doc); :meth:`remove` undoes it."""

    def __init__(self, layers: Sequence[torch.nn.Module], num_layers: int) -> None:
        import torch

        self.num_layers = num_layers
        cuda = torch.cuda.is_available()
        #: the copies to the host (forward) and back (backward's prefetch), one stream each
        self.stream = torch.cuda.Stream() if cuda else None
        self.back_stream = torch.cuda.Stream() if cuda else None
        self.saved: dict[int, list[_Saved]] = {i: [] for i in range(num_layers)}
        self.offloaded_bytes = 0  # over the life of the offloader (tests and logs)
        self._active: list[Any] = []
        self._handles = []
        # layers 0..N-1 offload; layers 1..N start the copy back of the layer before theirs
        for i, layer in enumerate(layers[: num_layers + 1]):
            if i < num_layers:
                self._handles.append(layer.register_forward_pre_hook(self._enter(i)))
            self._handles.append(layer.register_forward_hook(self._exit(i)))

    # -- forward -----------------------------------------------------------------------------------
    def _enter(self, index: int) -> Any:
        import torch

        def hook(module: Any, args: Any) -> None:
            if not torch.is_grad_enabled():
                return
            self.saved[index] = []
            ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(index, t), self._unpack)
            ctx.__enter__()
            self._active.append(ctx)
            OFFLOADED_FORWARDS[0] += 1  # nvlcore.bridge.saved_tensors_offloaded() says so to the model
        return hook

    def _exit(self, index: int) -> Any:
        import torch

        def hook(module: Any, args: Any, output: Any) -> None:
            if index < self.num_layers and self._active:
                self._active.pop().__exit__(None, None, None)
                OFFLOADED_FORWARDS[0] -= 1
            if index == 0 or not torch.is_grad_enabled():
                return
            # the gradient of this layer's output arriving = its backward starting: fetch the layer before
            first = next((o for o in (output if isinstance(output, (tuple, list)) else (output,))
                          if isinstance(o, torch.Tensor) and o.requires_grad), None)
            if first is not None:
                first.register_hook(lambda grad: self._prefetch(index - 1))
        return hook

    def _pack(self, index: int, t: torch.Tensor) -> Any:
        import torch

        if isinstance(t, torch.nn.Parameter) or t.numel() < MIN_ELEMENTS or t.layout != torch.strided:
            return t
        if t.device.type != "cuda" or self.stream is None:
            host = t.detach().clone()
            event = None
        else:
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t.detach(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            t.record_stream(self.stream)
        self.offloaded_bytes += t.numel() * t.element_size()
        saved = _Saved(t.device, host, event)
        self.saved[index].append(saved)
        return saved

    # -- backward ----------------------------------------------------------------------------------
    def _prefetch(self, index: int) -> None:
        import torch

        if self.back_stream is None:
            return
        with torch.cuda.stream(self.back_stream):
            for s in self.saved.get(index, ()):
                if s.back is None and s.event is not None:
                    self.back_stream.wait_event(s.event)  # its copy to the host is done
                    s.back = s.host.to(s.device, non_blocking=True)
                    s.back_event = torch.cuda.Event()
                    s.back_event.record(self.back_stream)
        self.saved[index] = []  # autograd holds what it still needs

    def _unpack(self, packed: Any) -> torch.Tensor:
        import torch

        if not isinstance(packed, _Saved):
            return packed
        if packed.event is None:  # the CPU path
            return packed.host
        current = torch.cuda.current_stream(packed.device)
        if packed.back is not None:
            current.wait_event(packed.back_event)
            back, packed.back = packed.back, None
            back.record_stream(current)
            return back
        current.wait_event(packed.event)
        return packed.host.to(packed.device, non_blocking=True)

    def remove(self) -> None:
        """Remove the hooks (the model then trains as before). A forward that raised inside an offloaded layer
        left its saved-tensor hooks entered: they are left here too."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._active:
            self._active.pop().__exit__(None, None, None)
            OFFLOADED_FORWARDS[0] -= 1


def offload_activations(layers: Sequence[torch.nn.Module], num_layers: int) -> ActivationOffloader:
    """Offload the saved activations of the first ``num_layers`` of ``layers`` (``model.cpu_offloading_num_layers``).

    :raises ValueError: ``num_layers`` is not in ``[1, len(layers) - 1]`` (megatron-core's range: the
        last layer's activations are needed as soon as the backward starts).
    """
    if not 1 <= num_layers < len(layers):
        raise ValueError(f"model.cpu_offloading_num_layers={num_layers}: choose 1 to {len(layers) - 1} (the model "
                         f"has {len(layers)} decoder layers; the last one's activations are needed first)")
    return ActivationOffloader(layers, num_layers)


__all__ = ["ActivationOffloader", "MIN_ELEMENTS", "offload_activations"]
