"""config.json is read as data; values the model cannot honour are errors naming the field and file."""

from __future__ import annotations

import copy
import json

import pytest

from nvl_nemotron_vl.config import ConfigError, NemotronVLConfig


@pytest.fixture(scope="module")
def raw(tiny_toy):
    return json.loads((tiny_toy / "config.json").read_text())


def _with(raw, path: str, value):
    d = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is None:
        node.pop(last)
    else:
        node[last] = value
    return d


def test_tiny_toy_config_values(tiny_cfg):
    c = tiny_cfg
    assert c.llm.layer_types == ["mamba", "mlp", "attention", "mlp", "mamba", "mlp"]
    assert c.num_image_token == 4 and c.grid == 4
    assert c.vision.num_prefix_tokens == 4 and c.vision.max_grid == 8
    assert c.projector_input_size == 4 * c.vit_hidden_size
    assert c.img_context_token_id != c.video_context_token_id
    assert c.ps_version == "v2" and c.llm.time_step_limit == (0.0, float("inf"))


@pytest.mark.parametrize("path,value,needle", [
    ("llm_config.tie_word_embeddings", True, "llm_config.tie_word_embeddings"),
    ("llm_config.mlp_hidden_act", "swiglu", "llm_config.mlp_hidden_act"),
    ("llm_config.residual_in_fp32", True, "llm_config.residual_in_fp32"),
    ("llm_config.hybrid_override_pattern", "M-E*", "hybrid_override_pattern"),
    ("llm_config.time_step_limit", [0.001, 0.1], "time_step_limit"),
    ("llm_config.num_hidden_layers", 99, "num_hidden_layers"),
    ("llm_config.hidden_size", None, "llm_config.hidden_size"),
    ("llm_config.vocab_size", "many", "llm_config.vocab_size"),
    ("ps_version", "v3", "ps_version"),
    ("downsample_ratio", 0.25, "downsample_ratio"),
    ("img_context_token_id", 10**7, "img_context_token_id"),
    ("vit_hidden_size", 48, "vit_hidden_size"),
    ("architectures", ["LlavaForConditionalGeneration"], "architectures"),
])
def test_unsupported_values_are_errors_naming_field_and_file(raw, path, value, needle):
    with pytest.raises(ConfigError) as e:
        NemotronVLConfig.from_dict(_with(raw, path, value), source="/x/config.json")
    assert needle in str(e.value) and "/x/config.json" in str(e.value)


def test_from_hf_dir_reads_prefix_tokens_from_the_weights(tiny_toy, tmp_path):
    # without weights the count follows RADIO's rule from args; with weights, the cls_token rows decide
    (tmp_path / "config.json").write_text((tiny_toy / "config.json").read_text())
    assert NemotronVLConfig.from_hf_dir(tmp_path).vision.num_prefix_tokens == 4
    raw = json.loads((tiny_toy / "config.json").read_text())
    raw["vision_config"]["args"]["register_multiple"] = 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert NemotronVLConfig.from_hf_dir(tmp_path).vision.num_prefix_tokens == 8
    (tmp_path / "model.safetensors").symlink_to(tiny_toy / "model.safetensors")
    assert NemotronVLConfig.from_hf_dir(tmp_path).vision.num_prefix_tokens == 4


def test_missing_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        NemotronVLConfig.from_hf_dir(tmp_path)


def test_12b_shape_config_parses_to_the_reference_dimensions():
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config

    ids = {"vocab_size": 522, "<image>": 512, "<video>": 521, "bos": 1, "eos": 12, "pad": 0}
    c = NemotronVLConfig.from_dict(toy_config("12b-shape", ids), num_prefix_tokens=num_prefix_tokens("12b-shape"))
    assert c.num_image_token == 256 and c.vision.num_prefix_tokens == 16 and c.vision.max_grid == 128
    assert (c.vision.hidden_size, c.vision.num_layers, c.vision.num_attention_heads,
            c.vision.intermediate_size) == (1280, 32, 16, 5120)
    assert c.llm.layer_types.count("attention") == 6 and c.llm.layer_types.count("mamba") == 28
    assert [i for i, t in enumerate(c.llm.layer_types) if t == "attention"] == [7, 16, 25, 34, 43, 52]
    assert c.llm.mamba_d_inner == 10240 and c.llm.mamba_conv_dim == 12288
    c.check_tensor_parallel(8)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=3"):
        c.check_tensor_parallel(3)


def test_tp_size_not_dividing_groups_is_refused(tiny_cfg):
    with pytest.raises(ConfigError) as e:
        tiny_cfg.check_tensor_parallel(4)
    msg = str(e.value)
    assert "num_key_value_heads" in msg and "n_groups" in msg
