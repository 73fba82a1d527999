"""Import ``megatron.core`` without the seconds it spends at import on things nvl never calls.

Importing ``megatron.core`` imports nearly all of it. Two parts of that cost are work for
features nvl does not use, paid by every command that builds a model (``nvl generate``, ``eval``,
``finetune``, ``peft merge``, ...):

* megatron-core decorates its fused elementwise kernels (``megatron.core.fusions``, MoE routing)
  with ``torch.compile`` at import (``megatron.core.jit.jit_fuser``). ``torch.compile`` imports
  TorchDynamo and Inductor on the spot (about 2 s of CPU on a small machine), although it compiles
  nothing until the decorated function is first called. While :func:`import_megatron_core` runs,
  ``torch.compile`` is replaced by :func:`deferred_compile`, which makes the very same
  ``torch.compile`` call on the function's first call. A kernel nvl never calls never loads the
  compiler; one that is called is compiled exactly as before.
* its dynamic-inference engine and its ``Timers`` import ``wandb`` (when installed) for their own
  logging, which nvl does not use (nvl's ``wandb`` logger imports it itself when configured).
  ``wandb`` is hidden from that import, so megatron-core sees it as absent, as it does on machines
  without it; it is importable again as soon as the import returns. If ``wandb`` was imported
  before, nothing is hidden.

Call :func:`import_megatron_core` before the first ``from megatron.core import ...`` on a command's
path (``nvlcore.parallel.init_parallel`` and model packages do); later imports find the module
loaded. Once ``megatron.core`` is imported, it does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["deferred_compile", "import_megatron_core"]


def deferred_compile(compile_fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for ``torch.compile`` that calls ``compile_fn`` (with the same arguments) on the
    compiled function's first call instead of at decoration.

    Anything but a function or method (a ``torch.nn.Module``, say) goes to ``compile_fn`` at once,
    since callers may rely on the ``OptimizedModule`` it returns.
    """

    def compile(model: Any = None, **options: Any) -> Any:
        if model is None:  # used as ``@torch.compile(...)``
            return lambda fn: compile(fn, **options)
        if not inspect.isroutine(model):
            return compile_fn(model, **options)
        compiled: Any = None

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    return compile


@contextlib.contextmanager
def _hidden(module: str) -> Iterator[None]:
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]  # makes `import module` raise ImportError
    try:
        yield
    finally:
        if sys.modules.get(module, ...) is None:
            del sys.modules[module]


def import_megatron_core() -> None:
    """Import ``megatron.core`` with its import-time ``torch.compile`` calls deferred and ``wandb``
    hidden (see the module docstring); a no-op once it is imported."""
    if "megatron.core" in sys.modules:
        return
    import torch

    real = torch.compile
    torch.compile = deferred_compile(real)  # type: ignore[assignment]
    try:
        with _hidden("wandb"):
            import megatron.core  # noqa: F401
    finally:
        torch.compile = real  # type: ignore[assignment]
