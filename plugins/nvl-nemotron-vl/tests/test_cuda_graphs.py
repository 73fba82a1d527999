"""CUDA-graph scopes of the Nemotron VL bridge on the CPU (the capture itself: test_cuda_graphs_gpu.py).

* ``cuda_graph_modules`` picks the LM's Mamba / MLP layers per scope and switches them to tensor-only
  calls; an unknown scope is refused naming the key;
* in that mode every graphed layer's training call is tensors-or-None of the batch's shape (what
  ``nvlcore.training.cuda_graphs`` records and captures), packed rows as their ``seq_idx`` alone;
* the fixed-shape path computes the same loss and gradients as the usual one on packed rows, and a
  shifted sample boundary changes them (the negative control);
* the per-layer graphs' logic with ``make_graphed_callables`` emulated by static buffers: the graphed model trains
  as the eager one (negative controls: swapped graphs; no zeroed ``.grad`` before the step).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")


def _packed_batch(vocab: int, shift: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab - 1, 500), (2, 40), generator=g)  # below the toy's context tokens (512, 521)
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


class _StaticReplay(torch.autograd.Function):
    """What a graphed callable's autograd node does, on the CPU: copy the inputs into static buffers, "replay"
    (run the layer on them), return the static outputs; backward returns the input gradients in static buffers
    and hands the parameters' gradients over, as a captured backward does."""

    @staticmethod
    def forward(ctx, graph, *inputs):
        ctx.graph = graph
        return graph.forward(inputs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.graph.backward(grads))


class _EmulatedGraph:
    def __init__(self, module, sample):
        self.module, self.params = module, [p for p in module.parameters() if p.requires_grad]
        self.static_in = [a.detach().clone().requires_grad_(a.requires_grad) for a in sample]
        self.static_out: list | None = None
        self.static_grads: list | None = None

    def forward(self, inputs):
        for s, x in zip(self.static_in, inputs, strict=True):
            s.data.copy_(x.data)
        with torch.enable_grad():
            out = self.module(*self.static_in)
        self.live = out if isinstance(out, tuple) else (out,)
        if self.static_out is None:
            self.static_out = [o.detach().clone() for o in self.live]
        for s, o in zip(self.static_out, self.live, strict=True):
            s.copy_(o.detach())
        return tuple(s.detach() for s in self.static_out)

    def backward(self, grads):
        wanted = [s for s in self.static_in if s.requires_grad]
        got = torch.autograd.grad(self.live, wanted + self.params, grads, allow_unused=True)
        if self.static_grads is None:
            self.static_grads = [None if g is None else torch.zeros_like(g) for g in got]
        for s, g in zip(self.static_grads, got, strict=True):
            if g is not None:
                s.copy_(g)
        for p, g in zip(self.params, self.static_grads[len(wanted):], strict=True):
            if g is not None:  # a captured backward's parameter gradient: the static buffer itself
                p.grad = g if p.grad is None else p.grad.add_(g)
        it = iter(self.static_grads[:len(wanted)])
        return [next(it) if s.requires_grad else None for s in self.static_in]


def _emulated_make_graphed_callables(callables, sample_args, allow_unused_input=False):
    graphs = [_EmulatedGraph(m, args) for m, args in zip(callables, sample_args, strict=True)]
    return tuple((lambda *inputs, g=g: (lambda out: out[0] if len(out) == 1 else out)(
        _StaticReplay.apply(g, *inputs))) for g in graphs)


def test_layer_graphs_train_like_eager_layers_with_graph_replay_emulated(tiny_toy, monkeypatch):
    """The logic of test_cuda_graphs_gpu.py's first test on the CPU: make_graphed_callables replaced by static
    buffers replayed as a graph would be (no capture, no autocast). The graphed model's losses and gradients equal
    the eager model's over steps of two micro-batches (gradient accumulation through the static parameter
    gradients), every graphed layer replays on both; negative control: two layers' graphs swapped."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.training.cuda_graphs import LayerGraphs

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _emulated_make_graphed_callables)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    eager, graphed = (bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True) for _ in range(2))
    bridge.cuda_graph_modules(eager, ["mamba", "mlp"])
    said: list[str] = []
    graphs = LayerGraphs(bridge.cuda_graph_modules(graphed, ["mamba", "mlp"]), warmup_steps=1, say=said.append)

    def step(model, shifts, graphs=None):
        model.zero_grad(set_to_none=True)
        if graphs is not None:
            graphs.before_step()
        loss = sum(float(_loss_and_grads_accumulating(model, _packed_batch(bridge.config.llm.vocab_size, s)))
                   for s in shifts)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for m in (eager, graphed):
        m.train()
    step(graphed, [0, 1], graphs), step(eager, [0, 1])
    graphs.after_step(1)
    assert graphs.captured and graphs.failed is None, said
    for shifts in ([2, 0], [1, 2]):
        before = graphs.replays
        (loss_g, grads_g), (loss_e, grads_e) = step(graphed, shifts, graphs), step(eager, shifts)
        assert graphs.replays - before == 2 * len(graphs.entries)
        assert loss_g == pytest.approx(loss_e, rel=1e-6) and grads_g.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_g[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)
    graphs.entries[0].graphed, graphs.entries[3].graphed = graphs.entries[3].graphed, graphs.entries[0].graphed
    (loss_g, _), (loss_e, _) = step(graphed, [0, 0], graphs), step(eager, [0, 0])
    assert abs(loss_g - loss_e) > 1e-4 * abs(loss_e)


def _loss_and_grads_accumulating(model, batch):
    loss = model(**batch).sum()
    loss.backward()
    return loss.detach()
