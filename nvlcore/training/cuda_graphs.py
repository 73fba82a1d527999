"""CUDA graphs for the training step, per layer (``model.cuda_graph_impl=local``).

Why: a training step can be bound by the host (Python and kernel launches: a layer whose backward costs
more host time than GPU time); replaying a captured graph per layer removes both.

How (PyTorch's own machinery, :func:`torch.cuda.make_graphed_callables`):

1. :class:`LayerGraphs` replaces the ``forward`` of each module the model bridge names for the scopes
   (:meth:`nvlcore.bridge.ModelBridge.cuda_graph_modules`) by a dispatcher. The model calls those modules
   in training forwards with tensors or ``None`` positionally (the bridge's contract).
2. For ``model.cuda_graph_warmup_steps`` steps everything runs eagerly and the dispatcher records each
   module's first training call: the shape, dtype and ``requires_grad`` of each tensor argument and
   where the ``None``s are (its *signature*), and a copy of the tensors (the capture's sample inputs).
3. After that step the trainer calls :meth:`LayerGraphs.after_step`, which captures all modules in one
   ``make_graphed_callables`` call (forward order: one memory pool), under the run's autocast with
   ``cache_enabled=False`` (make_graphed_callables refuses autocast's weight-cast cache).
4. From then on a training call (module in train mode, grad enabled) whose signature equals the
   captured one replays the graphs; any other call runs eagerly (an eval forward, a ``no_grad`` call, a
   different shape: the last printed once, naming the module and both shapes).

Gradients: the graphed backward returns each parameter's gradient in a static buffer that the next
replay overwrites. Autograd would adopt that buffer as ``param.grad`` when ``.grad`` is None, and a
second micro-batch would then overwrite the first one's gradient; :meth:`before_step` gives those
parameters a zeroed ``.grad`` first, so autograd accumulates into it (gradient accumulation over
micro-batches, plain ``.grad`` as :mod:`nvlcore.training.trainer` reads them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: One argument's signature: None, or (shape, dtype, device, requires_grad) of a tensor.
ArgSignature = tuple[tuple[int, ...], Any, Any, bool] | None


def signature_of(args: tuple[Any, ...]) -> tuple[ArgSignature, ...] | str:
    """The signature of a call's positional arguments, or why it cannot be graphed (a non-tensor argument)."""
    import torch

    out: list[ArgSignature] = []
    for i, a in enumerate(args):
        if a is None:
            out.append(None)
        elif isinstance(a, torch.Tensor):
            out.append((tuple(a.shape), a.dtype, a.device, bool(a.requires_grad)))
        else:
            return f"argument {i} is a {type(a).__name__}, not a tensor or None"
    return tuple(out)


def describe_signature(sig: tuple[ArgSignature, ...]) -> str:
    """``[1, 4096, 64] bfloat16 grad, None, [1, 4096] int32`` (the run's log line; ``grad``: requires grad)."""
    parts = []
    for s in sig:
        if s is None:
            parts.append("None")
        else:
            parts.append(f"[{', '.join(str(d) for d in s[0])}] {str(s[1]).removeprefix('torch.')}"
                         + (" grad" if s[3] else ""))
    return ", ".join(parts)


class _Bound:
    """Lazily built ``nn.Module`` (torch is imported inside): the layer's original forward over the tensor
    arguments only, the ``None``s put back where the signature has them. Its parameters are the layer's,
    so ``make_graphed_callables`` captures their gradients (adapters inside the layer are just more)."""

    @staticmethod
    def make(module: torch.nn.Module, forward: Callable[..., Any], sig: tuple[ArgSignature, ...]) -> torch.nn.Module:
        from torch import nn

        class Bound(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layer = module

            def forward(self, *tensors: Any) -> Any:
                it = iter(tensors)
                return forward(*(None if s is None else next(it) for s in sig))

        return Bound()


class _Entry:
    """One graphed module: its original forward, what was recorded and, once captured, the graphed callable."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.name = name
        self.module = module
        self.forward = module.forward  # the bound original, before the dispatcher shadows it
        self.signature: tuple[ArgSignature, ...] | None = None
        self.sample: tuple[Any, ...] | None = None
        self.graphed: Any = None
        self.warned: set[str] = set()


class LayerGraphs:
    """Per-layer CUDA graphs over ``modules`` (name -> module, in forward order); see the module docstring.

    :param modules: what the bridge's ``cuda_graph_modules`` returned.
    :param warmup_steps: ``model.cuda_graph_warmup_steps``: eager steps before capture (at least 1).
    :param autocast_dtype: the run's autocast dtype (None: no autocast).
    :param say: the run's one-line printer.
    :param label: the keys as the log names them (``model.cuda_graph_impl=local, scope NAMES``).
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], *, warmup_steps: int, autocast_dtype: Any = None,
                 say: Callable[[str], None] = print, label: str = "model.cuda_graph_impl=local") -> None:
        if warmup_steps < 1:
            raise ValueError(f"model.cuda_graph_warmup_steps={warmup_steps}: at least 1 eager step is needed before "
                             "capture (it records the layers' input shapes)")
        if not modules:
            raise ValueError(f"{label}: the model has no layer in this scope; choose another model.cuda_graph_scope")
        self.entries = [_Entry(name, m) for name, m in modules.items()]
        self.warmup_steps = warmup_steps
        self.autocast_dtype = autocast_dtype
        self.say = say
        self.label = label
        self.captured = False
        #: why capture failed (then every call stays eager), or None
        self.failed: str | None = None
        #: calls that replayed a graph / ran eagerly in training since capture (tests and the bench read them)
        self.replays = 0
        self.eager_calls = 0
        for e in self.entries:
            e.module.forward = self._dispatcher(e)

    # ----------------------------------------------------------------------------------- dispatch
    def _dispatcher(self, e: _Entry) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            import torch

            training = e.module.training and torch.is_grad_enabled()
            if not training or self.failed is not None:
                return e.forward(*args, **kwargs)
            if kwargs:
                return self._eager(e, "keyword arguments", f"called with keyword arguments {sorted(kwargs)}",
                                   args, kwargs)
            sig = signature_of(args)
            if isinstance(sig, str):
                return self._eager(e, "argument type", sig, args, kwargs)
            if not self.captured:
                if e.signature is None:
                    e.signature = sig
                    # detached copies: the capture's sample inputs (each module its own: a graph's static
                    # input is the sample tensor itself, and its backward reads it)
                    e.sample = tuple(a.detach().clone().requires_grad_(a.requires_grad)
                                     for a in args if a is not None)
                return e.forward(*args)
            if sig != e.signature:
                assert e.signature is not None
                return self._eager(e, "shape", f"inputs {describe_signature(sig)} differ from the captured "
                                   f"{describe_signature(e.signature)}", args, kwargs)
            self.replays += 1
            return e.graphed(*(a for a in args if a is not None))

        return forward

    def _eager(self, e: _Entry, kind: str, why: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if self.captured:
            self.eager_calls += 1
        if kind not in e.warned:
            e.warned.add(kind)
            self.say(f"nvl finetune: CUDA graphs: {e.name} ran eagerly ({why}); printed once per layer and reason")
        return e.forward(*args, **kwargs)

    # ---------------------------------------------------------------------------- trainer's calls
    def before_step(self) -> None:
        """Give the graphed layers' trainable parameters a zeroed ``.grad`` (see the module docstring),
        after the trainer cleared gradients and before the first backward of a step."""
        import torch

        if not self.captured:
            return
        for e in self.entries:
            for p in e.module.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    def after_step(self, steps_done: int) -> None:
        """Capture once ``steps_done`` (this run's completed steps) reaches the warm-up count."""
        if self.captured or self.failed is not None or steps_done < self.warmup_steps:
            return
        missing = [e.name for e in self.entries if e.signature is None]
        if missing:
            self.failed = (f"{len(missing)} layer(s) ({missing[0]}, ...) were never called in a training forward "
                           "with tensor arguments")
            self.say(f"nvl finetune: CUDA graphs off, every layer runs eagerly: {self.failed}")
            return
        self.capture()

    def capture(self) -> None:
        """Capture every module in one ``make_graphed_callables`` call (one memory pool, forward order). A
        failure leaves every layer eager, in one printed line naming the error."""
        import contextlib
        import time

        import torch

        t0 = time.perf_counter()
        bounds = []
        for e in self.entries:
            assert e.signature is not None
            bounds.append(_Bound.make(e.module, e.forward, e.signature).train())
        samples = tuple(e.sample for e in self.entries)
        device_type = next(iter(s for s in self.entries[0].signature if s is not None))[2].type  # type: ignore
        autocast = (torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        try:
            torch.cuda.synchronize()
            with autocast:
                graphed = torch.cuda.make_graphed_callables(tuple(bounds), samples, allow_unused_input=True)
            torch.cuda.synchronize()
        except Exception as exc:  # any capture error: the run goes on eagerly, and says why
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.say(f"nvl finetune: CUDA graphs off, every layer runs eagerly: capture failed ({self.failed})")
            for e in self.entries:
                e.sample = None
            return
        for e, g in zip(self.entries, graphed, strict=True):
            e.graphed = g
            e.sample = None  # the graph keeps its own static inputs
        self.captured = True
        first = self.entries[0]
        assert first.signature is not None
        names = _compress([e.name for e in self.entries])
        self.say(f"nvl finetune: CUDA graphs ({self.label}): {len(self.entries)} layer(s) captured: {names}; inputs "
                 f"{describe_signature(first.signature)} ({time.perf_counter() - t0:.1f} s)")


def _compress(names: list[str]) -> str:
    """``decoder.layers.{0,2,4}`` for names that differ only in one number, else the names joined."""
    import re

    pat = [re.fullmatch(r"(.*?)(\d+)(\D*)", n) for n in names]
    if all(pat) and len({(m.group(1), m.group(3)) for m in pat if m}) == 1:
        m0 = pat[0]
        assert m0 is not None
        return f"{m0.group(1)}{{{','.join(m.group(2) for m in pat if m)}}}{m0.group(3)}"
    return ", ".join(names)


__all__ = ["LayerGraphs", "describe_signature", "signature_of"]
