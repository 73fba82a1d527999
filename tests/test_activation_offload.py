"""Activation offloading (``model.cpu_offloading``, issue 22): the loss and every gradient equal the run
without it (bitwise on the CPU, with and without recompute), a corrupted host copy is caught (negative
control), the keys are checked at load, and on a GPU the peak allocated memory falls."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune_cli import raven, toy  # noqa: E402,F401  (module fixtures: the tiny toy, a Raven-schema set)


def _model(seed: int = 0, recompute: bool = False):
    import torch
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(64), nn.Linear(64, 256), nn.Linear(256, 64)

        def forward(self, x):
            body = lambda y: self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(y))))  # noqa: E731
            return x + (checkpoint(body, x, use_reentrant=False) if recompute else body(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(4))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    torch.manual_seed(seed)
    return Net()


def _loss_and_grads(offload: int, *, recompute: bool = False, offloader_cls=None, device: str = "cpu"):
    import torch

    from nvlcore.training import offload as off

    net = _model(recompute=recompute).to(device)
    handle = None
    if offload:
        handle = (offloader_cls or off.ActivationOffloader)(list(net.layers), offload)
    x = torch.randn(8, 32, 64, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.randint(0, 10, (8, 32), generator=torch.Generator().manual_seed(2)).to(device)
    loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in net.named_parameters()}
    return loss.detach().cpu(), grads, handle


@pytest.mark.parametrize("recompute", [False, True])
def test_offloaded_run_gives_the_same_loss_and_gradients_bitwise(recompute: bool) -> None:
    import torch

    loss0, g0, _ = _loss_and_grads(0, recompute=recompute)
    loss1, g1, off = _loss_and_grads(3, recompute=recompute)
    assert off.offloaded_bytes > 0  # the hooks did take the saved activations
    assert torch.equal(loss0, loss1)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_a_corrupted_host_copy_changes_the_gradients() -> None:
    """Negative control: the comparison above sees a wrong activation coming back."""
    import torch

    from nvlcore.training.offload import ActivationOffloader

    class Corrupting(ActivationOffloader):
        def _pack(self, index, t):
            packed = super()._pack(index, t)
            if not isinstance(packed, torch.Tensor):
                packed.host.mul_(1.001)
            return packed

    _, g0, _ = _loss_and_grads(0)
    _, g1, _ = _loss_and_grads(3, offloader_cls=Corrupting)
    assert any(not torch.equal(g0[n], g1[n]) for n in g0)


def test_the_model_is_told_while_an_offloaded_layer_runs_and_remove_undoes_a_raised_forward() -> None:
    """``nvlcore.bridge.saved_tensors_offloaded()`` is true inside the offloaded layers' forwards only (a model's
    output-discarding recomputation skips them); a forward that raised inside one leaves its saved-tensor hooks
    entered, and ``remove`` leaves them, so nothing after it is packed to the host."""
    import torch

    from nvlcore.bridge import saved_tensors_offloaded
    from nvlcore.training import offload as off

    net = _model()
    seen = []
    for layer in net.layers:
        layer.fc1.register_forward_pre_hook(lambda m, a: seen.append(saved_tensors_offloaded()))
    handle = off.ActivationOffloader(list(net.layers), 2)
    net(torch.randn(2, 3, 64))
    assert seen == [True, True, False, False] and not saved_tensors_offloaded()

    def boom(module, args):
        raise RuntimeError("out of memory, say")

    trap = net.layers[1].fc2.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        net(torch.randn(2, 3, 64))
    assert saved_tensors_offloaded()
    trap.remove()
    handle.remove()
    assert not saved_tensors_offloaded()
    before = handle.offloaded_bytes
    net(torch.randn(2, 3, 64, requires_grad=True)).sum().backward()
    assert handle.offloaded_bytes == before


def test_layer_count_outside_the_model_is_refused() -> None:
    from nvlcore.training.offload import offload_activations

    net = _model()
    for n in (0, 4):
        with pytest.raises(ValueError, match=f"cpu_offloading_num_layers={n}: choose 1 to 3"):
            offload_activations(list(net.layers), n)


@pytest.mark.parametrize("overrides, needle", [
    (["model.cpu_offloading_weights=true"], "model.cpu_offloading_weights=True is not supported by nvl"),
    (["model.cpu_offloading=true", "model.cpu_offloading_activations=false"],
     "model.cpu_offloading_activations=False is not supported"),
    (["model.cpu_offloading_num_layers=2"], "has no effect without model.cpu_offloading=true"),
    (["model.cpu_offloading=true"], "needs model.cpu_offloading_num_layers >= 1"),
])
def test_offloading_keys_are_checked_at_load(overrides: list[str], needle: str) -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert needle in str(err.value), str(err.value)


def test_a_bridge_without_a_layer_list_refuses_offloading() -> None:
    from types import SimpleNamespace

    from nvlcore.bridge import ModelBridge

    with pytest.raises(ValueError, match="bridge 'tiny' does not list its decoder layers"):
        ModelBridge.decoder_layers(SimpleNamespace(name="tiny"), None)  # type: ignore[arg-type]


def test_gpu_offloading_lowers_peak_memory_and_keeps_the_gradients() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    peaks = []
    results = []
    for n in (0, 3):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        results.append(_loss_and_grads(n, device="cuda"))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    (l0, g0, _), (l1, g1, _) = results
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert peaks[1] < peaks[0], peaks


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_toy_nemotron_packed_lora_run_with_offloading_gives_the_same_losses(toy, raven, tmp_path, recompute) -> None:  # noqa: F811
    """Through `nvl finetune` on the tiny toy: LoRA on the language model, packed rows, recompute; the
    first 3 of its 6 hybrid layers offloaded. Same losses, bit for bit, as without offloading."""
    from test_finetune_cli import losses, nvl, run_args

    common = ["--lora-on-language-model", "train.train_iters=3", "train.global_batch_size=2",
              "checkpoint.save_interval=3", "scheduler.lr_warmup_iters=1", "dataset.packing=best_fit",
              "dataset.packing_buffer_size=7",
              f"model.recompute_granularity={recompute}"]
    nvl(*run_args(toy, raven, tmp_path / "plain", *common))
    proc = nvl(*run_args(toy, raven, tmp_path / "offload", *common, "model.cpu_offloading=true",
                         "model.cpu_offloading_num_layers=3"))
    assert "activations of the first 3 decoder layers offloaded to host memory" in proc.stdout
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "offload")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a == b, (a, b)


def test_offloading_on_a_bridge_without_a_layer_list_is_an_error_naming_the_key(tmp_path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "trainer_support"))
    import tiny_plugin
    from run_tiny import DEFAULTS

    from nvlcore.config import load_config, resolve_config
    from nvlcore.training.finetune import run_finetune

    hf = tiny_plugin.write_tiny_hf_dir(tmp_path / "hf")
    manager = tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           "train.train_iters=1", "scheduler.lr_warmup_iters=0", "model.cpu_offloading=true",
                           "model.cpu_offloading_num_layers=1"], plugins=manager)
    resolve_config(cfg)
    with pytest.raises(ValueError, match="model.cpu_offloading=true: model bridge 'tiny_vlm' does not list"):
        run_finetune(cfg, manager=manager, device_type="cpu", print_fn=lambda *a: None)
