"""Test helpers: gloo process groups on CPU and a small tensor-parallel toy built from Megatron layers.

Workers live here (not in test files) because ``torch.multiprocessing.spawn`` pickles them by module
path, which pytest's importlib mode does not provide for test modules; this folder is on pytest's
``pythonpath``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The gloo harness is the repository's (tests/support; one implementation for every plugin's TP/DP tests).
from nvl_dist_testing import free_port, run_distributed  # noqa: F401

# --------------------------------------------------------------------------------------------------
# A toy with the shapes of the real thing: norm-fused column-parallel fc1/qkv, row-parallel fc2/proj,
# a fused "in_proj" with component rows, and a plain head, under language_model / vision_model.


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def make_toy(tp_group: Any, hidden: int = 16, ffn: int = 32, seed: int = 0) -> nn.Module:
    """The toy at the TP size of ``tp_group``, its weights sliced from one seeded full set."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32, perform_initialization=True)
    init = nn.init.zeros_

    class NormColumn(ColumnParallelLinear):
        def __init__(self, i: int, o: int) -> None:
            super().__init__(i, o, config=cfg, init_method=init, bias=False, gather_output=False, tp_group=tp_group)
            self.layer_norm_weight = nn.Parameter(torch.ones(i))

        def normalize(self, x: torch.Tensor) -> torch.Tensor:
            return _rms(x, self.layer_norm_weight)

        def forward(self, x: torch.Tensor):  # type: ignore[override]
            return super().forward(self.normalize(x))

    def row(i: int, o: int) -> RowParallelLinear:
        return RowParallelLinear(
            i, o, config=cfg, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False,
            tp_group=tp_group
        )

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear_fc1 = NormColumn(hidden, ffn)
            self.linear_fc2 = row(ffn, hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.linear_fc1(x)
            y, _ = self.linear_fc2(torch.relu(h).square())
            return x + y

    class Mixer(nn.Module):
        """A stand-in with a fused in_proj whose rows are components [z | x] (each split over TP)."""

        def __init__(self) -> None:
            super().__init__()
            self.in_proj = NormColumn(hidden, 2 * ffn)
            self.in_proj.row_parts = [("z", ffn), ("x", ffn)]
            self.out_proj = row(ffn, hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            zx, _ = self.in_proj(x)
            z, xx = zx.chunk(2, dim=-1)  # local [z_r | x_r]
            y, _ = self.out_proj(torch.sigmoid(z) * xx)
            return x + y

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.language_model = nn.ModuleDict({"mlp": MLP(), "mixer": Mixer()})
            self.vision_model = nn.ModuleDict({"mlp": MLP()})
            self.head = nn.Linear(hidden, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.vision_model["mlp"](x)
            x = self.language_model["mixer"](self.language_model["mlp"](x))
            return self.head(x)

    model = Toy()
    load_full_toy_weights(model, full_toy_weights(hidden, ffn, seed), tp_group)
    return model


def full_toy_weights(hidden: int = 16, ffn: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    w: dict[str, torch.Tensor] = {}
    for pre in ("vision_model.mlp", "language_model.mlp"):
        w[f"{pre}.linear_fc1.weight"] = r(ffn, hidden)
        w[f"{pre}.linear_fc1.layer_norm_weight"] = 1 + 0.1 * r(hidden)
        w[f"{pre}.linear_fc2.weight"] = r(hidden, ffn)
        w[f"{pre}.linear_fc2.bias"] = 0.1 * r(hidden)
    w["language_model.mixer.in_proj.weight.z"] = r(ffn, hidden)
    w["language_model.mixer.in_proj.weight.x"] = r(ffn, hidden)
    w["language_model.mixer.in_proj.layer_norm_weight"] = 1 + 0.1 * r(hidden)
    w["language_model.mixer.out_proj.weight"] = r(hidden, ffn)
    w["language_model.mixer.out_proj.bias"] = 0.1 * r(hidden)
    w["head.weight"] = r(8, hidden)
    w["head.bias"] = 0.1 * r(8)
    return w


@torch.no_grad()
def load_full_toy_weights(model: nn.Module, full: dict[str, torch.Tensor], tp_group: Any) -> None:
    tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
    params = dict(model.named_parameters())
    for name, p in params.items():
        if ".adapter." in name:
            continue
        if name.endswith("in_proj.weight"):
            comps = [full[f"{name}.z"], full[f"{name}.x"]]
            p.copy_(torch.cat([c.chunk(tp, 0)[rank] for c in comps]))
            continue
        t = full[name]
        if p.shape == t.shape:
            p.copy_(t)
        elif p.shape[0] != t.shape[0]:
            p.copy_(t.chunk(tp, 0)[rank])
        else:
            p.copy_(t.chunk(tp, 1)[rank])


ALL_TOY_TARGETS = ("linear_fc1", "linear_fc2", "in_proj", "out_proj", "head")


def random_adapter_state(keys: list[str], shapes: dict[str, tuple[int, ...]], seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(*shapes[k], generator=g) for k in keys}


def tp_parity_worker(
    rank: int, world: int, targets: tuple[str, ...] = ALL_TOY_TARGETS, dora: bool = False
) -> dict[str, Any]:
    """Toy at TP=1 (a singleton group per rank) and at TP=world: outputs, adapter grads and state
    (``dora``: DoRA adapters, whose row-parallel norms need the TP all-reduce)."""
    from nvl_lora.config import LoRAConfig
    from nvl_lora.dora import DORA
    from nvl_lora.method import apply_lora, merge_lora
    from nvl_lora.state import adapter_keys, gather_adapter_state, load_adapter_state
    from nvlcore.parallel import init_parallel

    tpw = init_parallel(world, device_type="cpu").tp_group
    singles = [torch.distributed.new_group([r]) for r in range(world)]
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    out: dict[str, Any] = {}
    for label, group in (("tp1", singles[rank]), (f"tp{world}", tpw)):
        model = make_toy(group)
        cfg = LoRAConfig(target_modules=targets, dim=4, alpha=8, freeze_other=True)
        report = apply_lora(model, cfg, variant=DORA if dora else None)
        # Adapters with non-zero B (a fresh B is zero, which would hide layout errors).
        full = gather_adapter_state(model)
        state = random_adapter_state(sorted(full), {k: tuple(v.shape) for k, v in full.items()})
        if dora:  # magnitudes near the initial row norms, each row different
            state.update({k: full[k] * (1 + state[k]) for k in full if ".magnitude." in k})
        out.setdefault("initial_" + label, full)
        load_adapter_state(model, state)
        y = model(x)
        y.square().mean().backward()
        grads = gather_adapter_state(model, grads=True)
        keys = adapter_keys(model)
        roundtrip = gather_adapter_state(model)
        with torch.no_grad():
            merge_lora(model)
            merged_model_out = model(x)
        out[label] = {
            "y": y.detach(),
            "grads": grads,
            "state": state,
            "roundtrip": roundtrip,
            "keys": keys,
            "adapted": report.adapted,
            "merged_y": merged_model_out,
            "trainable_base": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        }
    return out


def merge_run_to_hf(toy: Any, ck: Any, tmp_path: Any) -> tuple[Any, str]:
    """``nvl convert import --dtype float32`` of the toy, then ``nvl peft merge --format hf`` of the run ``ck``
    onto it (the merge casts back to the base's dtype; the toy is bf16): ``(merged HF dir, merge's stdout)``."""
    import subprocess
    import sys

    base32 = tmp_path / "base32"
    proc = subprocess.run([sys.executable, "-m", "nvlcore", "convert", "import", "--hf-model", str(toy),
                           "--megatron-path", str(base32), "--dtype", "float32", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    merged = tmp_path / "merged_hf"
    proc = subprocess.run([sys.executable, "-m", "nvlcore", "peft", "merge", "--hf-model-path", str(toy),
                           "--lora-checkpoint", str(ck), "--pretrained", str(base32), "--output", str(merged),
                           "--format", "hf"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return merged, proc.stdout
