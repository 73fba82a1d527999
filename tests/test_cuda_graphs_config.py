"""``model.cuda_graph_impl`` / ``cuda_graph_scope`` / ``cuda_graph_warmup_steps`` (megatron-core's keys):
refused at load in one line naming the key where nvl cannot graph, accepted with fixed-shape batches;
the dispatcher's CPU-checkable parts (signatures, recording, the capture precondition). The capture
itself needs CUDA: plugins/nvl-nemotron-vl/tests/test_cuda_graphs_gpu.py."""

from __future__ import annotations

import pytest

GRAPHS = ["model.cuda_graph_impl=local", "model.cuda_graph_scope=[mamba]", "model.tensor_model_parallel_size=1"]


@pytest.mark.parametrize("overrides, key, needle", [
    (["model.cuda_graph_impl=transformer_engine"], "model.cuda_graph_impl", "no Transformer Engine"),
    (["model.cuda_graph_impl=local", "model.tensor_model_parallel_size=1", "dataset.pad_to_max_length=true"],
     "model.cuda_graph_scope", "model.cuda_graph_scope='full' is not supported"),
    ([*GRAPHS, "model.cuda_graph_scope=full_iteration", "dataset.pad_to_max_length=true"],
     "model.cuda_graph_scope", "is not supported by nvl"),
    (["model.cuda_graph_scope=[mamba]"], "model.cuda_graph_scope", "has no effect without"),
    (["model.cuda_graph_warmup_steps=5"], "model.cuda_graph_warmup_steps", "has no effect without"),
    ([*GRAPHS, "model.cuda_graph_warmup_steps=0", "dataset.pad_to_max_length=true"],
     "model.cuda_graph_warmup_steps", "at least 1 eager step"),
    (GRAPHS, "dataset.pad_to_max_length", "needs fixed-shape batches"),
    ([*GRAPHS, "dataset.pad_to_max_length=true", "model.recompute_granularity=selective"],
     "model.recompute_granularity", "cannot be combined with model.recompute_granularity"),
    ([*GRAPHS, "dataset.packing=best_fit", "model.cpu_offloading=true", "model.cpu_offloading_num_layers=1"],
     "model.cpu_offloading", "cannot be combined with model.cpu_offloading"),
    (["model.cuda_graph_impl=local", "model.cuda_graph_scope=mamba", "model.tensor_model_parallel_size=2",
      "dataset.packing=best_fit"], "model.tensor_model_parallel_size", "tensor-parallel all-reduces"),
    ([*GRAPHS, "dataset.packing=best_fit", "mixed_precision=bf16_with_fp8_current_scaling_mixed"],
     "mixed_precision", "FP8 matmuls inside a graph"),
])
def test_cuda_graphs_are_refused_at_load_in_one_line_naming_the_key(overrides: list[str], key: str,
                                                                    needle: str) -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    msg = str(err.value)
    assert needle in msg and key in msg and "\n" not in msg, msg


@pytest.mark.parametrize("extra, scopes", [
    (["dataset.packing=best_fit"], ["mamba"]),
    (["dataset.enable_in_batch_packing=true", "model.cuda_graph_scope=mamba,mlp"], ["mamba", "mlp"]),
    (["dataset.pad_to_max_length=true", "model.cuda_graph_scope=[mlp, mamba]"], ["mlp", "mamba"]),
])
def test_cuda_graphs_load_with_fixed_shape_batches(extra: list[str], scopes: list[str]) -> None:
    from nvlcore.config import load_config
    from nvlcore.config.refused import cuda_graph_scopes

    cfg = load_config([], [*GRAPHS, *extra])
    assert cfg.model.cuda_graph_impl == "local" and cuda_graph_scopes(cfg.model.cuda_graph_scope) == scopes


def test_the_defaults_are_megatron_cores() -> None:
    from nvlcore.config import load_config

    m = load_config([], []).model
    assert (m.cuda_graph_impl, m.cuda_graph_scope, m.cuda_graph_warmup_steps) == ("none", "full", 3)
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = TransformerConfig.__dataclass_fields__
    assert fields["cuda_graph_impl"].default == "none" and fields["cuda_graph_warmup_steps"].default == 3
    assert fields["cuda_graph_scope"].default == "full"


def test_the_run_refuses_graphs_off_cuda_and_scopes_the_bridge_lacks() -> None:
    from types import SimpleNamespace

    from nvlcore.config import ConfigError, load_config
    from nvlcore.training.finetune import check_cuda_graphs

    cfg = load_config([], [*GRAPHS, "dataset.packing=best_fit", "model.cuda_graph_scope=[mamba,mlp]"])
    bridge = SimpleNamespace(name="toy", cuda_graph_scopes={"mamba": "Mamba layers"})
    with pytest.raises(ConfigError, match=r"model.cuda_graph_impl=local needs a CUDA device \(this run is on cpu\)"):
        check_cuda_graphs(cfg, bridge, "cpu")
    with pytest.raises(ConfigError, match=r"model.cuda_graph_scope: 'mlp' is not a scope model bridge 'toy' graphs"):
        check_cuda_graphs(cfg, bridge, "cuda")
    bridge.cuda_graph_scopes["mlp"] = "MLP layers"
    check_cuda_graphs(cfg, bridge, "cuda")  # both known now


def test_a_bridge_without_cuda_graph_scopes_refuses_naming_the_key() -> None:
    from types import SimpleNamespace

    from nvlcore.bridge import ModelBridge

    assert ModelBridge.cuda_graph_scopes == {}
    with pytest.raises(ValueError, match=r"model.cuda_graph_impl=local: model bridge 'plain' has no CUDA-graph"):
        ModelBridge.cuda_graph_modules(SimpleNamespace(name="plain"), None, ["mamba"])  # type: ignore[arg-type]


def test_the_dispatcher_records_the_first_training_call_and_runs_eagerly_until_capture() -> None:
    import torch

    from nvlcore.training.cuda_graphs import LayerGraphs, describe_signature, signature_of

    calls = []

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, h, mask=None, cache=None, seq_idx=None):
            calls.append((h.shape, mask, seq_idx is None))
            return h + self.lin(h)

    said: list[str] = []
    layers = {"layers.0": Layer(), "layers.2": Layer()}
    graphs = LayerGraphs(layers, warmup_steps=2, say=said.append)
    h = torch.randn(1, 3, 4, requires_grad=True)
    seq = torch.zeros(1, 3, dtype=torch.int32)
    out = layers["layers.2"](layers["layers.0"](h, None, None, seq), None, None, seq)
    out.sum().backward()
    assert h.grad is not None and len(calls) == 2  # eager, with autograd, until capture
    e0 = graphs.entries[0]
    assert e0.signature == signature_of((h, None, None, seq))
    assert describe_signature(e0.signature) == "[1, 3, 4] float32 grad, None, None, [1, 3] int32"
    assert e0.sample is not None and e0.sample[0] is not h and e0.sample[0].requires_grad
    # a non-tensor argument is named, and no-grad / eval calls are never recorded
    assert signature_of((h, object())) == "argument 1 is a object, not a tensor or None"
    layers["layers.0"].eval()
    with torch.no_grad():
        layers["layers.0"](torch.randn(2, 5, 4))
    assert e0.signature[0][0] == (1, 3, 4)
    graphs.after_step(1)  # before the warm-up ends: nothing happens
    assert not graphs.captured and graphs.failed is None and not said


def test_a_layer_never_called_in_training_turns_the_graphs_off_in_one_line() -> None:
    import torch

    from nvlcore.training.cuda_graphs import LayerGraphs, _compress

    said: list[str] = []
    graphs = LayerGraphs({"a.1": torch.nn.Linear(2, 2), "a.3": torch.nn.Linear(2, 2)}, warmup_steps=1,
                         say=said.append)
    graphs.entries[0].module(torch.randn(1, 2))
    graphs.after_step(1)
    assert graphs.failed is not None and not graphs.captured
    assert len(said) == 1 and "CUDA graphs off" in said[0] and "a.3" in said[0], said
    assert _compress(["decoder.layers.0", "decoder.layers.12"]) == "decoder.layers.{0,12}"
    assert _compress(["x.mixer", "y"]) == "x.mixer, y"
    with pytest.raises(ValueError, match="model.cuda_graph_warmup_steps=0"):
        LayerGraphs({"a": torch.nn.Linear(2, 2)}, warmup_steps=0)


def test_the_trainer_prepares_gradients_before_backward_and_captures_after_the_warm_up_steps() -> None:
    """The trainer's two calls into the graphs: ``before_step`` after the gradients are cleared and before
    any backward, ``after_step`` with this run's completed steps after each step (capture happens there)."""
    import torch

    from nvlcore.parallel import destroy_parallel, init_parallel
    from nvlcore.training import optim
    from nvlcore.training.schedules import LRSchedule, WeightDecaySchedule
    from nvlcore.training.trainer import LoopSettings, Trainer

    events: list[str] = []

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 4)
            self.head = torch.nn.Linear(4, 11)

        def forward(self, input_ids, labels, loss_mask=None):
            logits = self.head(self.emb(input_ids))
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")

    class Graphs:
        def before_step(self) -> None:
            events.append("before_step:" + ",".join(str(p.grad is None) for p in model.parameters()))

        def after_step(self, steps_done: int) -> None:
            events.append(f"after_step:{steps_done}")

    model = Toy()
    model.head.register_full_backward_hook(lambda *_: events.append("backward"))
    ctx = init_parallel(1, device_type="cpu")
    try:
        named = optim.trainable_named_parameters(model)
        trainer = Trainer(model=model, ctx=ctx, optimizer=optim.build_optimizer(named, lr=1e-3), named_params=named,
                          lr_schedule=LRSchedule(max_lr=1e-3, min_lr=0.0, decay_style="constant"),
                          wd_schedule=WeightDecaySchedule(start=0.0, end=0.0),
                          settings=LoopSettings(train_iters=2, global_batch_size=2, num_microbatches=2),
                          cuda_graphs=Graphs(), print_fn=lambda _m: None)  # type: ignore[arg-type]
        ids = torch.randint(0, 11, (1, 6))
        batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "loss_mask": torch.ones(1, 6)}
        trainer.run(iter([batch] * 4))
    finally:
        destroy_parallel(ctx)
    assert events == ["before_step:True,True,True", "backward", "backward", "after_step:1",
                      "before_step:True,True,True", "backward", "backward", "after_step:2"], events


def test_autocast_runs_without_its_weight_cast_cache_under_graphs() -> None:
    from nvlcore.config import load_config
    from nvlcore.training.finetune import loop_settings

    graphs = load_config([], [*GRAPHS, "dataset.packing=best_fit", "train.global_batch_size=1"])
    plain = load_config([], ["model.tensor_model_parallel_size=1", "train.global_batch_size=1"])
    assert loop_settings(graphs, dp_size=1, device_type="cuda").autocast_cache is False
    assert loop_settings(plain, dp_size=1, device_type="cuda").autocast_cache is True


def test_a_recompute_setting_chosen_after_the_load_is_refused_when_the_graphs_are_set_up() -> None:
    """train.memory_plan=auto may turn on recomputation after the config was checked: the set-up checks again."""
    from types import SimpleNamespace

    from nvlcore.config import ConfigError, load_config
    from nvlcore.training.finetune import FinetuneRecipe

    cfg = load_config([], [*GRAPHS, "dataset.packing=best_fit"])
    cfg.model.recompute_granularity = "full"  # as plan_run's auto choice writes it
    with pytest.raises(ConfigError, match=r"cannot be combined with model.recompute_granularity .*memory_plan=auto"):
        FinetuneRecipe.setup_cuda_graphs(SimpleNamespace(cfg=cfg, bridge=None))  # type: ignore[arg-type]
