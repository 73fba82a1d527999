"""The weight-mapping table: every transform's inverse is exact, at TP 1, 2 and 4."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nvl_nemotron_vl.config import NemotronVLConfig
from nvl_nemotron_vl.mapping import (
    CARRIED_HF_KEYS,
    IdentityMapping,
    PartsMapping,
    QKVMapping,
    VocabMapping,
    classify_hf_keys,
    component_owner,
    components_to_hf,
    components_to_local,
    hf_to_components,
    local_to_components,
    mapping_table,
)


@pytest.fixture(scope="module")
def cfg4(tiny_toy):
    """The tiny toy's config widened so that TP=4 divides every split (groups 4, heads 8, ...)."""
    raw = json.loads((tiny_toy / "config.json").read_text())
    raw = copy.deepcopy(raw)
    raw["llm_config"].update(num_attention_heads=8, num_key_value_heads=4, n_groups=4, mamba_num_heads=8)
    raw["vision_config"].update(num_attention_heads=4)
    return NemotronVLConfig.from_dict(raw, num_prefix_tokens=4)


def _random_hf(cfg) -> dict[str, torch.Tensor]:
    from nvl_nemotron_vl.toy import iter_toy_hf_tensors

    return {k: v.float() + 0.0 for k, v in iter_toy_hf_tensors(cfg, seed=1)}


def test_table_covers_every_model_parameter_once(cfg4):
    from nvl_nemotron_vl.toy import full_parameter_shapes

    table = mapping_table(cfg4)
    names = [m.megatron for m in table]
    assert len(names) == len(set(names))
    assert set(names) == set(full_parameter_shapes(cfg4))
    assert {type(m) for m in table} == {IdentityMapping, VocabMapping, QKVMapping, PartsMapping}
    hf = [k for m in table for k in m.hf]
    # each HF key has one owner, except a layer's pre-norm which folds into exactly one linear
    assert len(hf) == len(set(hf))
    assert len(component_owner(table)) == sum(len(m.components) for m in table)


def test_hf_components_roundtrip_is_exact(cfg4):
    table = mapping_table(cfg4)
    hf = _random_hf(cfg4)
    mapped, carried, unknown = classify_hf_keys(table, hf)
    assert carried == set(CARRIED_HF_KEYS[:2]) and not unknown
    comps = hf_to_components(table, hf)
    assert any(k.endswith("in_proj.weight.dt") for k in comps) and any(k.endswith("linear_qkv.weight.q") for k in comps)
    back = components_to_hf(table, comps)
    assert set(back) == mapped
    for k in mapped:
        assert torch.equal(back[k], hf[k]), k


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_local_roundtrip_is_exact(cfg4, tp):
    table = mapping_table(cfg4)
    comps = hf_to_components(table, _random_hf(cfg4))
    shards = [components_to_local(table, comps, tp, r) for r in range(tp)]
    back = local_to_components(table, shards)
    assert set(back) == set(comps)
    for k in comps:
        assert torch.equal(back[k], comps[k]), k


def test_tp_local_layouts_are_megatrons(cfg4):
    """Spot-check the fused layouts at TP=2 against the reference's description (§6)."""
    llm = cfg4.llm
    table = {m.megatron: m for m in mapping_table(cfg4)}
    comps = hf_to_components(table.values(), _random_hf(cfg4))
    # Mamba in_proj rank 1 = [z_1 | x_1 | B_1 | C_1 | dt_1]
    name = "language_model.decoder.layers.0.mixer.in_proj.weight"
    local = table[name].components_to_local(comps, 2, 1)
    parts = [comps[f"{name}.{p}"].chunk(2)[1] for p in ("z", "x", "B", "C", "dt")]
    assert torch.equal(local, torch.cat(parts))
    # LM qkv rank 0 = groups 0..1, each [q heads of the group, k, v]
    name = "language_model.decoder.layers.2.self_attention.linear_qkv.weight"
    local = table[name].components_to_local(comps, 2, 0)
    d, rep = llm.head_dim, llm.num_attention_heads // llm.num_key_value_heads
    q, k, v = (comps[f"{name}.{p}"] for p in "qkv")
    expect = torch.cat([torch.cat([q[g * rep * d:(g + 1) * rep * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                        for g in range(2)])
    assert torch.equal(local, expect)
    # vocab padding: 523 rows over 4 ranks -> 131 rows each, the last one padded with zeros
    name = "language_model.output_layer.weight"
    locals_ = [table[name].components_to_local(comps, 4, r) for r in range(4)]
    assert [t.shape[0] for t in locals_] == [131] * 4
    assert torch.all(locals_[3][-1] == 0)


def test_tp_split_of_an_indivisible_size_is_refused(tiny_cfg):
    table = {m.megatron: m for m in mapping_table(tiny_cfg)}
    comps = hf_to_components(table.values(), _random_hf(tiny_cfg))
    with pytest.raises(ValueError, match="not divisible"):
        table["language_model.decoder.layers.0.mixer.in_proj.weight"].components_to_local(comps, 4, 0)
