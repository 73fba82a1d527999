"""The training model is built in its storage dtypes (nvlcore.training.storage): under bf16 autocast a LoRA
run's frozen base is never held in fp32, while everything that trains, and what the bridge keeps fp32,
loads in full precision. Compared with the old path (build fp32, load, round the frozen part)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")

from nvl_lora.config import LoRAConfig  # noqa: E402
from nvl_lora.method import apply_lora  # noqa: E402
from nvlcore.training.optim import store_frozen_in_  # noqa: E402
from nvlcore.training.storage import (  # noqa: E402
    build_in_storage_dtype,
    dry_run_prepare,
    trainable_in_fp32,
)

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=3))


def prepare(model: torch.nn.Module, bridge) -> None:
    """The README's LoRA recipe: adapters on the language model, which is frozen; the vision tower trains."""
    for name, p in model.named_parameters():
        if name.startswith("language_model."):
            p.requires_grad_(False)
    apply_lora(model, LoRAConfig(target_modules=TARGETS, dim=4, alpha=8), bridge=bridge)


def _bridge(toy: Path):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(toy)


def test_the_meta_dry_run_names_what_trains(toy: Path) -> None:
    bridge = _bridge(toy)
    dry = dry_run_prepare(bridge, lambda m: prepare(m, bridge), seed=1)
    assert dry is not None and not dry.quantizes_base
    trainable = dry.trainable
    assert trainable and any(n.startswith("vision_model.") for n in trainable)
    assert not any(n.startswith("language_model.") and ".adapter." not in n for n in trainable)


def test_storage_build_equals_build_fp32_then_round(toy: Path) -> None:
    bridge = _bridge(toy)
    model, line = build_in_storage_dtype(bridge, compute_dtype=torch.bfloat16, device=torch.device("cpu"),
                                         init="none", seed=1, prepare=lambda m: prepare(m, bridge),
                                         frozen_expected=True)
    assert "bf16" in line or "bfloat16" in line
    bridge.load_hf_weights(model, toy)
    prepare(model, bridge)
    assert trainable_in_fp32(model) > 0  # the adapters, made on a bf16 base
    store_frozen_in_(model, torch.bfloat16, keep_fp32=bridge.keeps_fp32)

    old = bridge.build_model(dtype=torch.float32, device="cpu", init="none")
    bridge.load_hf_weights(old, toy)
    prepare(old, bridge)
    store_frozen_in_(old, torch.bfloat16, keep_fp32=bridge.keeps_fp32)

    new_p, old_p = dict(model.named_parameters()), dict(old.named_parameters())
    assert new_p.keys() == old_p.keys()
    frozen_bf16 = 0
    for name, p in old_p.items():
        q = new_p[name]
        assert q.dtype == p.dtype, name
        if ".adapter." in name:
            continue  # random initialisation: only the dtypes must agree
        assert torch.equal(q, p), name
        frozen_bf16 += int(q.dtype == torch.bfloat16)
    assert frozen_bf16 > 0
    # what trains and what the bridge keeps is fp32, as the checkpoint holds it
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n.endswith("A_log"))


def test_fp32_runs_and_dry_run_failures_build_in_fp32(toy: Path) -> None:
    bridge = _bridge(toy)
    model, line = build_in_storage_dtype(bridge, compute_dtype=None, device=torch.device("cpu"), init="none",
                                         seed=1, prepare=lambda m: prepare(m, bridge), frozen_expected=True)
    assert line == "built in fp32" and all(p.dtype == torch.float32 for p in model.parameters())

    def fails(m: torch.nn.Module) -> None:
        raise RuntimeError("needs real tensors")

    model, line = build_in_storage_dtype(bridge, compute_dtype=torch.bfloat16, device=torch.device("cpu"),
                                         init="none", seed=1, prepare=fails, frozen_expected=True)
    assert line == "built in fp32" and all(p.dtype == torch.float32 for p in model.parameters())


def _nf4_prepare(bridge):
    from nvl_lora.method import LoRAMethod

    def prepare_nf4(model: torch.nn.Module):
        for name, p in model.named_parameters():
            if name.startswith("language_model."):
                p.requires_grad_(False)
        method = LoRAMethod({"target_modules": TARGETS, "dim": 4, "alpha": 8, "base_dtype": "nf4"})
        method.apply(model, bridge=bridge)
        return method, None  # the shape prepare_trainable returns

    return prepare_nf4


@pytest.mark.parametrize("on_host", [None, True, False])
def test_a_quantizing_method_builds_in_host_memory_by_default(toy: Path, on_host: bool | None) -> None:
    """``model.use_cpu_initialization``: None follows the method's ``quantizes_frozen_base``; the meta device
    stands in for a GPU (any device that is not the host)."""
    bridge = _bridge(toy)
    model, line = build_in_storage_dtype(bridge, compute_dtype=torch.bfloat16, device=torch.device("meta"),
                                         init="none", seed=1, prepare=_nf4_prepare(bridge), frozen_expected=True,
                                         on_host=on_host)
    devices = {p.device.type for p in model.parameters()}
    host = on_host is not False
    # built on the device, Megatron's parallel linears still initialise on the host for any device but CUDA
    assert devices == {"cpu"} if host else "meta" in devices, (on_host, devices)
    assert ("in host memory" in line) == host, line


def test_move_to_device_moves_every_tensor_once_and_keeps_ties(toy: Path) -> None:
    from nvlcore.training.storage import move_to_device

    bridge = _bridge(toy)
    model = bridge.build_model(dtype=torch.float32, device="cpu", init="none", seed=1)
    model.language_model.tied_probe = torch.nn.Linear(2, 2)  # a second module sharing one parameter
    model.language_model.tied_probe.weight = model.vision_model.parameters().__next__()
    params_before = {id(p) for p in model.parameters()}
    split = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    assert split
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    moved = move_to_device(model, torch.device("meta"))
    assert moved == total  # a shared parameter moves once
    assert {id(p) for p in model.parameters()} == params_before
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert model.language_model.tied_probe.weight is next(model.vision_model.parameters())
    assert split == {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    assert move_to_device(model, torch.device("meta")) == 0
