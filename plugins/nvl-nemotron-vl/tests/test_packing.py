"""Sequence packing: every packed sample is computed exactly as alone (tiny toy, fp32, CPU).

The reference path: Mamba conv and SSM states reset at each sample's first token (``seq_idx``),
attention block-diagonal causal, each sample's tiles merged into its own positions.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nvl_nemotron_vl.model.kernels import PACKED_VARLEN, conv_reference, cu_seqlens_from_seq_idx
from nvl_nemotron_vl.model.ssd import ssd_scan_reference, ssd_scan_sequential


@pytest.fixture(scope="module")
def bridge(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy)


def _conversations():
    text = {"conversation": [{"role": "user", "content": "Say something about boats, at some length please."},
                             {"role": "assistant", "content": "Boats float on water and carry people."}]}
    image = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64), (200, 10, 10))},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."}]}
    multi = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (128, 64), (10, 200, 10))},
                                     {"type": "image", "image": Image.new("RGB", (64, 64), (10, 10, 200))},
                                     {"type": "text", "text": "Compare the two."}]},
        {"role": "assistant", "content": "Green then blue."}]}
    return [text, image, multi]


def _random_scan_inputs(b=2, L=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, L, h, generator=gen, dtype=torch.float64) * 0.5
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.1
    B = torch.randn(b, L, g, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, L, g, n, generator=gen, dtype=torch.float64)
    return x, dt, A, B, C


def _seq_idx(lengths_per_row, L):
    out = []
    for lengths in lengths_per_row:
        row = [k for k, n in enumerate(lengths) for _ in range(n)]
        out.append(row + [len(lengths)] * (L - len(row)))
    return torch.tensor(out, dtype=torch.int32)


def test_reference_scan_resets_the_state_at_every_boundary() -> None:
    x, dt, A, B, C = _random_scan_inputs()
    # boundaries inside chunks, on a chunk's first token (8, 16), and a one-token sample
    seq_idx = _seq_idx([[5, 3, 8, 1, 12], [16, 21]], 37)
    y_seq, s_seq = ssd_scan_sequential(x, dt, A, B, C, seq_idx=seq_idx)
    y, s = ssd_scan_reference(x, dt, A, B, C, 8, seq_idx=seq_idx)
    torch.testing.assert_close(y.double(), y_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), s_seq, rtol=1e-5, atol=1e-5)
    # and each segment equals the segment scanned alone
    for r, lengths in enumerate([[5, 3, 8, 1, 12], [16, 21]]):
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            alone, _ = ssd_scan_reference(x[r:r + 1, sl], dt[r:r + 1, sl], A, B[r:r + 1, sl], C[r:r + 1, sl], 8)
            torch.testing.assert_close(y[r:r + 1, sl], alone, rtol=1e-5, atol=1e-5)
            start += n
    # without seq_idx the state leaks across: the test can tell the difference
    y_leak, _ = ssd_scan_reference(x, dt, A, B, C, 8)
    assert (y_leak - y).abs().max() > 1e-3


def test_reference_conv_masks_taps_across_boundaries() -> None:
    gen = torch.Generator().manual_seed(1)
    xBC = torch.randn(2, 20, 6, generator=gen)
    w = torch.randn(6, 1, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    seq_idx = _seq_idx([[3, 1, 9, 7], [20]], 20)
    out = conv_reference(xBC, w, bias, seq_idx)
    torch.testing.assert_close(out[1:], conv_reference(xBC[1:], w, bias), rtol=1e-6, atol=1e-6)
    start = 0
    for n in [3, 1, 9, 7]:
        torch.testing.assert_close(out[:1, start:start + n], conv_reference(xBC[:1, start:start + n], w, bias),
                                   rtol=1e-6, atol=1e-6)
        start += n
    assert cu_seqlens_from_seq_idx(seq_idx).tolist() == [0, 3, 4, 13, 20, 40]


def test_packed_sequence_of_three_samples_equals_each_alone(bridge) -> None:
    """Text, image and multi-image samples packed into one row: logits and per-sample losses as alone."""
    proc = bridge.processor(seq_length=1024)
    samples = [proc(c) for c in _conversations()]
    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    model.eval()
    packed = proc.collate_packed([samples])
    lengths = [int(s["input_ids"].numel()) for s in samples]
    assert packed["seq_idx"].shape == packed["input_ids"].shape and packed["num_samples"].tolist() == [3]
    assert sum(lengths) < packed["input_ids"].shape[1]  # the row has padding too
    with torch.no_grad():
        logits = model.forward_inference(packed["input_ids"], packed["pixel_values"], packed["attention_mask"],
                                         seq_idx=packed["seq_idx"])
        loss = model(**packed)
        start = 0
        for s, n in zip(samples, lengths, strict=True):
            alone = proc.collate([s])
            ref_logits = model.forward_inference(alone["input_ids"], alone.get("pixel_values"), alone["attention_mask"])
            ref_loss = model(**alone)
            torch.testing.assert_close(logits[0, start:start + n], ref_logits[0, :n], rtol=0, atol=1e-5)
            m = s["loss_mask"]
            per_sample = (loss[0, start:start + n] * m).sum() / m.sum()
            ref = (ref_loss[0, :n] * m).sum() / m.sum()
            torch.testing.assert_close(per_sample, ref, rtol=0, atol=1e-5)
            start += n
        # the same row without seq_idx mixes the samples: the later ones differ
        mixed = model.forward_inference(packed["input_ids"], packed["pixel_values"], packed["attention_mask"])
        assert (mixed[0, lengths[0]:sum(lengths)] - logits[0, lengths[0]:sum(lengths)]).abs().max() > 1e-3


def test_packed_micro_batch_gradients_equal_the_sum_of_the_separate_ones(bridge) -> None:
    proc = bridge.processor(seq_length=1024)
    samples = [proc(c) for c in _conversations()]
    model = bridge.build_model(dtype=torch.float32, kernels="reference")

    def grads_of(batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch)
        (loss * batch["loss_mask"]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # two packed rows (samples 0+2 and 1), against each sample alone
    packed = grads_of(proc.collate_packed([[samples[0], samples[2]], [samples[1]]]))
    separate: dict[str, torch.Tensor] = {}
    for s in samples:
        for n, g in grads_of(proc.collate([s])).items():
            separate[n] = separate[n] + g if n in separate else g
    assert set(packed) == set(separate) and any("vision_model" in n for n in packed)
    for n in packed:
        torch.testing.assert_close(packed[n], separate[n], rtol=0, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_packed_flops_count_attention_per_sample(bridge) -> None:
    proc = bridge.processor(seq_length=1024)
    samples = [proc(c) for c in _conversations()]
    packed = proc.collate_packed([samples])
    separate = sum(bridge.train_flops(proc.collate([s])) for s in samples)
    assert bridge.train_flops(packed) == pytest.approx(separate, rel=1e-12)
    unpacked_view = {k: v for k, v in packed.items() if k != "seq_idx"}
    assert bridge.train_flops(unpacked_view) > separate  # one long sequence would cost more attention


def test_collate_packed_refuses_rows_longer_than_seq_length(bridge) -> None:
    proc = bridge.processor(seq_length=64)
    s = proc(_conversations()[0])
    with pytest.raises(ValueError, match="dataset.seq_length=64"):
        proc.collate_packed([[s, s]])


@pytest.mark.parametrize("recompute", ["ssm", "layers"])
def test_packed_gradients_are_the_same_with_recomputation(bridge, recompute) -> None:
    proc = bridge.processor(seq_length=1024)
    samples = [proc(c) for c in _conversations()]
    batch = proc.collate_packed([samples])
    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    grads = []
    for mode in ("none", recompute):
        model.set_recompute(mode)
        model.zero_grad(set_to_none=True)
        (model(**batch) * batch["loss_mask"]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-6)


def test_packed_video_with_evs_equals_each_sample_alone(bridge, tmp_path) -> None:
    """EVS prunes a packed video's frames as alone; the sample index follows the kept positions."""
    from nvl_data_testing import write_test_video

    video = write_test_video(tmp_path / "v.mp4", num_frames=8, fps=4, width=32, height=32)
    vid = {"conversation": [
        {"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "What changes?"}]},
        {"role": "assistant", "content": "Brightness."}]}
    proc = bridge.processor(seq_length=2048)
    samples = [proc(c) for c in (_conversations()[1], vid, _conversations()[0])]
    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    model.eval()
    packed = proc.collate_packed([samples])
    with torch.no_grad():
        loss = model(**packed, evs_pruning_rate=0.5)
        start = 0
        for s in samples:
            n = int(s["input_ids"].numel())
            alone = model(**proc.collate([s]), evs_pruning_rate=0.5)
            m = s["loss_mask"].bool()
            torch.testing.assert_close(loss[0, start:start + n][m], alone[0, :n][m], rtol=0, atol=1e-5)
            start += n


def test_kernel_wrappers_hand_the_boundaries_to_the_libraries() -> None:
    """The GPU wrappers' packed wiring, on CPU with stand-ins of the library calls: the fla conv gets the
    rows as one varlen sequence with cu_seqlens (a stand-in running the reference per segment must give
    the reference's masked conv), and the mamba-ssm scan gets seq_idx as int32."""
    from nvl_nemotron_vl.model import kernels as K

    def fake_fla_conv(x, w, bias, activation=None, cu_seqlens=None):
        assert x.shape[0] == 1 and activation == "silu" and cu_seqlens.dtype == torch.int32
        out = torch.cat([conv_reference(x[:, a:b], w[:, None, :], bias) for a, b in
                         zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)], dim=1)
        return out, None

    gen = torch.Generator().manual_seed(2)
    xBC = torch.randn(2, 19, 6, generator=gen)
    w = torch.randn(6, 1, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    sid = _seq_idx([[3, 1, 9], [2, 17]], 19)
    torch.testing.assert_close(K._fla_conv(fake_fla_conv)(xBC, w, bias, seq_idx=sid), conv_reference(xBC, w, bias, sid))
    # a release that takes host offsets gets them (no read-back of the device ones)
    host = {}

    def fake_fla_conv_cpu(x, w, bias, activation=None, cu_seqlens=None, cu_seqlens_cpu=None):
        host["cpu"] = cu_seqlens_cpu
        return fake_fla_conv(x, w, bias, activation, cu_seqlens)

    packed = K.PackedSequences.of(sid)
    out = K._fla_conv(fake_fla_conv_cpu)(xBC, w, bias, seq_idx=sid, cu_seqlens=packed.cu_seqlens,
                                         cu_seqlens_cpu=packed.cu_seqlens_cpu)
    assert host["cpu"] is packed.cu_seqlens_cpu and host["cpu"].device.type == "cpu"
    torch.testing.assert_close(out, conv_reference(xBC, w, bias, sid))

    seen = {}

    def fake_mamba_scan(x, dt, A, B, C, chunk, D=None, dt_bias=None, dt_softplus=False, seq_idx=None):
        seen["seq_idx"] = seq_idx
        dtf = torch.nn.functional.softplus(dt + dt_bias) if dt_softplus else dt
        y, _ = ssd_scan_reference(x, dtf, A, B, C, chunk, seq_idx=seq_idx)
        return y + D[:, None] * x

    x, dt, A, B, C = (t.float() for t in _random_scan_inputs(b=2, L=19))
    A_log, D, dt_bias = torch.log(-A), torch.ones(A.shape), torch.zeros(A.shape)
    got = K._mamba_scan(fake_mamba_scan)(x, dt, A_log, B, C, 8, D, dt_bias, seq_idx=sid.long())
    assert seen["seq_idx"].dtype == torch.int32 and torch.equal(seen["seq_idx"], sid)
    ref = K._fp32_scan(ssd_scan_reference)(x, dt, A_log, B, C, 8, D, dt_bias, seq_idx=sid)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _segment_attention(q, k, v, packed):
    """A stand-in of the varlen kernel: plain SDPA, causal, on each cu_seqlens segment alone."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = packed.cu_seqlens.tolist()
    assert max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True)) == packed.max_seqlen
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True).transpose(0, 1)
        for a, b in zip(cu[:-1], cu[1:], strict=True)])


def test_packed_attention_kernel_path_equals_the_block_mask(bridge, monkeypatch) -> None:
    """The varlen attention path (heads split out of the fused QKV as flat tokens, the boundaries from
    the processor's cu_seqlens): with a stand-in kernel, loss and gradients of two packed rows equal those
    of the SDPA block-mask reference, and no layer recomputes the boundaries from seq_idx."""
    from nvl_nemotron_vl.model import kernels as K
    from nvl_nemotron_vl.model.attention import SelfAttention

    proc = bridge.processor(seq_length=1024)
    samples = [proc(c) for c in _conversations()]
    batch = proc.collate_packed([[samples[0], samples[2]], [samples[1]]])
    assert list(batch["cu_seqlens"]) == cu_seqlens_from_seq_idx(batch["seq_idx"]).tolist()
    L = batch["input_ids"].shape[1]
    assert batch["cu_seqlens"][-1] == 2 * L and len(batch["cu_seqlens"]) == 3 + 2 + 1  # 2 + 1 samples, 2 paddings
    assert batch["max_seqlen"] == max(b - a for a,
                                      b in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:], strict=True))
    model = bridge.build_model(dtype=torch.float32, kernels="reference")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch)
        (loss * batch["loss_mask"]).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    lm_attention = [m for m in model.modules() if isinstance(m, SelfAttention) and m.causal]
    assert lm_attention and all(m.packed_attention is None for m in lm_attention)
    ran = []

    def stand_in(q, k, v, packed):
        ran.append(1)
        return _segment_attention(q, k, v, packed)

    for m in lm_attention:
        m.packed_attention = stand_in
    # the real kernel takes 16-bit inputs only, so an fp32 model would take the block mask and never call the
    # stand-in: the path is forced here (its choice is tested in test_kernel_report.py), and asserted to run
    monkeypatch.setattr(SelfAttention, "_packed_path", lambda self, mask, dtype: PACKED_VARLEN)
    calls = []
    monkeypatch.setattr(K, "cu_seqlens_from_seq_idx", lambda s: calls.append(1) or cu_seqlens_from_seq_idx(s))
    loss, grads = loss_and_grads()
    assert not calls and len(ran) >= len(lm_attention)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # negative control: a sample boundary moved by one token must show in the loss
    for m in lm_attention:
        m.packed_attention = lambda q, k, v, packed: _segment_attention(q, k, v, _shifted(packed))
    shifted, _ = loss_and_grads()
    assert (shifted - ref_loss).abs().max() > 1e-3


def _shifted(packed):
    """``packed`` with its first inner sample boundary one token later."""
    import dataclasses

    cu = packed.cu_seqlens.clone()
    cu[1] += 1
    return dataclasses.replace(packed, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))


@pytest.mark.parametrize("api", ["is_causal", "window_size"])
def test_varlen_wrapper_follows_the_installed_pytorch_api(monkeypatch, api) -> None:
    """torch.nn.attention.varlen.varlen_attn took ``window_size=(-1, 0)`` and no grouped KV heads in
    PyTorch 2.11, ``enable_gqa`` later: the wrapper asks for causal attention either way and expands the
    KV heads only where the kernel does not take them grouped."""
    import torch.nn.attention.varlen as varlen_module

    from nvl_nemotron_vl.model import kernels as K

    seen = {}
    if api == "is_causal":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, enable_gqa=False):
            seen.update(causal=is_causal, gqa=enable_gqa, kv_heads=key.shape[1])
            return _segment_attention(query, key, value, K.PackedSequences(None, cu_seq_q, max_q, cu_seq_q))
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
            seen.update(causal=window_size == (-1, 0), gqa=False, kv_heads=key.shape[1])
            return _segment_attention(query, key, value, K.PackedSequences(None, cu_seq_q, max_q, cu_seq_q))
    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    run = K._varlen_attention()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, h, 4, generator=gen) for h in (6, 2, 2))
    packed = K.PackedSequences.of(_seq_idx([[4, 2]], 11))
    out = run(q, k, v, packed)
    assert seen["causal"] and seen["kv_heads"] == (2 if api == "is_causal"
                                                   else 6) and seen["gqa"] == (api == "is_causal")
    torch.testing.assert_close(out, _segment_attention(q, k, v, packed))


def _saved_bytes_and_grads(model, batch) -> tuple[int, dict]:
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(**batch) * batch["loss_mask"]).sum()
    loss.backward()
    return saved[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("modules", [["vision_tower"], ["mamba", "vision_tower"]])
def test_recompute_modules_vision_tower_keeps_less_and_the_same_gradients(bridge, modules) -> None:
    """``model.recompute_modules`` through the bridge: the vision tower's layers are recomputed (the forward
    keeps fewer bytes for backward) and every gradient is unchanged."""
    proc = bridge.processor(seq_length=1024)
    batch = proc.collate_packed([[proc(c) for c in _conversations()]])
    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    bridge.set_recompute(model, "selective", ["mamba"])
    kept_lm_only, ref = _saved_bytes_and_grads(model, batch)
    bridge.set_recompute(model, "selective", modules)
    assert model.vision_model.decoder.recompute_layers
    kept, grads = _saved_bytes_and_grads(model, batch)
    assert kept < kept_lm_only if "mamba" in modules else kept != kept_lm_only
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=0, atol=1e-6)
    bridge.set_recompute(model, "selective")  # the default: the Mamba mixers only
    assert not model.vision_model.decoder.recompute_layers
    assert all(layer.mixer.recompute for layer in model.language_model.decoder.layers if hasattr(layer, "mixer"))
