"""The core's one inference path (:mod:`nvlcore.inference`) with a bridge that has no loading code of
its own (the example TinyBridge): HF or checkpoint weights, and a LoRA run's checkpoint applied unmerged
or merged in memory give the trained model's logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "nvl-bridge-example"

pytestmark = pytest.mark.usefixtures("own_process_group", "one_thread")


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import nvl_bridge_example

    return nvl_bridge_example


def _logits(model: Any) -> Any:
    import torch

    ids = torch.tensor([[1, 4, 3, 9, 10, 11, 12, 5]])
    pixels = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4)
    with torch.no_grad():
        return model(ids, pixel_values=pixels).float()


def _trained_run(example: Any, hf: Path, root: Path, manager: Any) -> tuple[Path, Any]:
    """What `nvl finetune` with peft.method=lora saves: the trainable tensors (adapters and the towers LoRA
    leaves trainable), changed so that loading them matters; and the trained model's logits."""
    import torch

    from nvlcore.checkpoint import save_checkpoint
    from nvlcore.config import config_to_dict, load_config
    from nvlcore.training.peft import apply_peft_method

    rc = {"peft": {"method": "lora", "target_modules": ["linear_fc1", "linear_fc2", "output_layer"], "dim": 2,
                   "alpha": 4}}
    bridge = example.TinyBridge.from_hf_dir(hf)
    model = bridge.build_model(dtype=torch.float32, init="none")
    bridge.load_hf_weights(model, hf)
    cfg = load_config([], [], base=rc, plugins=manager)
    apply_peft_method(model, config_to_dict(cfg)["peft"], bridge=bridge, manager=manager)
    g = torch.Generator().manual_seed(0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trained:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    state = {k: v for k, v in bridge.model_components(model).items() if k in trained}
    assert state and len(state) == len(trained)
    ck = save_checkpoint(root, 5, model_state=state, run_config=rc, extra_state={"adapter_only": True})
    return ck, _logits(model)


def test_a_peft_run_loads_as_trained_unmerged_and_merged(example: Any, tmp_path: Path) -> None:
    import torch

    pytest.importorskip("nvl_lora")
    from nvlcore.inference import load_model
    from nvlcore.parallel import init_parallel
    from nvlcore.plugins import get_plugin_manager

    manager = get_plugin_manager()
    init_parallel(1, device_type="cpu")
    hf = example.write_tiny_hf_dir(tmp_path / "hf")
    run, want = _trained_run(example, hf, tmp_path / "run", manager)
    bridge = example.TinyBridge.from_hf_dir(hf)

    base = load_model(bridge, device="cpu", manager=manager)
    unmerged = load_model(bridge, adapter_checkpoint=run, device="cpu", manager=manager)
    merged = load_model(bridge, adapter_checkpoint=run, merge_adapters=True, device="cpu", manager=manager)
    assert unmerged.peft is not None and not unmerged.model.training
    assert not any(p.requires_grad for p in merged.model.parameters())
    torch.testing.assert_close(_logits(unmerged.model), want)
    torch.testing.assert_close(_logits(merged.model), want, rtol=1e-4, atol=1e-4)
    assert (_logits(base.model) - want).abs().max() > 1e-2  # the run changes the model
    # merging removed the adapters: the merged model has the base model's parameters only
    assert sorted(n for n, _ in merged.model.named_parameters()) == sorted(n for n, _ in base.model.named_parameters())


def test_checkpoint_weights_and_a_peft_run_given_as_weights(example: Any, tmp_path: Path) -> None:
    import torch

    pytest.importorskip("nvl_lora")
    from nvlcore.checkpoint import save_checkpoint
    from nvlcore.inference import load_model
    from nvlcore.parallel import init_parallel
    from nvlcore.plugins import get_plugin_manager

    manager = get_plugin_manager()
    init_parallel(1, device_type="cpu")
    hf = example.write_tiny_hf_dir(tmp_path / "hf")
    bridge = example.TinyBridge.from_hf_dir(hf)
    base = load_model(bridge, device="cpu")
    with torch.no_grad():
        for p in base.model.parameters():
            p.mul_(1.5)
    full = save_checkpoint(tmp_path / "full", 2, model_state=bridge.model_components(base.model),
                           run_config={"peft": {"method": None}})
    torch.testing.assert_close(_logits(load_model(bridge, megatron_model_path=full.parent).model), _logits(base.model))
    run, _ = _trained_run(example, hf, tmp_path / "run", manager)
    with pytest.raises(ValueError, match=f"give it as --adapter-checkpoint {run}"):
        load_model(bridge, megatron_model_path=run)
    with pytest.raises(ValueError, match="has no peft.method, so it holds full weights"):
        load_model(bridge, adapter_checkpoint=full)
