"""The kernel report says what ran: packed attention's path (varlen kernel or the SDPA block mask, and
why) is recorded on use, the start's report names both paths where the choice depends on the inputs, and
``model.kernels=auto`` on a GPU warns once when it falls back to the reference."""

from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(scope="module")
def bridge(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy)


def _packed_batch(bridge):
    proc = bridge.processor(seq_length=256)
    convs = [{"conversation": [{"role": "user", "content": f"Tell me about boats, number {i}."},
                               {"role": "assistant", "content": "Boats float on water."}]} for i in range(3)]
    samples = [proc(c) for c in convs]
    return proc.collate_packed([[samples[0], samples[1]], [samples[2]]])


def _stand_in(calls):
    def attn(q, k, v, packed):
        """Causal SDPA per cu_seqlens segment (a stand-in of the varlen kernel, which needs CUDA)."""
        calls.append(q.dtype)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        cu = packed.cu_seqlens.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True).transpose(0, 1)
            for a, b in zip(cu[:-1], cu[1:], strict=True)])

    return attn


def test_the_packed_attention_path_taken_is_recorded(bridge) -> None:
    from nvl_nemotron_vl.model import kernels as K
    from nvl_nemotron_vl.model.attention import SelfAttention

    batch = _packed_batch(bridge)
    model = bridge.build_model(dtype=torch.float32, kernels="reference")
    with torch.no_grad():
        model(**batch)
    # no varlen kernel selected (CPU): the block mask ran, and the report says so
    assert bridge.kernels_ran(model) == {"packed_attention": K.PACKED_MASK_NO_KERNEL}

    calls = []
    model.set_kernels("reference")  # a fresh record
    for m in model.modules():
        if isinstance(m, SelfAttention) and m.causal:
            m.packed_attention = _stand_in(calls)
    with torch.no_grad():
        model(**batch)  # fp32 inputs: the kernel is set but not taken
    assert not calls and bridge.kernels_ran(model) == {"packed_attention": K.PACKED_MASK_FP32}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)  # 16-bit inputs: the kernel runs
    assert calls and set(calls) == {torch.bfloat16}
    assert bridge.kernels_ran(model) == {"packed_attention": f"{K.PACKED_MASK_FP32} and {K.PACKED_VARLEN}"}


def test_auto_on_a_gpu_reports_both_packed_paths_and_warns_once_on_fallback(monkeypatch) -> None:
    from nvl_nemotron_vl.model import kernels as K

    def missing():
        raise ImportError("No module named 'mamba_ssm'")

    monkeypatch.setattr(K, "_mamba_triton", missing)
    monkeypatch.setattr(K, "_fla", missing)
    monkeypatch.setattr(K, "_torch_varlen", lambda: {"attn": _stand_in([])})
    monkeypatch.setattr(K, "_compiled_squared_relu", lambda: (lambda x: torch.relu(x) ** 2))
    monkeypatch.setattr(K, "_WARNED_FALLBACK", False)
    with pytest.warns(RuntimeWarning, match=r"model.kernels=auto on a GPU runs the reference implementation for "
                                            r"scan, conv, gated_norm, norm \("):
        k = K.select_kernels("auto", "cuda")
    # the report names the varlen kernel and when the block mask runs instead
    assert "varlen" in k.names["packed_attention"] and "else SDPA" in k.names["packed_attention"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.select_kernels("auto", "cuda")  # once per process
        K.select_kernels("reference", "cuda")  # chosen, not a fallback


def test_auto_with_every_kernel_does_not_warn(monkeypatch) -> None:
    from nvl_nemotron_vl.model import kernels as K

    fake = lambda *a, **kw: None  # noqa: E731
    monkeypatch.setattr(K, "_mamba_triton", lambda: {"scan": fake, "rmsnorm": fake, "layer_norm": fake})
    monkeypatch.setattr(K, "_fla", lambda: {"conv": fake, "rmsnorm": fake, "simple_gla": fake})
    monkeypatch.setattr(K, "_torch_varlen", lambda: {"attn": fake})
    monkeypatch.setattr(K, "_compiled_squared_relu", lambda: fake)
    monkeypatch.setattr(K, "_WARNED_FALLBACK", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = K.select_kernels("auto", "cuda")
    assert "Triton" in k.names["scan"] and k.packed_attention is fake
