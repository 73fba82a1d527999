"""This model's `vllm serve` settings (vLLM's recipe and the model card) and vLLM's names of the modules it serves
adapters on (the language model only), through the bridge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvlcore.bridge import BridgeError


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=5))


def test_vllm_command_carries_the_recipe_settings(toy: Path, tmp_path: Path) -> None:
    from nvlcore.serve.vllm_backend import vllm_command

    argv = vllm_command(toy)
    opt = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    cfg = json.loads((toy / "config.json").read_text())
    assert "--trust-remote-code" in argv
    assert float(opt["--video-pruning-rate"]) == cfg.get("video_pruning_rate", 0.0)  # as nvl generate
    assert json.loads(opt["--media-io-kwargs"]) == {"video": {"fps": 2, "num_frames": 128}}
    assert json.loads(opt["--mm-processor-kwargs"]) == {"max_num_tiles": 12}
    assert json.loads(opt["--limit-mm-per-prompt"]) == {"image": 4, "video": 1}
    assert opt["--max-model-len"] == str(cfg["llm_config"].get("max_position_embeddings") or 131072)

    import shutil

    other = tmp_path / "ctx"
    shutil.copytree(toy, other)
    cfg["llm_config"]["max_position_embeddings"] = 4096
    cfg["video_pruning_rate"] = 0.25
    (other / "config.json").write_text(json.dumps(cfg))
    argv = vllm_command(other)
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    assert argv[argv.index("--video-pruning-rate") + 1] == "0.25"


def test_vllm_adapter_modules_are_the_language_models(toy: Path) -> None:
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(toy)
    pattern = json.loads((toy / "config.json").read_text())["llm_config"]["hybrid_override_pattern"]
    assert pattern.startswith("M-*")
    lm = "language_model.backbone.layers"
    assert bridge.vllm_adapter_module(f"{lm}.0.mixer.in_proj") == "language_model.model.layers.0.mixer.in_proj"
    assert bridge.vllm_adapter_module(f"{lm}.0.mixer.out_proj") == "language_model.model.layers.0.mixer.out_proj"
    assert bridge.vllm_adapter_module(f"{lm}.1.mixer.down_proj") == "language_model.model.layers.1.mixer.down_proj"
    assert bridge.vllm_adapter_module(f"{lm}.2.mixer.k_proj") == "language_model.model.layers.2.mixer.k_proj"
    assert bridge.vllm_adapter_module("language_model.lm_head") == "language_model.lm_head"
    assert bridge.vllm_adapter_module("vision_model.radio_model.model.blocks.0.attn.qkv") is None
    assert bridge.vllm_adapter_module("mlp1.1") is None
    for wrong in (f"{lm}.0.mixer.q_proj", f"{lm}.2.mixer.in_proj", f"{lm}.99.mixer.up_proj", "language_model.x"):
        with pytest.raises(BridgeError, match="vLLM serves no adapter on"):
            bridge.vllm_adapter_module(wrong)
