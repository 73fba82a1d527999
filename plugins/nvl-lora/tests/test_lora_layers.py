"""LoRA on plain and tensor-parallel linears: math, matching, freezing, TP parity, state layout."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nvl_lora.config import LoRAConfig
from nvl_lora.matching import pattern_matches
from nvl_lora.method import NoTargetMatchedError, apply_lora, count_parameters, merge_lora
from nvl_lora.recipes import LANGUAGE_TARGETS, VISION_TARGETS, lora_settings


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.language_model = nn.ModuleDict(
            {"linear_qkv": nn.Linear(8, 12), "linear_proj": nn.Linear(12, 8), "other": nn.Linear(8, 8)}
        )
        self.vision_model = nn.ModuleDict({"linear_fc1": nn.Linear(8, 16), "linear_fc2": nn.Linear(16, 8)})
        self.vision_projection = nn.ModuleDict({"linear_fc1": nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vision_model["linear_fc2"](torch.relu(self.vision_model["linear_fc1"](x)))
        v = self.vision_projection["linear_fc1"](v)
        h = self.language_model["linear_proj"](torch.relu(self.language_model["linear_qkv"](v)))
        return self.language_model["other"](h)


def test_pattern_semantics_follow_megatron_bridge() -> None:
    name = "language_model.decoder.layers.3.self_attention.linear_qkv"
    assert pattern_matches("linear_qkv", name)
    assert pattern_matches("*language_model*.linear_qkv", name)
    assert pattern_matches("*.layers.3.*", name)
    assert not pattern_matches("*vision_model*.linear_qkv", name)
    assert not pattern_matches("linear_q", name)  # short name must be equal, not a prefix
    assert not pattern_matches("language_model", name)  # a full-name pattern is anchored
    assert not pattern_matches("*language_model*.linear_qkv", "language_model.x.linear_qkv_extra")


def test_fresh_adapter_is_identity_and_math_is_w_plus_scaled_ba() -> None:
    model = Tiny()
    x = torch.randn(4, 8)
    ref = model(x)
    cfg = LoRAConfig(target_modules=["linear_qkv"], dim=4, alpha=8)
    report = apply_lora(model, cfg)
    assert report.adapted == ["language_model.linear_qkv"]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # B = 0
    lin = model.language_model["linear_qkv"]
    with torch.no_grad():
        lin.adapter.linear_out.weight.normal_()
    a, b = lin.adapter.linear_in.weight, lin.adapter.linear_out.weight
    expected = nn.functional.linear(x, lin.weight + 2.0 * b @ a, lin.bias)
    torch.testing.assert_close(lin(x), expected)
    # xavier A: uniform with bound sqrt(6 / (in + r))
    assert a.abs().max() <= (6 / (8 + 4)) ** 0.5
    assert a.std() > 0.1


def test_under_autocast_the_adapter_neither_copies_nor_saves_an_fp32_input() -> None:
    """A bf16 activation into an fp32 adapter under autocast: the matmul runs in bf16 either way, so the
    adapter uses the activation as it is (no up-cast copy, none saved for backward), and its output and
    gradients equal those of the explicit up-cast bit for bit."""
    from nvl_lora.layers import LoRAAdapter

    torch.manual_seed(0)
    adapter = LoRAAdapter(kind="plain", in_features=64, out_features=32, rank=4, alpha=8, dropout=0.0,
                          lora_a=torch.randn(4, 64), lora_b=torch.randn(32, 4))
    from torch.utils._python_dispatch import TorchDispatchMode

    class ActivationCopies(TorchDispatchMode):
        """Counts dtype copies of activation-shaped tensors ([8, 64]), forward and backward."""

        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == (8, 64):
                ActivationCopies.n += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(8, 64).to(torch.bfloat16).requires_grad_()
    saved: list[torch.Tensor] = []
    with ActivationCopies(), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = adapter(x)
        y.float().sum().backward()
    assert ActivationCopies.n == 0 and y.dtype == torch.bfloat16
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # the input itself is saved, not a copy
    grads = [x.grad.clone(), adapter.linear_in.weight.grad.clone(), adapter.linear_out.weight.grad.clone()]
    x.grad = adapter.linear_in.weight.grad = adapter.linear_out.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the adapter did before: up-cast first
        a, b = adapter.linear_in.weight, adapter.linear_out.weight
        y_up = nn.functional.linear(nn.functional.linear(x.float(), a) * adapter.scale, b)
    y_up.float().sum().backward()
    assert torch.equal(y, y_up)
    for g, g_up in zip(grads, [x.grad, adapter.linear_in.weight.grad, adapter.linear_out.weight.grad], strict=True):
        assert torch.equal(g, g_up)
    # without autocast the input still follows the adapter's dtype
    assert adapter(torch.randn(8, 64, dtype=torch.float64)).dtype == torch.float32


def test_parameter_names_keep_the_base_and_add_adapter_keys() -> None:
    model = Tiny()
    before = set(model.state_dict())
    apply_lora(model, LoRAConfig(target_modules=["linear_qkv", "linear_fc1"]))
    after = set(model.state_dict())
    assert before <= after
    added = sorted(after - before)
    assert added == sorted(
        f"{m}.adapter.{w}.weight"
        for m in ("language_model.linear_qkv", "vision_model.linear_fc1", "vision_projection.linear_fc1")
        for w in ("linear_in", "linear_out")
    )


def test_merge_equals_adapted_forward_and_removes_adapters() -> None:
    model = Tiny()
    apply_lora(model, LoRAConfig(dim=4, alpha=32))
    for n, p in model.named_parameters():
        if n.endswith("linear_out.weight"):
            with torch.no_grad():
                p.normal_(std=0.05)
    x = torch.randn(5, 8)
    y = model(x)
    merged = merge_lora(model)
    assert len(merged) == 5
    assert not any(".adapter." in n for n in model.state_dict())
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_unmatched_patterns_warn_and_no_match_is_an_error() -> None:
    with pytest.warns(UserWarning, match=r"\['in_proj'\] matched no module"):
        apply_lora(Tiny(), LoRAConfig(target_modules=["linear_qkv", "in_proj"]))
    with pytest.raises(NoTargetMatchedError, match="language_model.linear_qkv"):
        apply_lora(Tiny(), LoRAConfig(target_modules=["nothing_here"]))


def test_exclude_modules() -> None:
    model = Tiny()
    report = apply_lora(model, LoRAConfig(target_modules=["linear_fc1"], exclude_modules=["*vision_projection*"]))
    assert report.adapted == ["vision_model.linear_fc1"]


@pytest.mark.parametrize(
    "on_language,on_vision,user,expect_adapted,expect_trainable_groups",
    [
        (True, False, {}, {"language_model.linear_qkv", "language_model.linear_proj"},
         {"vision_model", "vision_projection"}),
        (False, True, {}, {"vision_model.linear_fc1", "vision_model.linear_fc2", "vision_projection.linear_fc1"},
         {"language_model"}),
        (True, True, {}, {"language_model.linear_qkv", "language_model.linear_proj", "vision_model.linear_fc1",
                          "vision_model.linear_fc2", "vision_projection.linear_fc1"}, set()),
        # model.freeze_*=True freezes in addition; model.freeze_*=False never unfreezes what the table froze
        (True, False, {"freeze_vision_model": True}, {"language_model.linear_qkv", "language_model.linear_proj"},
         {"vision_projection"}),
        (True, True, {"freeze_vision_projection": False}, None, set()),
        (False, True, {"freeze_vision_model": False, "freeze_language_model": False}, None, {"language_model"}),
    ],
)
def test_workflow_settings(on_language, on_vision, user, expect_adapted, expect_trainable_groups) -> None:
    cfg, freeze = lora_settings(on_language, on_vision, user)
    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Tiny model has no fc1/fc2 in its LM
        report = apply_lora(model, cfg)
    if expect_adapted is not None:
        assert set(report.adapted) == expect_adapted
    trainable_base_groups = {
        n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and ".adapter." not in n
    }
    assert trainable_base_groups == expect_trainable_groups
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapter." in n)
    assert freeze == cfg.freeze_flags


def test_settings_targets_are_the_workflows() -> None:
    cfg, _ = lora_settings(True, False, None)
    assert cfg.target_modules == LANGUAGE_TARGETS
    assert cfg.target_modules[0] == "*language_model*.linear_qkv"
    cfg, _ = lora_settings(False, True, None)
    assert cfg.target_modules == VISION_TARGETS and "*vision_projection*.linear_fc2" in VISION_TARGETS
    cfg, _ = lora_settings(True, True, None, {"dim": 8, "alpha": 16})
    assert cfg.target_modules == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    assert (cfg.dim, cfg.alpha, cfg.dropout, cfg.lora_A_init_method) == (8, 16.0, 0.0, "xavier")
    with pytest.raises(ValueError, match="--lora-on-language-model"):
        lora_settings(False, False, None)
    with pytest.raises(ValueError, match="model.freeze_language_model"):
        lora_settings(True, False, {"freeze_lm": True})
    # only an explicit peft.freeze_* changes the table
    cfg, freeze = lora_settings(True, True, {"freeze_vision_model": False}, {"freeze_vision_model": False})
    assert freeze == {"freeze_language_model": True, "freeze_vision_model": False, "freeze_vision_projection": True}
    cfg, freeze = lora_settings(True, True, {"freeze_vision_model": True}, {"freeze_vision_model": False})
    assert freeze["freeze_vision_model"] is True  # model.freeze_*=True freezes whatever peft says


def test_count_parameters() -> None:
    model = Tiny()
    total = sum(p.numel() for p in model.parameters())
    cfg, _ = lora_settings(True, True, None, {"dim": 2})
    apply_lora(model, cfg)
    c = count_parameters(model)
    adapters = 2 * (8 + 12) + 2 * (12 + 8) + 2 * (8 + 16) + 2 * (16 + 8) + 2 * (8 + 8)
    assert (c.adapter, c.trainable, c.total) == (adapters, adapters, total + adapters)
    assert "trainable parameters: 208" in c.describe()


def test_config_round_trip_and_errors() -> None:
    cfg = LoRAConfig.from_dict({"rank": 8, "alpha": 16, "target_modules": "linear_qkv,linear_proj", "_target_": "x"})
    assert cfg.dim == 8 and cfg.target_modules == ("linear_qkv", "linear_proj")
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LoRA setting"):
        LoRAConfig.from_dict({"rnak": 8})
    with pytest.raises(ValueError, match="lora_A_init_method"):
        LoRAConfig(lora_A_init_method="orthogonal")


@pytest.mark.distributed
def test_tensor_parallel_two_ranks_match_one() -> None:
    """Megatron Column/RowParallelLinear (norm-fused fc1, fused in_proj components) at TP=2 vs TP=1."""
    from lora_testing import run_distributed, tp_parity_worker

    results = run_distributed(tp_parity_worker, 2)
    for r in results:
        one, two = r["tp1"], r["tp2"]
        assert one["adapted"] == two["adapted"] and len(one["adapted"]) == 7
        assert one["keys"] == two["keys"]
        assert "language_model.mixer.in_proj.adapter.linear_out.weight.z" in one["keys"]
        torch.testing.assert_close(two["y"], one["y"], rtol=1e-5, atol=1e-5)
        assert one["grads"].keys() == two["grads"].keys()
        for k in one["grads"]:
            assert one["grads"][k].abs().max() > 0, k  # every adapter tensor receives gradient
            torch.testing.assert_close(two["grads"][k], one["grads"][k], rtol=1e-5, atol=1e-6, msg=k)
        for label in ("tp1", "tp2"):
            for k, v in r[label]["state"].items():  # logical tensors survive load -> gather
                torch.testing.assert_close(r[label]["roundtrip"][k], v, rtol=0, atol=0)
            torch.testing.assert_close(r[label]["merged_y"], r[label]["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0]["tp2"]["y"], results[1]["tp2"]["y"], rtol=0, atol=0)


class NormLinear(nn.Linear):
    """A norm-fused linear: holds layer_norm_weight and normalises its own input."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o, bias=False)
        self.layer_norm_weight = nn.Parameter(1 + 0.1 * torch.randn(i))

    calls = 0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        NormLinear.calls += 1
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.layer_norm_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))


def test_norm_fused_linear_adapter_sees_the_normalised_input() -> None:
    m = nn.Module()
    m.linear_qkv = NormLinear(8, 6)
    apply_lora(m, LoRAConfig(target_modules=["linear_qkv"], dim=2, alpha=2))
    lin = m.linear_qkv
    with torch.no_grad():
        lin.adapter.linear_out.weight.normal_()
    x = 3 * torch.randn(4, 8)
    xn = type(lin).normalize(lin, x)
    a, b = lin.adapter.linear_in.weight, lin.adapter.linear_out.weight
    NormLinear.calls = 0
    torch.testing.assert_close(lin(x), xn @ (lin.weight + b @ a).T)
    assert NormLinear.calls == 1  # the adapter reuses the base's normalised input
    assert "_nvl_lora_xn" not in lin.__dict__
    merge_lora(m)
    assert "normalize" not in lin.__dict__  # the instance shadow is gone with the adapter


def test_norm_fused_linear_without_a_norm_method_is_refused() -> None:
    m = nn.Module()
    m.linear_qkv = nn.Linear(4, 4)
    m.linear_qkv.layer_norm_weight = nn.Parameter(torch.ones(4))
    with pytest.raises(TypeError, match="linear_qkv .*layer_norm_weight.*normalize"):
        apply_lora(m, LoRAConfig(target_modules=["linear_qkv"]))
