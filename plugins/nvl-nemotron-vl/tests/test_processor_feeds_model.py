"""The processor's batches are what the training model consumes: images, video (with EVS), text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from nvl_data_testing import write_test_video


@pytest.fixture(scope="module")
def bridge(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy)


def test_image_and_video_batch_trains(bridge, tmp_path: Path) -> None:
    proc = bridge.processor(seq_length=2048)
    video = write_test_video(tmp_path / "v.mp4", num_frames=8, fps=4, width=32, height=32)
    convs = [
        {"conversation": [
            {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (128, 64), (200, 10, 10))},
                                         {"type": "image", "image": Image.new("RGB", (64, 64))},
                                         {"type": "text", "text": "Compare."}]},
            {"role": "assistant", "content": "Left is red."}]},
        {"conversation": [
            {"role": "user",
             "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "What changes?"}]},
            {"role": "assistant", "content": "Brightness."}]},
        {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    batch = proc.process_batch(convs)
    assert batch["num_image_tiles"].tolist() == [3, 1] and batch["num_frames"].tolist() == [8]
    assert batch["pixel_values"].shape[0] == 3 + 1 + 8
    model = bridge.build_model(dtype=torch.float32)
    loss = model(**batch)
    assert loss.shape == batch["input_ids"].shape and torch.isfinite(loss).all()
    total = (loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The vision tower got gradient through the image and frame tokens.
    vit_grad = sum(float(p.grad.abs().sum()) for n,
                   p in model.named_parameters() if "vision_model" in n and p.grad is not None)
    assert vit_grad > 0

    # EVS prunes video tokens inside the model, from the batch's num_frames; the loss keeps its shape.
    with torch.no_grad():
        pruned = model(**batch, evs_pruning_rate=0.5)
    assert pruned.shape == loss.shape and torch.isfinite(pruned).all()
    mask = batch["loss_mask"].bool()
    assert not torch.equal(pruned[1][mask[1]], loss.detach()[1][mask[1]])  # the video row saw fewer tokens
    torch.testing.assert_close(pruned[0], loss.detach()[0])  # the image row is untouched
