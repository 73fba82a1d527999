"""Start-up cost (issue 27 item 6): what commands import and do not need.

No wall-clock asserts: which modules end up imported, and that deferring them changes nothing
else. ``bench/startup_tiny.py`` measures the time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvlcore.megatron_import import deferred_compile

SKIPPED_BY_HELPER = ("torch._dynamo", "torch._inductor.compile_fx", "wandb")


def _modules_after(code: str, then: str = "") -> dict:
    """Which of SKIPPED_BY_HELPER a fresh interpreter has imported after ``code`` (``then`` runs after the check)."""
    check = (f"import sys, json\n{code}\nloaded = {{m: m in sys.modules for m in {SKIPPED_BY_HELPER!r}}}\n"
             f"{then}\nprint(json.dumps(loaded))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_deferred_compile_compiles_on_first_call_with_the_same_arguments() -> None:
    calls = []

    def fake_compile(fn, **options):
        calls.append((fn.__name__, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    compile = deferred_compile(fake_compile)

    def add(x, y=1):
        return x + y

    lazy = compile(add)
    assert calls == [] and lazy.__name__ == "add"
    assert lazy(2, y=3) == ("compiled", 5) and lazy(1) == ("compiled", 2)
    assert calls == [("add", {})]  # once, on the first call

    @compile(dynamic=True, fullgraph=True)  # as a decorator with options
    def mul(x):
        return 2 * x

    assert calls == [("add", {})] and mul(4) == ("compiled", 8)
    assert calls[-1] == ("mul", {"dynamic": True, "fullgraph": True})


def test_deferred_compile_passes_modules_through_at_once() -> None:
    import torch

    seen = []
    module = torch.nn.Linear(2, 2)
    assert deferred_compile(lambda m, **o: seen.append(m) or "optimized")(module) == "optimized"
    assert seen == [module]


@pytest.mark.slow
def test_megatron_core_import_skips_the_compiler_and_wandb() -> None:
    """Importing megatron-core plainly loads TorchDynamo, Inductor and wandb (the premise, so this test
    fails if the helper stops working or megatron-core stops needing it); through the helper none of
    them, and wandb imports normally afterwards."""
    pytest.importorskip("wandb")
    plain = _modules_after("import megatron.core")
    assert plain == {m: True for m in SKIPPED_BY_HELPER}
    helped = _modules_after(
        "from nvlcore.megatron_import import import_megatron_core\nimport_megatron_core()\n"
        "from megatron.core import parallel_state, tensor_parallel\n"
        "import megatron.core.jit as jit\nassert jit.jit_fuser.__module__ == 'nvlcore.megatron_import'\n"
        "import torch\nassert torch.compile.__module__ == 'torch'\n",
        then="import wandb\nassert wandb.Settings is not None",
    )
    assert helped == {m: False for m in SKIPPED_BY_HELPER}


def test_is_sharded_needs_no_torch_distributed_optim_import() -> None:
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys, torch\nfrom nvlcore.training.optim import is_sharded\n"
         "opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])\n"
         "assert not is_sharded(opt)\nprint('torch.distributed.optim' in sys.modules)"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"


def test_is_sharded_still_recognises_a_zero_redundancy_optimizer() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from nvlcore.training.optim import is_sharded, local_optimizer

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.zeros(2))]
        zero = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
        assert is_sharded(zero) and local_optimizer(zero) is zero.optim
        assert not is_sharded(torch.optim.AdamW(params))
    finally:
        if owns:
            dist.destroy_process_group()
