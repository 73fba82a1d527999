"""FP8 training (``mixed_precision=bf16_with_fp8_current_scaling_mixed``) on this model, on the CPU.

torchao's float8 path runs on a CPU too (``torch._scaled_mm`` has a CPU kernel), so these tests run the
real FP8 casts and GEMMs of the converted layers: which linears the bridge's filter and the core's rules
choose (12B shape, on the meta device), the tiny toy's loss and gradients against the unconverted model
(with a negative control: a real change of the weights must exceed the tolerance), LoRA over an FP8
base, and checkpoints unchanged. ``nvl finetune`` itself refuses FP8 on a CPU (tests/test_fp8.py); the
GPU run is test_fp8_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao.float8")
pytest.importorskip("nvl_nemotron_vl.model")

from fp8_testing import TOLERANCE, deviation, toy_batch  # noqa: E402

from nvl_nemotron_vl.bridge import NemotronVLBridge  # noqa: E402
from nvlcore.training.fp8 import FP8_ATTR, FP8_RECIPES, apply_fp8, select_fp8_linears  # noqa: E402

RECIPE = FP8_RECIPES["bf16_with_fp8_current_scaling_mixed"]
LM = "language_model.decoder.layers."


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    kinds = (torch.nn.Linear, ColumnParallelLinear, RowParallelLinear)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def test_12b_shape_selection_is_the_language_model_minus_its_first_and_last_layer(tmp_path):
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import meta_model, num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    raw = toy_config("12b-shape", write_toy_tokenizer(tmp_path))
    cfg = NemotronVLConfig.from_dict(raw, num_prefix_tokens=num_prefix_tokens("12b-shape"))
    bridge = NemotronVLBridge(cfg)
    model = meta_model(cfg)
    layers = bridge.decoder_layers(model)
    sel = select_fp8_linears(model, RECIPE, module_filter=bridge.fp8_module_filter, decoder_layers=layers)
    last = len(layers) - 1
    lm = {n for n in _linears(model) if n.startswith(LM)}
    edge = {n for n in lm if n.startswith((f"{LM}0.", f"{LM}{last}."))}
    assert edge and set(sel.chosen) == lm - edge  # every 12B decoder linear is large and 16-divisible
    for name in edge:
        assert "first_last_layers_bf16" in sel.kept[name]
    others = set(_linears(model)) - lm
    assert {"language_model.output_layer", "vision_model.embedder"} <= others
    assert all(sel.kept[n] == "left out by the model bridge" for n in others)
    assert sel.describe().startswith(f"{len(lm - edge)} linear layer(s) in FP8, kept bf16: {len(edge)} in the first 1")


def test_bridge_filter_leaves_small_linears_and_other_towers_bf16(tiny_toy):
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    big, small = torch.nn.Linear(5120, 20480, device="meta"), torch.nn.Linear(1024, 1024, device="meta")
    assert bridge.fp8_module_filter(f"{LM}3.mlp.linear_fc1", big)
    assert not bridge.fp8_module_filter(f"{LM}3.mlp.linear_fc1", small)  # torchao's table: too small to gain
    assert not bridge.fp8_module_filter("vision_model.decoder.layers.0.mlp.linear_fc1", big)
    assert not bridge.fp8_module_filter("language_model.output_layer", big)


@pytest.fixture(scope="module")
def toy_models(tiny_toy):
    """The tiny toy (fp32 weights) and its bridge with the size rule off (its linears are all small)."""
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    bridge.fp8_small_linear = None
    return bridge, lambda: bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)


def _logits_and_grads(model: torch.nn.Module,
                      batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits, and the gradients of the mean next-token loss."""
    model.zero_grad(set_to_none=True)
    model(**batch).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).float(), grads


def test_fp8_toy_matches_the_unconverted_model_within_tolerance(toy_models):
    bridge, build = toy_models
    base, ref, fp8, unscaled = build(), build(), build(), build()
    keys = list(fp8.state_dict())
    sel = apply_fp8(fp8, RECIPE, bridge)
    # layers 1..4 of "M-*-M-"; layer 4's Mamba in_proj has 328 rows (not a multiple of 16)
    assert set(sel.chosen) == {f"{LM}1.mlp.linear_fc1", f"{LM}1.mlp.linear_fc2", f"{LM}2.self_attention.linear_qkv",
                               f"{LM}2.self_attention.linear_proj", f"{LM}3.mlp.linear_fc1", f"{LM}3.mlp.linear_fc2",
                               f"{LM}4.mixer.out_proj"}
    assert "multiple of 16" in sel.kept[f"{LM}4.mixer.in_proj"]
    assert all(hasattr(m, FP8_ATTR) == (n in sel.chosen) for n, m in _linears(fp8).items())
    # checkpoints are unaffected: same keys, same values, same classes
    assert list(fp8.state_dict()) == keys
    for a, b in zip(fp8.state_dict().values(), base.state_dict().values(), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)  # Megatron's linears add a None _extra_state
    assert {type(m) for m in fp8.modules()} == {type(m) for m in base.modules()}

    batch = toy_batch(bridge.config.llm.vocab_size)
    logits_ref, g_ref = _logits_and_grads(ref, batch)
    logits_fp8, g_fp8 = _logits_and_grads(fp8, batch)
    # FP8 really ran (not the fp32 result) and stayed within the tolerance
    dev = deviation(logits_fp8, logits_ref)
    assert 0 < dev < TOLERANCE, dev
    assert g_ref.keys() == g_fp8.keys()
    for name in sel.chosen:
        a, b = g_ref[f"{name}.weight"].flatten(), g_fp8[f"{name}.weight"].flatten()
        assert not torch.equal(a, b)
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, name
    # negative control: the bug of a missing scale (the converted weights cast to e4m3 as they are, their
    # small values flushed) computed without FP8 falls outside the tolerance
    with torch.no_grad():
        for name in sel.chosen:
            w = unscaled.get_submodule(name).weight
            w.copy_(w.to(torch.float8_e4m3fn).to(w.dtype))
    logits_bad, _ = _logits_and_grads(unscaled, batch)
    assert deviation(logits_bad, logits_ref) > TOLERANCE


def test_lora_over_an_fp8_base_trains_bf16_adapters(toy_models):
    from nvl_lora.config import LoRAConfig
    from nvl_lora.method import apply_lora

    bridge, build = toy_models
    models = []
    for fp8 in (False, True):
        model = build()
        apply_lora(model, LoRAConfig(target_modules=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
                                     dim=8, alpha=16.0), bridge=bridge)
        for n, p in model.named_parameters():  # B starts at zero: give it values so A gets a gradient
            if n.endswith("adapter.linear_out.weight"):
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
        if fp8:
            adapters = {n for n, p in model.named_parameters() if p.requires_grad}
            sel = apply_fp8(model, RECIPE, bridge, adapter_names=adapters)
            assert not any(".adapter." in n for n in sel.chosen)
            assert f"{LM}3.mlp.linear_fc1" in sel.chosen
            frozen = model.get_submodule(f"{LM}3.mlp.linear_fc1")
            assert not frozen.weight.requires_grad and hasattr(frozen, FP8_ATTR)
        models.append(model)
    batch = toy_batch(bridge.config.llm.vocab_size, seed=1)
    logits_ref, g_ref = _logits_and_grads(models[0], batch)
    logits_fp8, g_fp8 = _logits_and_grads(models[1], batch)
    assert 0 < deviation(logits_fp8, logits_ref) < TOLERANCE
    assert g_ref.keys() == g_fp8.keys() and all(".adapter." in n for n in g_fp8)  # the frozen base gets none
    # the adapters' gradients flow back through the FP8 base's input-gradient GEMMs
    a = torch.cat([g.flatten() for g in g_ref.values()])
    b = torch.cat([g.flatten() for g in g_fp8.values()])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98
