"""Model behaviours beyond parity: context-token checks, freezing, EVS, padding, input validation."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def model(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu", load_weights=True)


def _pixels(cfg, n, seed=0):
    return torch.randn(n, 3, cfg.force_image_size, cfg.force_image_size, generator=torch.Generator().manual_seed(seed))


def test_context_token_count_mismatch_is_an_error(model, tiny_cfg):
    tok = tiny_cfg.num_image_token
    ids = torch.tensor([[5] * 3 + [tiny_cfg.img_context_token_id] * tok + [6] * 3])
    with pytest.raises(ValueError, match="2 tiles/frames"):
        model(ids, pixel_values=_pixels(tiny_cfg, 2))
    with pytest.raises(ValueError, match=r"4 image/video context tokens"):
        model(ids)
    model(ids, pixel_values=_pixels(tiny_cfg, 1))  # the matching count works


def test_token_ids_outside_the_vocabulary_are_an_error(model, tiny_cfg):
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, tiny_cfg.llm.vocab_size]]))


@pytest.mark.parametrize("flag,tower", [("freeze_language_model", "language_model"),
                                        ("freeze_vision_model", "vision_model"),
                                        ("freeze_vision_projection", "vision_projection")])
def test_freeze_flags(tiny_toy, tiny_cfg, flag, tower):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    m = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu", load_weights=True,
                                                           **{flag: True})
    ids = torch.tensor([[7, 8] + [tiny_cfg.img_context_token_id] * tiny_cfg.num_image_token + [9, 10]])
    m(ids, labels=torch.roll(ids, -1, 1), pixel_values=_pixels(tiny_cfg, 1)).sum().backward()
    for name, p in m.named_parameters():
        frozen = name.startswith(tower + ".")
        assert p.requires_grad is not frozen, name
        assert (p.grad is None) is frozen, name


def test_padding_does_not_change_real_tokens(model, tiny_cfg):
    g = torch.Generator().manual_seed(3)
    short = torch.randint(0, 500, (1, 13), generator=g)
    padded = torch.cat([short, torch.zeros(1, 11, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 13), torch.zeros(1, 11)], 1).long()
    a = model.forward_inference(short)
    b = model.forward_inference(padded, attention_mask=mask)
    assert (a - b[:, :13]).abs().max().item() < 1e-5
    # left padding: the Mamba state stays zero over the pads, attention ignores them
    left = torch.cat([torch.zeros(1, 11, dtype=torch.long), short], 1)
    lmask = torch.cat([torch.zeros(1, 11), torch.ones(1, 13)], 1).long()
    c = model.forward_inference(left, attention_mask=lmask)
    assert (a - c[:, 11:]).abs().max().item() < 1e-4


def test_logits_of_padded_vocab_columns_are_minus_inf(model, tiny_cfg):
    # vocab 523 at TP=1 has no padding; the model reports exactly the vocabulary
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape[-1] == tiny_cfg.llm.vocab_size
    assert torch.isfinite(logits).all()


def test_evs_mask_matches_transformers_and_pruned_forward_is_the_compacted_sequence(model, tiny_cfg):
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import compute_retention_mask

    from nvl_nemotron_vl.model.evs import evs_retention_mask

    tok, vid = tiny_cfg.num_image_token, tiny_cfg.video_context_token_id
    frames, rate = 3, 0.5
    g = torch.Generator().manual_seed(8)
    row = [4, 5] + [tiny_cfg.img_context_token_id] * tok + [6]
    for f in range(frames):
        row += [40 + f, 41] + [vid] * tok + [42]
    row += torch.randint(50, 400, (6,), generator=g).tolist()
    ids = torch.tensor([row])
    labels = torch.roll(ids, -1, 1)
    pixels = _pixels(tiny_cfg, 1 + frames, seed=2)

    with torch.no_grad():
        vision = model.vision_embeddings(pixels)
    video = vision[1:]
    ours = evs_retention_mask(video, rate)
    theirs = compute_retention_mask(video.reshape(-1, video.shape[-1]), frames, rate)
    assert torch.equal(ours, theirs)
    assert int(ours.sum()) == max(tok, int(frames * tok * (1 - rate)))

    loss = model(ids, labels=labels, pixel_values=pixels, num_frames=torch.tensor([frames]), evs_pruning_rate=rate)
    assert loss.shape == ids.shape
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[(ids[0] == vid).nonzero().flatten()] = ours
    with torch.no_grad():
        embeds = model.merge_embeddings(ids, model.language_model.embed(ids), vision)[:, keep]
        logits = model.language_model(inputs_embeds=embeds)
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, keep], reduction="none")
    assert (loss[0, keep] - want[0]).abs().max().item() < 1e-5
    assert torch.all(loss[0, ~keep] == 0)
    # the decoding prefill gets the same compacted embeddings and the kept positions
    with torch.no_grad():
        e2, _, l2, index = model.embed_inputs(ids, pixels, None, labels, num_frames=[frames], evs_pruning_rate=rate)
    assert torch.equal(index[0], keep.nonzero().flatten()) and torch.equal(l2, labels[:, keep])
    assert torch.allclose(e2, embeds)
    # no pruning rate: EVS is off and nothing is dropped
    full = model(ids, labels=labels, pixel_values=pixels, num_frames=torch.tensor([frames]))
    assert torch.all(full[0, ~keep] != 0)


def test_evs_needs_frame_counts_that_add_up(model, tiny_cfg):
    tok, vid = tiny_cfg.num_image_token, tiny_cfg.video_context_token_id
    ids = torch.tensor([[3] + [vid] * tok * 2 + [4]])
    with pytest.raises(ValueError, match="num_frames sum to 3"):
        model(ids, pixel_values=_pixels(tiny_cfg, 2), num_frames=[3], evs_pruning_rate=0.5)


@pytest.mark.parametrize("mode", ["ssm", "layers"])
def test_recomputation_gives_the_same_gradients(tiny_toy, tiny_cfg, mode):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    tok = tiny_cfg.num_image_token
    ids = torch.tensor([[7, 8] + [tiny_cfg.img_context_token_id] * tok + list(range(30, 50))])
    labels = torch.roll(ids, -1, 1)
    grads = []
    for m in ("none", mode):
        model = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu",
                                                                   load_weights=True, recompute=m)
        model(ids, labels=labels, pixel_values=_pixels(tiny_cfg, 1)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-5), n


def test_compiled_scan_gives_the_same_loss_and_gradients(tiny_toy, tiny_cfg):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, 1)
    out = []
    for scan in ("reference", "compiled"):
        model = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu",
                                                                   load_weights=True, scan=scan)
        loss = model(ids, labels=labels)
        loss.sum().backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    for n, g in out[0][1].items():
        other = out[1][1][n]
        assert (g is None) == (other is None), n  # no image: the vision towers get no gradient in either
        assert g is None or torch.allclose(g, other, atol=1e-5, rtol=1e-4), n
