"""FP8 ``mixed_precision`` recipes: accepted and refused names, the device check, the generic conversion.

The model's own selection and the toy's numerics are plugins/nvl-nemotron-vl/tests/test_fp8.py; the GPU
loss against bf16 is plugins/nvl-nemotron-vl/tests/test_fp8_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from nvlcore.config import ConfigError, load_config
from nvlcore.config.refused import FP8_REFUSED
from nvlcore.training.fp8 import FP8_ATTR, FP8_RECIPES, check_fp8_device, fp8_recipe, is_bf16_precision

FP8 = "bf16_with_fp8_current_scaling_mixed"


def test_the_current_scaling_recipe_is_accepted_and_computes_in_bf16():
    cfg = load_config([], [f"mixed_precision={FP8}"])
    assert cfg.mixed_precision == FP8 and fp8_recipe(FP8) is FP8_RECIPES[FP8]
    assert (FP8_RECIPES[FP8].scaling, FP8_RECIPES[FP8].bf16_layers_at_start, FP8_RECIPES[FP8].bf16_layers_at_end) \
        == ("tensorwise", 1, 1)  # Megatron-Bridge's recipe: per-tensor current scaling, first/last layer bf16
    assert is_bf16_precision(FP8) and is_bf16_precision("bf16_mixed") and not is_bf16_precision("fp32")
    assert fp8_recipe("bf16_mixed") is None and fp8_recipe(None) is None

    from nvlcore.training.finetune import loop_settings
    from nvlcore.training.memory import PlanInputs

    cfg.train.global_batch_size, cfg.train.micro_batch_size = 2, 1
    assert loop_settings(cfg, dp_size=1, device_type="cuda").autocast_dtype == torch.bfloat16
    assert PlanInputs.from_config(cfg).autocast


@pytest.mark.parametrize("name", sorted(FP8_REFUSED))
def test_the_other_megatron_bridge_fp8_recipes_are_refused_in_one_line(name):
    with pytest.raises(ConfigError) as err:
        load_config([], [f"mixed_precision={name}"])
    msg = str(err.value)
    assert "\n" not in msg and f"mixed_precision={name!r}" in msg and f"use {FP8}" in msg


def test_optimizer_bf16_false_under_an_fp8_recipe_is_refused():
    with pytest.raises(ConfigError, match=f"optimizer.bf16=False has no effect: mixed_precision={FP8}"):
        load_config([], [f"mixed_precision={FP8}", "optimizer.bf16=false"])


def test_a_cpu_or_an_older_gpu_is_refused_in_one_line(monkeypatch):
    recipe = FP8_RECIPES[FP8]
    with pytest.raises(ValueError, match=f"mixed_precision={FP8} needs a CUDA GPU .* this run is on cpu: use bf16"):
        check_fp8_device(recipe, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"needs compute capability 8.9 or newer .* NVIDIA A100 is 8.0: use bf16"):
        check_fp8_device(recipe, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(recipe, torch.device("cuda", 0))  # Hopper passes


class _Bridge:
    """The two bridge calls :func:`apply_fp8` makes, over a stack of plain linear "decoder layers"."""

    name = "stack"

    def __init__(self, layers: int | None, left_out: str = "") -> None:
        self.layers, self.left_out = layers, left_out

    def num_decoder_layers(self) -> int | None:
        return self.layers

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.layers)

    def fp8_module_filter(self, name: str, module: nn.Module) -> bool:
        return name != self.left_out


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)] + [nn.Linear(32, 24)])
        self.head = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def test_plain_linears_run_fp8_in_place_with_hooks_and_state_dict_kept():
    pytest.importorskip("torchao.float8")
    from nvlcore.training.fp8 import apply_fp8

    ref, model = _Stack(), _Stack()
    keys = list(model.state_dict())
    calls = []
    model.layers[2].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    sel = apply_fp8(model, FP8_RECIPES[FP8], _Bridge(5, left_out="head"))
    # layer 0 and 4 are the first/last decoder layers; layer 4 is also 24-wide; the bridge left out the head
    assert list(sel.chosen) == ["layers.1", "layers.2", "layers.3"]
    assert sel.kept["layers.0"].startswith("in the first 1 / last 1")
    assert sel.kept["head"] == "left out by the model bridge"
    assert [n for n, m in model.named_modules() if hasattr(m, FP8_ATTR)] == ["layers.1", "layers.2", "layers.3"]
    assert list(model.state_dict()) == keys and all(type(m) is nn.Linear for m in model.layers)
    x = torch.randn(8, 32)
    want, got = ref(x), model(x)
    got.sum().backward()
    assert calls == [torch.Size([8, 32])]  # the forward hook still runs
    assert not torch.equal(got, want) and (got - want).norm() / want.norm() < 0.05
    assert model.layers[1].weight.grad is not None and model.layers[1].bias.grad is not None


def test_a_bridge_without_decoder_layers_is_refused():
    from nvlcore.training.fp8 import apply_fp8

    with pytest.raises(ValueError, match="does not list its decoder layers .* use bf16_mixed"):
        apply_fp8(_Stack(), FP8_RECIPES[FP8], _Bridge(None))


@pytest.mark.slow
def test_nvl_finetune_refuses_fp8_on_a_cpu_in_one_line_before_building(tmp_path):
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    toy = write_toy_checkpoint(tmp_path / "toy", "tiny", seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "nvlcore.cli", "finetune", "--hf-model-path", str(toy),
                           "--pretrained-checkpoint", str(toy), "model.tensor_model_parallel_size=1",
                           f"mixed_precision={FP8}", f"checkpoint.save={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"mixed_precision={FP8} needs a CUDA GPU" in errors[0]
    assert "model " not in proc.stdout  # refused before the model was built
