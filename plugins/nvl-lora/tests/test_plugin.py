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
    code = "import sys, nvl_lora; print(sorted(m for m in ('torch', 'megatron', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
