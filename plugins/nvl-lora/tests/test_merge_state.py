"""Merging on logical state dicts (what `nvl peft merge` does on checkpoints)."""

from __future__ import annotations

import pytest
import torch

from nvl_lora.merge import MergeError, adapter_pairs, merge_into


def _adapter(r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lm.linear_qkv.adapter.linear_in.weight": torch.randn(r, 8, generator=g),
        "lm.linear_qkv.adapter.linear_out.weight": torch.randn(12, r, generator=g),
        "lm.in_proj.adapter.linear_in.weight": torch.randn(r, 8, generator=g),
        "lm.in_proj.adapter.linear_out.weight.z": torch.randn(6, r, generator=g),
        "lm.in_proj.adapter.linear_out.weight.x": torch.randn(10, r, generator=g),
        "vit.fc1.weight": torch.randn(5, 8, generator=g),  # trained fully in the LoRA run
    }


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "lm.linear_qkv.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "lm.in_proj.weight.z": torch.randn(6, 8, generator=g),
        "lm.in_proj.weight.x": torch.randn(10, 8, generator=g),
        "vit.fc1.weight": torch.zeros(5, 8),
        "untouched": torch.ones(3),
    }


def test_merge_math_components_and_full_weights() -> None:
    base, ad = _base(), _adapter()
    orig = {k: v.clone() for k, v in base.items()}
    keys = list(merge_into(base, ad, alpha=8, dim=4))
    assert sorted(keys) == sorted(["vit.fc1.weight", "lm.linear_qkv.weight", "lm.in_proj.weight.z",
                                   "lm.in_proj.weight.x"])
    a = ad["lm.linear_qkv.adapter.linear_in.weight"]
    b = ad["lm.linear_qkv.adapter.linear_out.weight"]
    assert base["lm.linear_qkv.weight"].dtype == torch.bfloat16
    expect = (orig["lm.linear_qkv.weight"].float() + 2.0 * b @ a).to(torch.bfloat16)
    assert torch.equal(base["lm.linear_qkv.weight"], expect)
    fused_w = torch.cat([orig["lm.in_proj.weight.z"], orig["lm.in_proj.weight.x"]])
    fused_b = torch.cat([ad["lm.in_proj.adapter.linear_out.weight.z"], ad["lm.in_proj.adapter.linear_out.weight.x"]])
    fused = fused_w + 2.0 * fused_b @ ad["lm.in_proj.adapter.linear_in.weight"]
    torch.testing.assert_close(torch.cat([base["lm.in_proj.weight.z"], base["lm.in_proj.weight.x"]]), fused)
    assert torch.equal(base["vit.fc1.weight"], ad["vit.fc1.weight"])
    assert torch.equal(base["untouched"], orig["untouched"])


def test_merge_errors_name_the_key() -> None:
    ad = _adapter()
    del ad["lm.linear_qkv.adapter.linear_out.weight"]
    with pytest.raises(MergeError, match=r"A without B for \['lm.linear_qkv'\]"):
        adapter_pairs(ad)
    with pytest.raises(MergeError, match="rank 8"):
        list(merge_into(_base(), _adapter(), alpha=16, dim=8))
    base = _base()
    del base["lm.in_proj.weight.z"]
    with pytest.raises(MergeError, match="lm.in_proj.weight.z"):
        list(merge_into(base, _adapter(), alpha=8, dim=4))
    base = _base()
    base["lm.linear_qkv.weight"] = torch.zeros(12, 9)
    with pytest.raises(MergeError, match=r"lm.linear_qkv.weight: base shape \(12, 9\)"):
        list(merge_into(base, _adapter(), alpha=8, dim=4))
    base = _base()
    del base["vit.fc1.weight"]
    with pytest.raises(MergeError, match="vit.fc1.weight has no counterpart"):
        list(merge_into(base, _adapter(), alpha=8, dim=4))
