"""The precision-aware optimizer fully offloaded (megatron-core's layout: bf16 weights on the GPU, fp32 main
grads, fp32 masters on the host) stores only the linear layers' weights in bf16, because bf16 autocast computes
every matmul on the bf16 rounding of an fp32 weight anyway: on the tiny toy, text and image micro-batches
accumulated under bf16 autocast give bit-equal gradients to fp32 weights, every parameter. Storing the other
weights of >= 2 dims in bf16 too (the embedding, the vision tower's position embedding, the two linear weights
whose dtype the model reads for its activations, ...) changes them (negative control). CPU autocast stands in for
a GPU's."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def bridge(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy)


def _batches(bridge) -> list[dict[str, torch.Tensor]]:
    from PIL import Image

    proc = bridge.processor(seq_length=512)
    text = {"conversation": [{"role": "user", "content": "Say something about boats, please."},
                             {"role": "assistant", "content": "Boats float on water."}]}
    image = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64), (200, 10, 10))},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."}]}
    return [proc.collate([proc(text)]), proc.collate([proc(image)])]


def _accumulate(model, batches) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient summed over ``batches`` under bf16 autocast (fp32 main grads where
    a parameter has one)."""
    from nvlcore.training.grads import grad_of, zero_grads

    params = dict(model.named_parameters())
    zero_grads(params.values())
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(**batch).float() * batch["loss_mask"]).sum()
            loss.backward()
    return {n: grad_of(p).clone() for n, p in params.items() if grad_of(p) is not None}


def _store_bf16(model, names: set[str]) -> int:
    from nvlcore.training.host_offload import HostOffloadAdamW

    named = list(model.named_parameters())
    opt = HostOffloadAdamW([{"params": [p for _, p in named]}], offload_fraction=1.0)
    chosen = {id(p) for n, p in named if n in names}
    return opt.store_params_in(torch.bfloat16, keep=lambda p: id(p) not in chosen, main_grads=True)


@pytest.mark.parametrize("stored", ["bridge", "with_dtype_setting", "every_matrix"])
def test_bf16_linear_weights_with_fp32_main_grads_give_the_fp32_gradients(bridge, stored: str):
    from nvlcore.bridge import matmul_weight_names

    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    bridge.set_recompute(model, "selective", ["mamba", "mlp_act"])
    batches = _batches(bridge)
    ref = _accumulate(model, batches)
    linear = set(bridge.matmul_weights())
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert "language_model.embedding.word_embeddings.weight" in matrices - linear  # not a matmul's weight
    assert any(n.startswith("vision_model.") for n in linear) and "language_model.output_layer.weight" in linear
    # the weights whose dtype the model reads for its activations are left out of what the generic rule finds
    assert matmul_weight_names(model) - linear == set(bridge.dtype_setting_weights)
    names = {"bridge": linear, "with_dtype_setting": matmul_weight_names(model), "every_matrix": matrices}[stored]
    assert _store_bf16(model, names) == sum(p.numel() for n, p in model.named_parameters() if n in names)
    got = _accumulate(model, batches)
    assert got.keys() == ref.keys()
    assert all(got[n].dtype == torch.float32 for n in got)
    same = [n for n in ref if torch.equal(got[n], ref[n])]
    if stored != "bridge":  # negative controls: a weight whose dtype the activations take moves them
        assert len(same) < len(ref)
    else:
        assert same == list(ref), sorted(set(ref) - set(same))[:5]
        assert all(p.grad is None for p in model.parameters() if getattr(p, "main_grad", None) is not None)
