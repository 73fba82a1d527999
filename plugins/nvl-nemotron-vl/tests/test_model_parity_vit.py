"""The RADIO ViT against transformers' RadioModel on the tiny toy's weights, fp32.

Settings aligned (see nemotron_vl_testing): prefix tokens = the checkpoint's cls_token rows
(num_cls_tokens + num_registers), max_img_size = cpe_max_size, mlp_ratio, eps 1e-6, exact GELU, no layer
scale, eager attention; position-embedding interpolation bilinear with align_corners=False (ours by
default, RadioModel's only mode).
"""

from __future__ import annotations

import pytest
import torch

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_toy, tiny_cfg):
    from nemotron_vl_testing import hf_radio_from_toy

    return hf_radio_from_toy(tiny_toy, tiny_cfg)


@pytest.fixture(scope="module")
def ours(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu", load_weights=True)


def _tiles(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def test_vit_features_match_radio_model(reference, ours, tiny_cfg):
    raw = _tiles(3, tiny_cfg.force_image_size)
    mean = torch.tensor(tiny_cfg.norm_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_cfg.norm_std).view(1, 3, 1, 1)
    with torch.no_grad():
        # RadioModel normalises with the checkpoint's carried input_conditioner buffers; ours takes
        # pixels normalised by the processor, as in the HF VL model (make_preprocessor_external).
        want = reference(raw).features
        got = ours.vision_model((raw - mean) / std)
    assert got.shape == want.shape == (3, tiny_cfg.grid**2, tiny_cfg.vision.hidden_size)
    diff = (got - want).abs().max().item()
    print(f"max |ViT feature diff|: {diff:.3e} (feature std {want.std().item():.3f})")
    assert diff <= TOL


def test_vit_other_grid_sizes_interpolate_like_radio_model(reference, ours, tiny_cfg):
    # a 32x48 input exercises the resize + crop of the position grid (8x8 table -> 2 rows, 3 cols)
    raw = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(tiny_cfg.norm_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_cfg.norm_std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = reference(raw).features
        got = ours.vision_model((raw - mean) / std)
    assert got.shape == want.shape == (2, 6, tiny_cfg.vision.hidden_size)
    assert (got - want).abs().max().item() <= TOL


def test_align_corners_setting_changes_the_result(tiny_toy, ours, tiny_cfg):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    other = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(
        dtype=torch.float32, device="cpu", load_weights=True, pos_embed_align_corners=True)
    x = _tiles(1, tiny_cfg.force_image_size)
    with torch.no_grad():
        assert (other.vision_model(x) - ours.vision_model(x)).abs().max().item() > 1e-4
