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


@pytest.mark.parametrize("kernels", ["compiled", "auto"])
def test_kernel_choices_give_the_same_loss_and_gradients(tiny_toy, kernels):
    """``compiled`` (torch.compile of the scan) and, on CPU, ``auto`` (the chunked loss, reference ops)
    against ``reference`` (full logits, eager scan)."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, 1)
    labels[0, :5] = -100
    out = []
    for choice in ("reference", kernels):
        model = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu",
                                                                   load_weights=True, kernels=choice)
        assert model.kernels.chunked_loss == (choice != "reference")
        loss = model(ids, labels=labels)
        loss.sum().backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert bool((out[0][0][0, :5] == 0).all())
    for n, g in out[0][1].items():
        other = out[1][1][n]
        assert (g is None) == (other is None), n  # no image: the vision towers get no gradient in either
        assert g is None or torch.allclose(g, other, atol=1e-5, rtol=1e-4), n


def test_chunked_loss_equals_full_logits_loss_across_chunk_boundaries(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.model.kernels import chunked_vocab_parallel_loss

    model = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu", load_weights=True)
    hidden = torch.randn(2, 19, model.config.llm.hidden_size, requires_grad=True)
    labels = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(1))
    labels[1, 3:9] = -100
    full = model.per_token_loss(model.language_model.logits(hidden), labels)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    chunked = chunked_vocab_parallel_loss(hidden, labels, model.language_model.logits, chunk_tokens=7)
    (g_chunk,) = torch.autograd.grad(chunked.sum(), hidden)
    assert chunked.shape == (2, 19)
    assert torch.allclose(full, chunked, atol=1e-6)
    assert torch.allclose(g_full, g_chunk, atol=1e-6)


def test_reference_scan_stays_fp32_under_bf16_autocast():
    """The SSD scan is documented as fp32: under bf16 autocast its einsums must not drop to bf16."""
    from nvl_nemotron_vl.model.kernels import select_kernels
    from nvl_nemotron_vl.model.ssd import ssd_scan_sequential

    g = torch.Generator().manual_seed(0)
    b, L, h, p, grp, n = 1, 40, 4, 8, 2, 16
    x = torch.randn(b, L, h, p, generator=g)
    dt = torch.randn(b, L, h, generator=g)
    A_log = torch.randn(h, generator=g) * 0.5
    B = torch.randn(b, L, grp, n, generator=g)
    C = torch.randn(b, L, grp, n, generator=g)
    D, dt_bias = torch.randn(h, generator=g), torch.randn(h, generator=g)
    scan = select_kernels("reference", "cpu").scan
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scan(x, dt, A_log, B, C, 16, D, dt_bias)
    assert y.dtype == torch.float32
    dtf = torch.nn.functional.softplus(dt + dt_bias)
    want, _ = ssd_scan_sequential(x.double(), dtf.double(), -torch.exp(A_log).double(), B.double(), C.double())
    want = want + D.double()[:, None] * x.double()
    rel = ((y.double() - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel


def test_right_padded_causal_attention_needs_no_dense_mask(tiny_toy):
    """Right padding: the real tokens' logits equal those of the unpadded rows, with no [B,1,L,L] mask built."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.model.attention import attention_mask_for, is_right_padded

    model = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu", load_weights=True)
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    assert is_right_padded(mask) and attention_mask_for(mask, 20, True, "cpu") is None
    left = torch.ones(2, 20, dtype=torch.long)
    left[1, :4] = 0
    assert not is_right_padded(left) and attention_mask_for(left, 20, True, "cpu") is not None
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        alone = model(ids[1:, :13])
    assert torch.allclose(padded[1, :13], alone[0], atol=1e-5)


def test_kernel_choice_errors_name_the_key():
    from nvl_nemotron_vl.model.kernels import select_kernels

    with pytest.raises(ValueError, match=r"model\.kernels must be one of .*'triton'"):
        select_kernels("triton", "cpu")
    with pytest.raises(ValueError, match=r"model\.kernels=mamba_ssm: Triton kernels need a CUDA device"):
        select_kernels("mamba_ssm", "cpu")
    k = select_kernels("auto", "cpu")  # CPU: the reference ops, the chunked loss
    assert k.chunked_loss and all("reference" in k.names[op] for op in ("scan", "conv", "gated_norm"))


def test_set_kernels_routes_every_norm_and_the_squared_relu(tiny_toy, monkeypatch):
    """A norm or activation kernel chosen by ``model.kernels`` must reach every folded norm (LM, ViT,
    projector), the final norm and every squared-ReLU MLP, including under LoRA-style wrappers that call
    ``normalize``: counted through recording kernels that compute the reference, so outputs are unchanged."""
    import collections

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.model import kernels as kmod
    from nvl_nemotron_vl.model.mlp import MLP, squared_relu
    from nvl_nemotron_vl.model.parallel import NormedColumnParallelLinear, RMSNorm, layer_norm, rms_norm

    calls = collections.Counter()

    def rec_norm(kind):
        def run(x, w, b, eps):
            calls[kind] += 1
            return rms_norm(x, w, eps) if kind == "rms" else layer_norm(x, w, b, eps)
        return run

    def rec_relu2(x):
        calls["relu2"] += 1
        return squared_relu(x)

    real = kmod.select_kernels

    def fake(choice, device):
        k = real("reference", device)
        k.norms, k.relu2 = {"rms": rec_norm("rms"), "layer": rec_norm("layer")}, rec_relu2
        return k

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids)
    monkeypatch.setattr(kmod, "select_kernels", fake)
    model.set_kernels("auto")
    norms = [m for m in model.modules() if isinstance(m, (NormedColumnParallelLinear, RMSNorm))]
    assert norms and all(m.norm_impl is not None for m in norms)
    relu2 = [m for m in model.modules() if isinstance(m, MLP) and m.activation == "relu2"]
    assert relu2 and all(m.act is rec_relu2 for m in relu2)
    with torch.no_grad():
        got = model(ids)
    assert torch.equal(got, want)
    lm_norms = sum(isinstance(m, (NormedColumnParallelLinear, RMSNorm)) for m in model.language_model.modules())
    assert calls["rms"] >= lm_norms and calls["relu2"] >= 1
    # back to the reference: the modules' own code again
    monkeypatch.setattr(kmod, "select_kernels", real)
    model.set_kernels("reference")
    assert all(m.norm_impl is None for m in norms) and all(m.act is squared_relu for m in relu2)


def test_trained_fp32_biases_keep_autocast_outputs_in_bf16(tiny_toy):
    """The ViT trains in fp32 master weights with biases: under bf16 autocast a layer's linear outputs,
    and the layer's output, stay bf16 (an fp32 bias added inside the linear would promote them and
    every elementwise op after them to fp32), and equal the bias added in fp32 then rounded."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.model.parallel import ColumnLinear, RowLinear

    model = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, kernels="reference")
    layer = model.vision_model.decoder.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, (ColumnLinear, RowLinear))]
    assert linears and all(m.bias is not None and m.bias.dtype == torch.float32 for m in linears)
    x = torch.randn(2, 5, layer.mlp.linear_fc1.weight.shape[1]).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, bias = layer.mlp.linear_fc1(x)
        assert bias is None and out.dtype == torch.bfloat16
        assert layer(x).dtype == torch.bfloat16
        fc2 = layer.mlp.linear_fc2
        h = torch.randn(2, 5, fc2.weight.shape[1]).to(torch.bfloat16)
        y, _ = fc2(h)
        plain = torch.nn.functional.linear(h, fc2.weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (plain.float() + fc2.bias).to(torch.bfloat16), rtol=1e-2, atol=1e-2)
