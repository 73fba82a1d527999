"""CUDA-graph scopes of the Nemotron VL bridge on the CPU (the capture itself: test_cuda_graphs_gpu.py).

* ``cuda_graph_modules`` picks the LM's Mamba / MLP layers per scope and switches them to tensor-only
  calls; an unknown scope is refused naming the key;
* in that mode every graphed layer's training call is tensors-or-None of the batch's shape (what
  ``nvlcore.training.cuda_graphs`` records and captures), packed rows as their ``seq_idx`` alone;
* the fixed-shape path computes the same loss and gradients as the usual one on packed rows, and a
  shifted sample boundary changes them (the negative control).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")


def _packed_batch(vocab: int, shift: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 1, (2, 40), generator=g)
    lengths = [[7, 12 + shift, 21 - shift], [19, 21]]
    seq_idx = torch.cat([torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(row)])[None]
                         for row in lengths])
    return {"input_ids": ids, "labels": ids.roll(-1, dims=1), "seq_idx": seq_idx}


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).sum()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_scopes_pick_the_layers_and_switch_them_to_tensor_calls(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.model.lm import MambaLayer, MLPLayer

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    assert set(bridge.cuda_graph_scopes) == {"mamba", "mlp"}
    model = bridge.build_model(dtype=torch.float32, device="cpu")
    mamba = bridge.cuda_graph_modules(model, ["mamba"])
    assert list(mamba) == ["language_model.decoder.layers.0", "language_model.decoder.layers.4"]  # "M-*-M-"
    assert all(isinstance(m, MambaLayer) and m.graph_inputs and m.mixer.fixed_shape_packing for m in mamba.values())
    layers = model.language_model.decoder.layers
    assert not layers[1].graph_inputs and not layers[2].graph_inputs  # the MLP and attention layers untouched
    both = bridge.cuda_graph_modules(bridge.build_model(dtype=torch.float32, device="cpu"), ["mlp", "mamba"])
    assert [n.rsplit(".", 1)[1] for n in both] == ["0", "1", "3", "4", "5"]  # forward order whatever the scope order
    assert all(isinstance(m, (MambaLayer, MLPLayer)) for m in both.values())
    with pytest.raises(ValueError, match=r"model.cuda_graph_scope: 'attn' is not one of mamba, mlp"):
        bridge.cuda_graph_modules(model, ["attn"])


def test_graphed_layers_are_called_with_tensors_of_the_batch_shape(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.training.cuda_graphs import LayerGraphs

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
    said: list[str] = []
    graphs = LayerGraphs(bridge.cuda_graph_modules(model, ["mamba", "mlp"]), warmup_steps=1, say=said.append)
    batch = _packed_batch(bridge.config.llm.vocab_size)
    model.train()
    model(**batch).sum().backward()
    assert not said, said  # no layer fell back (a non-tensor argument would be named here)
    hidden = bridge.config.llm.hidden_size
    for e in graphs.entries:
        h, mask, cache, seq_idx = e.signature
        assert h[0] == (2, 40, hidden) and mask is None and cache is None
        assert seq_idx[0] == (2, 40) and seq_idx[1] == torch.int32


def test_the_fixed_shape_path_matches_the_usual_one_on_packed_rows(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    usual, fixed = (bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True) for _ in range(2))
    bridge.cuda_graph_modules(fixed, ["mamba", "mlp"])
    for m in (usual, fixed):
        m.train()
    batch = _packed_batch(bridge.config.llm.vocab_size)
    loss_u, grads_u = _loss_and_grads(usual, batch)
    loss_f, grads_f = _loss_and_grads(fixed, batch)
    assert loss_f == pytest.approx(loss_u, rel=1e-6)
    assert grads_u.keys() == grads_f.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-5, atol=1e-6, msg=name)
    # negative control: a sample boundary moved by one token must show in the loss
    loss_shifted, _ = _loss_and_grads(fixed, _packed_batch(bridge.config.llm.vocab_size, shift=1))
    assert abs(loss_shifted - loss_u) > 1e-4 * abs(loss_u)
