"""``model.recompute_modules`` ``mlp_act``: the language model's MLP layers free their squared ReLU's output once
``linear_fc2`` has used it and refill it in backward (output-discarding recomputation). Gradients are bit-equal
to the run that keeps it, the memory is really gone between forward and backward, an offloaded layer and full
recomputation leave it alone, and the memory plan counts the saving (CPU; the tiny toy)."""

from __future__ import annotations

import pytest
import torch

from nvlcore.training.memory import GB, PlanInputs, estimate


@pytest.fixture(scope="module")
def bridge(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy)


def _batch(bridge) -> dict[str, torch.Tensor]:
    proc = bridge.processor(seq_length=256)
    talk = [{"conversation": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("Say something about boats, at some length please.", "Boats float on water."),
                         ("And trains?", "Trains run on rails and carry people and goods over land."))]
    return proc.collate([proc(c) for c in talk])


def _mlps(model) -> list:
    return [layer.mlp for layer in model.language_model.decoder.layers if hasattr(layer, "mlp")]


def _run(model, batch, mlps=None) -> tuple[list[int], dict[str, torch.Tensor]]:
    """(bytes each MLP's fc2 input still holds when the forward ends, every gradient after backward); ``mlps``:
    the MLPs to watch (default the language model's)."""
    inputs = []
    hooks = [m.linear_fc2.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for m in (_mlps(model) if mlps is None else mlps)]
    model.zero_grad(set_to_none=True)
    loss = (model(**batch) * batch["loss_mask"]).sum()
    held = [t.untyped_storage().nbytes() for t in inputs]
    loss.backward()
    for h in hooks:
        h.remove()
    return held, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_then_mlp_act(bridge):
    """(model, batch, what the reference run kept, its gradients): run with the Mamba mixers recomputed, then
    switched to recompute the MLP activation too."""
    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    batch = _batch(bridge)
    bridge.set_recompute(model, "selective", ["mamba"])
    kept, ref = _run(model, batch)
    bridge.set_recompute(model, "selective", ["mamba", "mlp_act"])
    return model, batch, kept, ref


def test_the_activation_is_freed_until_backward_and_gradients_are_bit_equal(bridge):
    model, batch, kept, ref = _reference_then_mlp_act(bridge)
    assert all(m.recompute_act for m in _mlps(model)) and len(_mlps(model)) >= 2
    freed, grads = _run(model, batch)
    assert all(b > 0 for b in kept) and freed == [0] * len(kept)
    assert grads.keys() == ref.keys()
    for n in ref:
        assert torch.equal(grads[n], ref[n]), n


def test_the_vision_towers_gelu_output_is_freed_too_unless_its_layers_are_recomputed(bridge):
    """A receipt-like sample with an image: the trained vision tower's MLPs free their GELU output as well, every
    gradient bit-equal; with ``vision_tower`` recomputed (each ViT layer keeps only its input) they do not."""
    from PIL import Image

    proc = bridge.processor(seq_length=512)
    talk = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64), (200, 10, 10))},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."}]}
    batch = proc.collate([proc(talk)])
    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    vit = [layer.mlp for layer in model.vision_model.decoder.layers]

    def run(modules):
        bridge.set_recompute(model, "selective", modules)
        return _run(model, batch, vit)

    kept, ref = run(["mamba"])
    freed, grads = run(["mamba", "mlp_act"])
    assert len(kept) == len(vit) and all(b > 0 for b in kept) and freed == [0] * len(vit)
    for n in ref:
        assert torch.equal(grads[n], ref[n]), n
    bridge.set_recompute(model, "selective", ["mamba", "mlp_act", "vision_tower"])
    assert not any(m.recompute_act for m in vit) and all(m.recompute_act for m in _mlps(model))


def test_a_wrong_refill_changes_the_gradients(bridge, monkeypatch):
    """Negative control: the refilled values are what backward reads (a refill 1% off moves the gradients of
    everything before the MLP)."""
    import nvl_nemotron_vl.model.mlp as mlp_module

    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    batch = _batch(bridge)
    bridge.set_recompute(model, "selective", ["mamba", "mlp_act"])
    _, right = _run(model, batch)
    real = mlp_module.discard_until_backward
    monkeypatch.setattr(mlp_module, "discard_until_backward",
                        lambda t, after, again: real(t, after, lambda: again() * 1.01))
    _, wrong = _run(model, batch)
    fc2 = [n for n in right if "linear_fc2.weight" in n]
    assert fc2 and all(not torch.allclose(wrong[n], right[n]) for n in fc2)


def test_offloaded_layers_and_full_recomputation_keep_the_activation(bridge):
    from nvlcore.training.offload import offload_activations

    model, batch, _, ref = _reference_then_mlp_act(bridge)
    layers = list(model.language_model.decoder.layers)
    n = max(i for i, layer in enumerate(layers) if hasattr(layer, "mlp"))  # every MLP layer but the last offloaded
    offloader = offload_activations(layers, n)
    try:
        held, grads = _run(model, batch)
    finally:
        offloader.remove()
    assert held[:-1] == [b for b in held[:-1] if b > 0] and held[-1] == 0  # the host copy is what backward reads
    for name in ref:
        assert torch.equal(grads[name], ref[name]), name
    bridge.set_recompute(model, "full")
    assert not any(m.recompute_act for m in _mlps(model))


def test_the_plan_counts_the_freed_activation(tmp_path):
    """At the 12b shape, selective recomputation with mlp_act keeps 40 KB a token less per MLP layer (the bf16
    squared ReLU output of 20,480 values) and, in a trained vision tower not recomputed, 10 KB a ViT token per
    layer (its GELU output); full recomputation, and a recomputed vision tower, are unchanged."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    ids = write_toy_tokenizer(tmp_path)
    cfg = NemotronVLConfig.from_dict(toy_config("12b-shape", ids), num_prefix_tokens=num_prefix_tokens("12b-shape"))
    big = NemotronVLBridge(cfg)
    mlp_layers = cfg.llm.layer_types.count("mlp")

    def lm(recompute, modules):
        inp = PlanInputs(workload=(2535, 0), recompute=recompute, recompute_modules=modules, peft=True,
                         freeze_other=True, target_modules=("*language_model*.linear_fc2",))
        return estimate(big, inp).activations["language model"]

    saved = lm("selective", ("mamba",)) - lm("selective", ("mamba", "mlp_act"))
    assert saved == pytest.approx(2535 * mlp_layers * 2 * cfg.llm.intermediate_size)
    assert 2.5 * GB < saved < 3.2 * GB
    assert lm("full", ("mamba", "mlp_act")) == lm("full", ("mamba",))

    def vit(modules):  # 7 tiles, the tower trained fully (the LoRA recipe)
        inp = PlanInputs(workload=(2535, 7), recompute="selective", recompute_modules=modules, peft=True,
                         freeze_other=True, target_modules=("*language_model*.linear_fc2",),
                         frozen_groups={"language_model": True, "vision_model": False, "vision_projection": False})
        return estimate(big, inp).activations["vision tower"]

    v = cfg.vision
    tile_tokens = v.num_prefix_tokens + cfg.grid**2
    assert vit(("mamba",)) - vit(("mamba", "mlp_act")) == pytest.approx(
        7 * tile_tokens * v.num_layers * 2 * v.intermediate_size * 1.2)
    assert vit(("mamba", "mlp_act", "vision_tower")) == vit(("mamba", "vision_tower"))


def test_the_plans_selective_mamba_layer_is_what_autograd_keeps(bridge):
    """A Mamba layer under selective recomputation keeps its norm's input and the recomputed mixer's input,
    in_proj's output z|x|B|C|dt, which the checkpoint holds (the tiny toy, frozen LM under bf16 autocast on CPU,
    gradients flowing from the embedding as from a trained vision tower). The plan counts both, plus the norm's
    output that an adapter on in_proj would keep; until this test it counted only the norm's input and output,
    ~35 KB a token per Mamba layer short at the 12B shape."""
    import nvl_nemotron_vl.memory as nm

    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    bridge.set_recompute(model, "selective", ["mamba"])
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("language_model") or "embedding" in name)
    batch = _batch(bridge)
    layers = list(model.language_model.decoder.layers)
    assert hasattr(layers[0], "mixer")  # the first layer is a Mamba layer
    inside, kept = [False], {}
    layers[0].register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
    layers[0].register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))

    def pack(t):
        if inside[0] and not isinstance(t, torch.nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    measured = sum(kept.values()) / batch["input_ids"].numel()
    cfg, h = bridge.config, bridge.config.llm.hidden_size
    # the plan's bytes for layer 0: what offloading that one layer takes away
    plan = nm.lm_bytes_per_token(cfg, tp=1, res=4, recompute="selective") - nm.lm_bytes_per_token(
        cfg, tp=1, res=4, recompute="selective", offload_layers=1)
    assert plan - 2 * h <= measured <= plan, (measured, plan)
    assert measured > 4 * h + 2 * h + 2 * h  # the old count: norm input and output (and a little for rstd)
