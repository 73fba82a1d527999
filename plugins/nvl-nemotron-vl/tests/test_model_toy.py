"""`nvl toy-model`: a complete HF directory with the real schema, key names, dtypes and tokenizer."""

from __future__ import annotations

import json
import re

import pytest
import torch

# Every family of keys in the reference's state-dict tables (model-format.md §2), as regexes.
FAMILIES = {
    r"vision_model\.radio_model\.input_conditioner\.norm_(mean|std)": torch.float32,
    r"vision_model\.radio_model\.model\.patch_generator\.cls_token\.token": torch.bfloat16,
    r"vision_model\.radio_model\.model\.patch_generator\.pos_embed": torch.bfloat16,
    r"vision_model\.radio_model\.model\.patch_generator\.embedder\.weight": torch.bfloat16,
    r"vision_model\.radio_model\.model\.blocks\.\d+\."
    r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)": torch.bfloat16,
    r"mlp1\.(0|1|3)\.weight": torch.bfloat16,
    r"language_model\.backbone\.embeddings\.weight": torch.bfloat16,
    r"language_model\.backbone\.layers\.\d+\.norm\.weight": torch.bfloat16,
    r"language_model\.backbone\.layers\.\d+\.mixer\."
    r"(in_proj\.weight|conv1d\.weight|conv1d\.bias|dt_bias|norm\.weight|out_proj\.weight)": torch.bfloat16,
    r"language_model\.backbone\.layers\.\d+\.mixer\.(A_log|D)": torch.float32,
    r"language_model\.backbone\.layers\.\d+\.mixer\.(q_proj|k_proj|v_proj|o_proj)\.weight": torch.bfloat16,
    r"language_model\.backbone\.layers\.\d+\.mixer\.(up_proj|down_proj)\.weight": torch.bfloat16,
    r"language_model\.backbone\.norm_f\.weight": torch.bfloat16,
    r"language_model\.lm_head\.weight": torch.bfloat16,
}


def test_toy_keys_follow_the_real_naming_and_dtypes(tiny_toy, tiny_cfg):
    from nemotron_vl_testing import load_toy_state

    state = load_toy_state(tiny_toy)
    seen = {f: 0 for f in FAMILIES}
    for key, t in state.items():
        fams = [f for f in FAMILIES if re.fullmatch(f, key)]
        assert len(fams) == 1, f"{key} matches {fams}"
        seen[fams[0]] += 1
        assert t.dtype == FAMILIES[fams[0]], key
    assert all(seen.values()), [f for f, n in seen.items() if not n]
    llm, v = tiny_cfg.llm, tiny_cfg.vision
    d_in, gn = llm.mamba_d_inner, llm.n_groups * llm.ssm_state_size
    in_proj_rows = 2 * d_in + 2 * gn + llm.mamba_num_heads
    assert state["language_model.backbone.layers.0.mixer.in_proj.weight"].shape == (in_proj_rows, llm.hidden_size)
    assert state["language_model.backbone.layers.0.mixer.conv1d.weight"].shape == (d_in + 2 * gn, 1, 4)
    assert state["vision_model.radio_model.model.patch_generator.pos_embed"].shape == (1, v.max_grid**2, v.hidden_size)
    assert state["vision_model.radio_model.model.patch_generator.embedder.weight"].shape == (v.hidden_size, 768)
    mean = state["vision_model.radio_model.input_conditioner.norm_mean"]
    assert mean.shape == (3, 1, 1) and abs(mean.flatten()[0].item() - 0.48145466) < 1e-7
    assert "vision_model.radio_model.summary_idxs" not in state
    A = -torch.exp(state["language_model.backbone.layers.0.mixer.A_log"])
    assert torch.all((A <= -1) & (A >= -16))


def test_toy_directory_files_and_config_schema(tiny_toy):
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        assert (tiny_toy / name).is_file(), name
    raw = json.loads((tiny_toy / "config.json").read_text())
    for field in ("force_image_size", "patch_size", "downsample_ratio", "ps_version", "projector_hidden_size",
                  "vit_hidden_size", "img_context_token_id", "video_context_token_id", "use_thumbnail",
                  "norm_mean", "norm_std", "video_pruning_rate", "llm_config", "vision_config", "template"):
        assert field in raw, field
    assert raw["architectures"] == ["NemotronH_Nano_VL_V2"]


def test_toy_tokenizer_renders_the_chat_template(tiny_toy, tiny_cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_toy)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<SPECIAL_11>User\n<image>Describe this image.\n<SPECIAL_11>Assistant\n" in text
    assert tok.convert_tokens_to_ids("<image>") == tiny_cfg.img_context_token_id
    assert tok.convert_tokens_to_ids("<video>") == tiny_cfg.video_context_token_id
    assert len(tok) <= tiny_cfg.llm.vocab_size


def test_sharded_toy_loads_like_the_single_file(tmp_path, tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    out = write_toy_checkpoint(tmp_path / "sharded", "tiny", seed=3, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    a = NemotronVLBridge.from_hf_dir(out).build_model(dtype=torch.float32, device="cpu", load_weights=True)
    b = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu", load_weights=True)
    pb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        assert torch.equal(p, pb[n]), n


def test_toy_model_command_refuses_to_overwrite(tmp_path):
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    cli = build_cli()
    out = tmp_path / "toy"
    r = CliRunner().invoke(cli, ["toy-model", str(out), "--size", "tiny", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file()
    r = CliRunner().invoke(cli, ["toy-model", str(out)])
    assert r.exit_code != 0 and "--overwrite" in r.output
    r = CliRunner().invoke(cli, ["toy-model", str(out), "--seed", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["toy-model", str(out), "--size", "huge"])
    assert r.exit_code != 0 and "huge" in r.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_load_refuses_a_checkpoint_that_does_not_match(tmp_path, tiny_toy):
    from safetensors.torch import load_file, save_file

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.bridge import BridgeError

    d = tmp_path / "bad"
    d.mkdir()
    for f in tiny_toy.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tiny_toy / "model.safetensors"))
    state["language_model.backbone.layers.9.mixer.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(d / "model.safetensors"))
    bridge = NemotronVLBridge.from_hf_dir(d)
    with pytest.raises(BridgeError, match="layers.9"):
        bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
    del state["language_model.backbone.layers.9.mixer.up_proj.weight"]
    del state["language_model.backbone.layers.1.mixer.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(BridgeError, match="layers.1.mixer.up_proj"):
        bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
