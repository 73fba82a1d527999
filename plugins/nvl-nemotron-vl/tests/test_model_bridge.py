"""The bridge as the rest of nvl uses it: registry, recipe, processor, FLOPs."""

from __future__ import annotations

import torch


def test_bridge_is_registered_and_chosen_by_architecture(tiny_toy):
    import json

    from nvlcore.contracts import ModelBridge, first_matching_bridge
    from nvlcore.plugins import get_registry

    reg = get_registry("model_bridge")
    cls = reg.get("nemotron_nano_v2_vl")
    assert reg.get("nemotron_vl") is cls
    archs = json.loads((tiny_toy / "config.json").read_text())["architectures"]
    assert first_matching_bridge(archs, {"nemotron_nano_v2_vl": cls}) == "nemotron_nano_v2_vl"
    assert isinstance(cls.from_hf_dir(tiny_toy), ModelBridge)


def test_recipe_is_a_valid_config(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.config import load_config

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    sft = load_config([], [], base=bridge.recipe())
    assert sft.optimizer.lr == 2e-5 and sft.model.tensor_model_parallel_size == 4 and sft.train.global_batch_size == 32
    peft = load_config([], [], base=bridge.recipe(peft=True))
    assert peft.peft.method == "lora" and peft.peft.dim == 16 and peft.model.tensor_model_parallel_size == 2


def test_processor_output_runs_through_the_model(tiny_toy):
    from PIL import Image

    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    proc = bridge.processor()
    image = Image.new("RGB", (100, 70), (200, 40, 10))
    conv = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}
    batch = proc.collate([proc(conv), proc(conv)])
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
    loss = model(**batch)
    assert loss.shape == batch["input_ids"].shape and torch.isfinite(loss).all()
    assert (loss * batch["loss_mask"]).sum() > 0
    flops = bridge.train_flops(batch, num_parameters=0)
    tiles = batch["pixel_values"].shape[0]
    from nvl_nemotron_vl.flops import lm_forward_flops, vision_forward_flops_per_tile

    real = batch["attention_mask"].sum(1).tolist()
    assert flops == 3 * (lm_forward_flops(bridge.config, real) + tiles * vision_forward_flops_per_tile(bridge.config))


def test_flops_constants_at_the_12b_shape():
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.flops import lm_forward_flops, vision_forward_flops_per_tile
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config

    ids = {"vocab_size": 522, "<image>": 512, "<video>": 521, "bos": 1, "eos": 12, "pad": 0}
    cfg = NemotronVLConfig.from_dict(toy_config("12b-shape", ids), num_prefix_tokens=num_prefix_tokens("12b-shape"))
    # performance-anchors.md: 7.14e10 FLOP/token at 4096, 7.21e10 at 8192; ~4.75 TFLOP per tile (training)
    assert abs(3 * lm_forward_flops(cfg, [4096]) / 4096 / 7.14e10 - 1) < 0.005
    assert abs(3 * lm_forward_flops(cfg, [8192]) / 8192 / 7.21e10 - 1) < 0.005
    assert abs(3 * vision_forward_flops_per_tile(cfg) / 4.75e12 - 1) < 0.02


def test_bridge_conforms_to_the_contract(tiny_toy, own_process_group):
    """The same conformance checks as the example bridge (tests/test_bridge_contract.py)."""
    from PIL import Image

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.testing import check_model_bridge

    conv = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 48), (10, 200, 30))},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]}
    check_model_bridge(NemotronVLBridge, tiny_toy, conv, seq_length=4096)


def test_layouts_and_freeze_groups_come_from_the_table(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    layouts = bridge.linear_layouts()
    in_proj = next(layout for name, layout in layouts.items() if name.endswith("mixer.in_proj"))
    assert in_proj.norm_fused and [p for p, _ in in_proj.row_parts] == ["z", "x", "B", "C", "dt"]
    qkv = next(layout for name, layout in layouts.items() if name.endswith("self_attention.linear_qkv"))
    assert qkv.norm_fused and qkv.row_parts == ()
    assert not next(v for k, v in layouts.items() if k.endswith("linear_proj")).norm_fused
    assert set(bridge.freeze_groups) == {"language_model", "vision_model", "vision_projection"}
