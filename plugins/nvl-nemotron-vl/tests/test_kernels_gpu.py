"""GPU kernels against the plain-PyTorch reference, forward and backward (skipped without CUDA).

Tolerances are relative Frobenius-norm errors (computed in fp64) against the plain-PyTorch reference fed the
same inputs upcast to fp64, stated per op and dtype. The oracle is fp32, not fp64, where the reference itself
computes in fp32: the scan (``_fp32_scan`` casts to fp32 and runs with autocast off), the gated norm (its
``.float()``), the packed attention (fp32 math SDPA) and the loss; the conv, norm and squared-ReLU references
compute in fp64. So an fp32 tolerance bounds the kernel's distance from an fp32 computation, whose own
error against exact arithmetic is not measured here. The Triton kernels run their dot products in TF32 for
fp32 inputs and accumulate in fp32 for bf16 inputs, so fp32 tolerances are ~1e-3, bf16 ones ~1e-2.
Run by the GPU bench (``pytest plugins/nvl-nemotron-vl/tests/test_kernels_gpu.py -s``); CPU CI skips it.
"""

from __future__ import annotations

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {  # (op, dtype) -> relative error bound, forward and each gradient
    ("scan", torch.float32): 5e-3, ("scan", torch.bfloat16): 3e-2,
    ("conv", torch.float32): 1e-5, ("conv", torch.bfloat16): 1e-2,
    ("gated_norm", torch.float32): 1e-5, ("gated_norm", torch.bfloat16): 1e-2,
    ("norm", torch.float32): 1e-5, ("norm", torch.bfloat16): 1e-2,
    ("relu2", torch.float32): 1e-6, ("relu2", torch.bfloat16): 1e-2,
    ("packed_attention", torch.bfloat16): 1e-2,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _kernels(name: str):
    from nvl_nemotron_vl.model.kernels import select_kernels

    k = select_kernels("auto", "cuda")
    if "reference" in k.names[name]:
        pytest.skip(f"no kernel library for {name} on this machine ({k.names[name]})")
    return k


def _scan_inputs(dtype, b=2, L=512, h=16, p=80, g=2, n=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, L, h, p, device="cuda", generator=gen).to(dtype)
    dt = (torch.randn(b, L, h, device="cuda", generator=gen) - 2).to(dtype)
    A_log = torch.log(torch.rand(h, device="cuda", generator=gen) * 8 + 1)
    B = torch.randn(b, L, g, n, device="cuda", generator=gen).to(dtype) / n**0.5
    C = torch.randn(b, L, g, n, device="cuda", generator=gen).to(dtype) / n**0.5
    D = torch.randn(h, device="cuda", generator=gen)
    dt_bias = torch.randn(h, device="cuda", generator=gen) * 0.5
    return [t.requires_grad_() for t in (x, dt, A_log, B, C, D, dt_bias)]


def _grads(fn, inputs, seed=1):
    out = fn(*inputs)
    go = torch.randn(out.shape, device=out.device, generator=torch.Generator(device="cuda").manual_seed(seed))
    grads = torch.autograd.grad(out.float(), inputs, go)
    return out.detach(), grads


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [128, 256])
def test_scan_kernel_matches_reference(dtype, chunk):
    from nvl_nemotron_vl.model.kernels import select_kernels

    k = _kernels("scan")
    ref = select_kernels("reference", "cuda").scan
    ins = _scan_inputs(dtype)
    out_k, g_k = _grads(lambda x, dt, a, B, C, D, db: k.scan(x, dt, a, B, C, chunk, D, db), ins)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    out_r, g_r = _grads(lambda x, dt, a, B, C, D, db: ref(x, dt, a, B, C, chunk, D, db), ins64)
    errs = {"out": rel(out_k, out_r)} | {n: rel(a, b) for n, a,
                                         b in zip("x dt A_log B C D dt_bias".split(), g_k, g_r, strict=True)}
    print(f"scan {k.names['scan']} {dtype} chunk {chunk}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < TOL[("scan", dtype)], errs


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_kernel_matches_reference(dtype):
    from nvl_nemotron_vl.model.kernels import conv_reference

    k = _kernels("conv")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 300, 1024, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(1024, 1, 4, device="cuda", generator=gen) * 0.5).to(dtype).requires_grad_()
    bias = torch.randn(1024, device="cuda", generator=gen).to(dtype).requires_grad_()
    out_k, g_k = _grads(k.conv, [x, w, bias])
    ins64 = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    out_r, g_r = _grads(conv_reference, ins64)
    errs = {"out": rel(out_k, out_r)} | {n: rel(a, b) for n, a,
                                         b in zip(("x", "weight", "bias"), g_k, g_r, strict=True)}
    print(f"conv {k.names['conv']} {dtype}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < TOL[("conv", dtype)], errs


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_norm_kernel_matches_reference(dtype):
    from nvl_nemotron_vl.model.kernels import gated_norm_reference

    k = _kernels("gated_norm")
    gen = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(2, 300, 1280, device="cuda", generator=gen).to(dtype).requires_grad_()
    z = torch.randn(2, 300, 1280, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(1280, device="cuda", generator=gen)).requires_grad_()

    def kern(y, z, w):
        return k.gated_norm(y, z, w, 1e-5, 640)

    def ref(y, z, w):
        return gated_norm_reference(y, z, w, 1e-5, 640)

    out_k, g_k = _grads(kern, [y, z, w])
    out_r, g_r = _grads(ref, [t.detach().double().requires_grad_() for t in (y, z, w)])
    errs = {"out": rel(out_k, out_r)} | {n: rel(a, b) for n, a, b in zip(("y", "z", "weight"), g_k, g_r, strict=True)}
    print(f"gated_norm {k.names['gated_norm']} {dtype}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < TOL[("gated_norm", dtype)], errs


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_kernel_matches_reference(dtype, kind):
    """The folded RMSNorm / LayerNorm kernel at the LM's width against the formula in fp64; the weight is
    fp32 (a trainable norm of a full fine-tune; frozen LoRA runs store it in bf16, same kernel)."""
    import torch.nn.functional as F

    k = _kernels("norm")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(2, 300, 5120, device="cuda", generator=gen) * 3).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(5120, device="cuda", generator=gen)).requires_grad_()
    b = (0.1 * torch.randn(5120, device="cuda", generator=gen)).requires_grad_()

    if kind == "rms":
        def kern(x, w):
            return k.norms["rms"](x, w, None, 1e-5)

        def ref(x, w):
            return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

        ins, names = [x, w], ("x", "weight")
    else:
        def kern(x, w, b):
            return k.norms["layer"](x, w, b, 1e-5)

        def ref(x, w, b):
            return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

        ins, names = [x, w, b], ("x", "weight", "bias")
    out_k, g_k = _grads(kern, ins)
    out_r, g_r = _grads(ref, [t.detach().double().requires_grad_() for t in ins])
    assert out_k.dtype == dtype
    errs = {"out": rel(out_k, out_r)} | {n: rel(a, b) for n, a, b in zip(names, g_k, g_r, strict=True)}
    print(f"norm {kind} {k.names['norm']} {dtype}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < TOL[("norm", dtype)], errs


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_relu_kernel_matches_reference(dtype):
    from nvl_nemotron_vl.model.mlp import squared_relu

    k = _kernels("relu2")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 257, 2048, device="cuda", generator=gen).to(dtype).requires_grad_()
    out_k, (g_k,) = _grads(k.relu2, [x])
    out_r, (g_r,) = _grads(squared_relu, [x.detach().double().requires_grad_()])
    assert out_k.dtype == dtype
    errs = {"out": rel(out_k, out_r), "x": rel(g_k, g_r)}
    print(f"relu2 {k.names['relu2']} {dtype}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < TOL[("relu2", dtype)], errs


@cuda
def test_tiny_toy_training_losses_kernels_vs_reference(tiny_toy):
    """A few training steps of the tiny toy on CUDA: ``model.kernels=auto`` against ``reference``
    (fp32 weights, no autocast: the kernels' TF32 dot products are the only difference)."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    ids = torch.randint(0, 500, (2, 96), generator=torch.Generator().manual_seed(4)).cuda()
    labels = torch.roll(ids, -1, 1)
    losses = {}
    for choice in ("reference", "auto"):
        model = NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cuda",
                                                                   load_weights=True, kernels=choice)
        if choice == "auto":
            _kernels("scan")  # skips when no kernel library is installed
            assert "Triton" in model.kernel_report()["scan"], model.kernel_report()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        seq = []
        for _ in range(4):
            loss = model(ids, labels=labels).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            seq.append(loss.item())
        losses[choice] = seq
    print(f"tiny toy losses: {losses}")
    for a, b in zip(losses["reference"], losses["auto"], strict=True):
        assert abs(a - b) < 2e-3 * abs(a), losses


# -------------------------------------------------------------------- packed samples (seq_idx)
def _packed_seq_idx(b, L, lengths):
    """[b, L] int32 sample index: each row packs ``lengths`` (the rest of the row is one more sample)."""
    row = [k for k, n in enumerate(lengths) for _ in range(n)]
    row = (row + [len(lengths)] * L)[:L]
    return torch.tensor([row] * b, dtype=torch.int32, device="cuda")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_kernel_with_seq_idx_matches_reference(dtype):
    """mamba-ssm's scan with ``seq_idx`` (state reset at each packed sample) against the reference's."""
    from nvl_nemotron_vl.model.kernels import select_kernels

    k = _kernels("scan")
    ref = select_kernels("reference", "cuda").scan
    sid = _packed_seq_idx(2, 512, [100, 128, 7, 200])  # boundaries inside and on chunk edges
    ins = _scan_inputs(dtype)
    out_k, g_k = _grads(lambda x, dt, a, B, C, D, db: k.scan(x, dt, a, B, C, 128, D, db, seq_idx=sid), ins)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    out_r, g_r = _grads(lambda x, dt, a, B, C, D, db: ref(x, dt, a, B, C, 128, D, db, seq_idx=sid), ins64)
    errs = {"out": rel(out_k, out_r)} | {n: rel(a, b) for n, a,
                                         b in zip("x dt A_log B C D dt_bias".split(), g_k, g_r, strict=True)}
    print(f"packed scan {k.names['scan']} {dtype}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < TOL[("scan", dtype)], errs
    # the reset is real: without seq_idx the first tokens after a boundary carry the previous sample's
    # state. Without the D skip, those tokens' outputs are the state's share plus at most 4 tokens of
    # their own sample, so the leak is of the order of the outputs themselves (further on the state
    # has decayed, so the comparison looks at the tokens right after the boundary).
    x, dt, a, B, C, _, db = (t.detach() for t in ins)
    no_d = torch.zeros_like(ins[5])
    reset = k.scan(x, dt, a, B, C, 128, no_d, db, seq_idx=sid)[:, 100:104]
    leak = k.scan(x, dt, a, B, C, 128, no_d, db)[:, 100:104]
    assert rel(leak, reset) > 0.3, rel(leak, reset)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_kernel_with_seq_idx_matches_reference(dtype):
    """flash-linear-attention's conv over cu_seqlens against the reference's per-sample masked taps."""
    from nvl_nemotron_vl.model.kernels import conv_reference

    k = _kernels("conv")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sid = _packed_seq_idx(2, 300, [1, 2, 97, 150])
    x = torch.randn(2, 300, 1024, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(1024, 1, 4, device="cuda", generator=gen) * 0.5).to(dtype).requires_grad_()
    bias = torch.randn(1024, device="cuda", generator=gen).to(dtype).requires_grad_()
    out_k, g_k = _grads(lambda x, w, b: k.conv(x, w, b, seq_idx=sid), [x, w, bias])
    ins64 = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    out_r, g_r = _grads(lambda x, w, b: conv_reference(x, w, b, sid), ins64)
    errs = {"out": rel(out_k, out_r)} | {n: rel(a, b) for n, a,
                                         b in zip(("x", "weight", "bias"), g_k, g_r, strict=True)}
    print(f"packed conv {k.names['conv']} {dtype}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < TOL[("conv", dtype)], errs


def _packed_vs_alone(model, lengths, boundaries, *, pad, seed):
    """Per sample, the relative error of its per-token losses in one packed row (random tokens of ``lengths``,
    then ``pad`` padding; the row's sample boundaries from ``boundaries``) against the sample run alone."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 500, (n,), generator=gen) for n in lengths]
    ids = torch.cat(parts + [torch.zeros(pad, dtype=torch.long)])[None].cuda()
    labels = torch.cat([torch.cat([p[1:], torch.tensor([-100])]) for p in parts]
                       + [torch.full((pad,), -100)])[None].cuda()
    sid = _packed_seq_idx(1, ids.shape[1], boundaries)
    errs, start = [], 0
    with torch.no_grad():
        packed = model(ids, labels=labels, attention_mask=(sid < len(boundaries)).long(), seq_idx=sid)
        for p, n in zip(parts, lengths, strict=True):
            errs.append(rel(packed[:, start:start + n], model(p[None].cuda(), labels=labels[:, start:start + n])))
            start += n
    return errs


@cuda
def test_tiny_toy_packed_row_equals_samples_alone_with_kernels(tiny_toy):
    """The whole model on CUDA with ``kernels=auto``: a packed row's per-token losses equal each sample
    run alone (fp32 weights; TF32 in the kernels bounds the agreement)."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    model = bridge.build_model(dtype=torch.float32, device="cuda", load_weights=True, kernels="auto")
    _kernels("scan")
    lengths = [40, 70, 33]
    errs = _packed_vs_alone(model, lengths, lengths, pad=9, seed=5)
    assert max(errs) < 1e-2, errs


@cuda
def test_tiny_toy_bf16_packed_row_through_varlen_attention_equals_samples_alone(tiny_toy):
    """End to end in bf16 (what a GPU run computes: the varlen flash-attention path, which fp32 inputs never
    take): a packed row's per-token losses equal each sample run alone within bf16's tolerance, the kernel
    report names the varlen path, and the same row with one boundary shifted by a token fails (the negative
    control: a sample that sees one token of its neighbour must not pass)."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    model = bridge.build_model(dtype=torch.bfloat16, device="cuda", load_weights=True, kernels="auto")
    _kernels("packed_attention")
    lengths = [150, 97, 203]
    good = _packed_vs_alone(model, lengths, lengths, pad=62, seed=7)
    assert "varlen" in bridge.kernels_ran(model).get("packed_attention", ""), bridge.kernels_ran(model)
    assert max(good) < 2e-2, good
    # the negative control: the row's boundaries say sample 2 starts one token late (it sees sample 1's last)
    shifted = _packed_vs_alone(model, lengths, [lengths[0] + 1, lengths[1] - 1, lengths[2]], pad=62, seed=7)
    assert max(shifted) > 5 * max(max(good), 1e-3), (good, shifted)


@cuda
def test_norm_and_relu2_kernels_step_aside_inside_cuda_graph_capture():
    """The decode step is a CUDA graph: inside a capture the norm and squared-ReLU kernels use the
    plain-PyTorch ops (capturable), and the replayed graph gives the reference values."""
    from nvl_nemotron_vl.model.mlp import squared_relu
    from nvl_nemotron_vl.model.parallel import rms_norm

    k = _kernels("norm")
    x = torch.randn(4, 1, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(5120, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(4, 1, 2048, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, as the generator does
        k.norms["rms"](x, w, None, 1e-5), k.relu2(a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, r = k.norms["rms"](x, w, None, 1e-5), k.relu2(a)
    x.copy_(torch.randn_like(x))
    a.copy_(torch.randn_like(a))
    g.replay()
    assert torch.equal(y, rms_norm(x, w, 1e-5)) and torch.equal(r, squared_relu(a))


@cuda
def test_packed_attention_kernel_matches_the_block_mask_in_fp32():
    """The varlen flash attention over packed rows (bf16, 40 query heads on 8 KV groups, the 12B shape)
    against the SDPA block-diagonal causal mask computed in fp32 by the math kernel, forward and the
    gradients of q, k and v; the bf16 block-mask SDPA (what runs without the kernel) is held to the same
    bound. Samples of uneven lengths, boundaries off the kernels' 128-token tiles."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nvl_nemotron_vl.model.attention import packed_attention_mask
    from nvl_nemotron_vl.model.kernels import PackedSequences

    k_ = _kernels("packed_attention")
    H, KV, d, L = 40, 8, 128, 2048
    sid = _packed_seq_idx(2, L, [300, 700, 5, 129, 640])
    packed = PackedSequences.of(sid)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2 * L, h, d, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
               for h in (H, KV, KV))
    go = torch.randn(2 * L, H, d, device="cuda", generator=gen)

    def masked(q, k, v):  # [T, h, d] -> [T, H, d] through SDPA with the block mask
        qb, kb, vb = (t.view(2, L, -1, d).transpose(1, 2) for t in (q, k, v))
        kb, vb = kb.repeat_interleave(H // KV, dim=1), vb.repeat_interleave(H // KV, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=packed_attention_mask(sid, True))
        return o.transpose(1, 2).reshape(2 * L, H, d)

    def run(fn, *ins):
        out = fn(*ins)
        return [out.detach(), *torch.autograd.grad(out.float(), ins, go)]

    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        ref = run(masked, *f32)
    got = run(lambda q, k, v: k_.packed_attention(q, k, v, packed), q, k, v)
    sdpa_bf16 = run(masked, q, k, v)
    names = ["out", "dq", "dk", "dv"]
    errs = {n: rel(a, b) for n, a, b in zip(names, got, ref, strict=True)}
    errs_sdpa = {n: rel(a, b) for n, a, b in zip(names, sdpa_bf16, ref, strict=True)}
    print(f"packed attention {k_.names['packed_attention']}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
          + " | bf16 SDPA block mask: " + ", ".join(f"{n} {e:.1e}" for n, e in errs_sdpa.items()))
    assert max(errs.values()) < TOL[("packed_attention", torch.bfloat16)], errs
    assert max(errs_sdpa.values()) < TOL[("packed_attention", torch.bfloat16)], errs_sdpa


@cuda
def test_squared_relu_stays_in_bf16_under_cuda_autocast():
    """CUDA autocast runs ``pow`` in fp32: the MLP's activation (reference and fused) must not turn the
    widest LM activation into fp32, forward or backward."""
    from nvl_nemotron_vl.model.mlp import squared_relu

    k = _kernels("relu2")
    x = torch.randn(64, 512, device="cuda").to(torch.bfloat16).requires_grad_()
    for act in (squared_relu, k.relu2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = act(x)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert y.dtype == torch.bfloat16 and g.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), torch.relu(x.float()) ** 2, rtol=1e-2, atol=1e-2)
