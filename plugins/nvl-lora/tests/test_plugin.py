"""The plugin registers lazily and imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

from nvlcore.plugins import NvlPluginManager


def test_lora_is_registered_lazily() -> None:
    pm = NvlPluginManager(env={"NVL_LOAD_PLUGINS": "nvl-lora", "NVL_STRICT_PLUGINS": "1"})
    reg = pm.registry("peft_method")
    entry = reg.entry("lora")
    assert entry.provenance.plugin == "nvl_lora"
    assert reg.entry("VLMLoRA").name == "lora"
    cls = reg.get("lora")
    method = cls({"dim": 8, "alpha": 16, "target_modules": ["linear_qkv"]})
    assert method.config.scale == 2.0


def test_import_is_cheap() -> None:
    code = ("import sys, nvl_lora; "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_core_config_validates_peft_section_with_the_lora_schema() -> None:
    import pytest

    base = ["peft.method=lora", "dataset.maker_name=synthetic_shapes"]
    pm = NvlPluginManager()  # a fresh manager: leave the process-wide one alone

    def load_config(files: list, overrides: list):  # noqa: ANN202
        from nvlcore.config import load_config as load

        return load(files, overrides, plugins=pm)

    cfg = load_config([], [*base, "peft.dim=8", "peft.seed=3"])
    # LoRA's own fields (not the core's peft fields) arrive, with LoRAConfig's defaults, in options
    assert cfg.peft.dim == 8 and cfg.peft.options == {
        "lora_A_init_method": "xavier", "lora_B_init_method": "zero", "lora_dtype": None, "seed": 3,
        "base_dtype": None, "freeze_language_model": True, "freeze_vision_model": True,
        "freeze_vision_projection": True,
        "freeze_other": True,
    }
    assert not hasattr(cfg.peft, "lora_dtype")  # the core's PeftConfig names no LoRA field
    cfg = load_config([], [*base, "peft.lora_dtype=bfloat16", "peft.freeze_vision_model=false"])
    assert cfg.peft.options["lora_dtype"] == "bfloat16" and cfg.peft.options["freeze_vision_model"] is False
    with pytest.raises(Exception, match="lora_A_init_method must be 'xavier' or 'kaiming'"):
        load_config([], [*base, "peft.lora_A_init_method=uniform"])
    with pytest.raises(Exception, match="peft.rnak: unknown key"):
        load_config([], [*base, "peft.rnak=3"])


def test_method_apply_takes_the_peft_section_as_options() -> None:
    from torch import nn

    from nvl_lora.method import LoRAMethod

    model = nn.Module()
    model.language_model = nn.Module()
    model.language_model.linear_qkv = nn.Linear(4, 4)
    model.language_model.linear_proj = nn.Linear(4, 4)
    m = LoRAMethod()
    m.apply(model, target_modules=["linear_proj"], dim=2, alpha=4, exclude_modules=[], lora_dtype=None, seed=1,
            freeze_language_model=True)
    assert m.report is not None and m.report.adapted == ["language_model.linear_proj"]
    assert m.config.dim == 2 and model.language_model.linear_proj.adapter.rank == 2
    assert not model.language_model.linear_qkv.weight.requires_grad


def test_lora_and_dora_implement_the_peft_contract_and_name_their_parameters() -> None:
    """Both registered methods satisfy nvlcore.contracts.PeftMethod; adapter_parameters names exactly the
    parameters apply added (DoRA's magnitudes too); a method missing a contract method is refused in one line."""
    import pytest
    import torch
    from torch import nn

    from nvl_lora.dora import DoRAMethod
    from nvl_lora.method import LoRAMethod
    from nvlcore.contracts import PeftMethod
    from nvlcore.training.finetune import describe_peft_parameters, tower_status
    from nvlcore.training.peft import check_peft_method

    for cls in (LoRAMethod, DoRAMethod):
        method = cls(target_modules=["fc"], dim=2, alpha=4, freeze_other=True)
        assert isinstance(method, PeftMethod)
        model = nn.Sequential()
        model.add_module("fc", nn.Linear(6, 5))
        model.add_module("head", nn.Linear(5, 3))
        before = {n for n, _ in model.named_parameters()}
        method.apply(model)
        names = set(method.adapter_parameters(model))
        assert names == {n for n, _ in model.named_parameters()} - before
        assert ("fc.adapter.magnitude.weight" in names) == (cls is DoRAMethod)
        state = {k: torch.full_like(p, 0.5) for k, p in method.adapter_parameters(model).items()}
        assert sorted(method.load_trainable_state_dict(model, state)) == sorted(names)
        assert "adapter parameters: " + f"{sum(p.numel() for p in state.values()):,}" in describe_peft_parameters(
            model, names, tp_size=1)
        assert {t.name: t.adapter for t in tower_status(model, names)}["fc"] > 0

    class Partial:
        def apply(self, model, **kw):  # noqa: ANN001, ANN003, ANN201
            return model

    with pytest.raises(TypeError, match="lacks adapter_parameters, load_trainable_state_dict, merge"):
        check_peft_method(Partial(), "partial")
