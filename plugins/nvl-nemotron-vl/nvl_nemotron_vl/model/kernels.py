"""Implementations of the Mamba mixer's ops and the LM loss, chosen per model.

Every op has a plain-PyTorch reference (the CPU path, and what the kernels are tested against) and,
on CUDA, Triton kernels from libraries made for them, used when importable:

=============  ======================================================  ==================================
op             kernels (first importable wins under ``"auto"``)          reference
=============  ======================================================  ==================================
scan           mamba-ssm ``mamba_chunk_scan_combined`` (fused D skip,    :func:`.ssd.ssd_scan` (chunked,
               dt bias and softplus; state in fp32); flash-linear-       fp32), or its ``torch.compile``
               attention ``chunk_simple_gla`` as the second candidate
conv           flash-linear-attention ``causal_conv1d`` (Triton, SiLU    ``F.conv1d`` (cuDNN) + SiLU
               fused)
gated_norm     mamba-ssm / flash-linear-attention ``rmsnorm_fn``         :class:`.mamba.GatedGroupRMSNorm`
               (grouped, gate before the norm)                           in fp32
norm           mamba-ssm ``layer_norm_fn`` (Triton, one pass each way,   :func:`.parallel.rms_norm` /
               fp32 statistics): every RMSNorm / LayerNorm folded into  :func:`.parallel.layer_norm`
               a linear, and the LM's final norm                         (fp32 round trips)
relu2          the squared ReLU fused by ``torch.compile`` (one kernel   :func:`.mlp.squared_relu`
               forward, one backward)                                    (separate ops)
loss           chunked vocab-parallel cross-entropy, each chunk's        full logits, fp32 copy, then
               logits recomputed in backward                             vocab-parallel cross-entropy
packed         PyTorch's varlen flash attention (``torch.nn.attention    SDPA with a block-diagonal causal
attention      .varlen``): each packed sample's keys only, no mask       boolean mask (every block computed)
=============  ======================================================  ==================================

``model.kernels`` picks: ``"auto"`` (kernels where importable and on CUDA, else the reference),
``"reference"`` (plain PyTorch everywhere, also on GPU), ``"compiled"`` (the reference scan through
``torch.compile``), or a named scan (``"mamba_ssm"``, ``"fla"``) which fails loudly when missing.
The GPU libraries are the optional extra ``pip install nvl-nemotron-vl[gpu]``.

Packed attention's path depends on the inputs (the varlen kernel takes bf16/fp16 rows without a padding
mask; fp32 or masked rows take the SDPA block mask), so the report names both and each call records the
path it took (:meth:`Kernels.record`). ``"auto"`` on CUDA warns once per process when an op falls back
to the reference for want of a kernel library.

mamba-ssm installed without its CUDA extensions (``MAMBA_SKIP_CUDA_BUILD=TRUE``, the Triton kernels
only) fails at ``import mamba_ssm`` (its ``__init__`` imports the selective-scan extension, which the
SSD kernels do not use); :func:`_mamba_triton` then loads the Triton submodules without the package's
``__init__``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

KERNEL_CHOICES = ("auto", "reference", "compiled", "mamba_ssm", "fla")


# ----------------------------------------------------------------------------- library loading
def _mamba_triton() -> dict[str, Callable[..., Any]]:
    """mamba-ssm's Triton SSD scan and gated RMSNorm (ImportError when mamba-ssm or triton is missing)."""
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as exc:
        import importlib.util
        import sys
        import types

        if exc.name in (None, "mamba_ssm", "triton") or exc.name.startswith("triton."):
            raise
        # The package __init__ failed on a CUDA extension the Triton kernels do not need: import the
        # submodules under a bare package object instead.
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["mamba_ssm"] = pkg
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return {"scan": mamba_chunk_scan_combined, "rmsnorm": rmsnorm_fn, "layer_norm": layer_norm_fn}


def _fla() -> dict[str, Callable[..., Any]]:
    """flash-linear-attention's Triton conv, gated RMSNorm and simple-GLA chunked scan."""
    from fla.modules.causal_conv1d import causal_conv1d
    from fla.modules.norm.layernorm_gated import rmsnorm_fn
    from fla.ops.simple_gla import chunk_simple_gla

    return {"conv": causal_conv1d, "rmsnorm": rmsnorm_fn, "simple_gla": chunk_simple_gla}


_LOAD_ERRORS: dict[str, str] = {}


def _try(loader: Callable[[], dict[str, Callable[..., Any]]]) -> dict[str, Callable[..., Any]] | None:
    """The library's ops, or None (missing, or failing on this platform: the reference is used); the
    reason is kept for the error of an explicit ``model.kernels`` choice."""
    try:
        return loader()
    except Exception as exc:
        _LOAD_ERRORS[loader.__name__] = f"{type(exc).__name__}: {exc}"
        return None


# ------------------------------------------------------------------------------- reference ops
def conv_reference(xBC: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                   cu_seqlens_cpu: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv over time + SiLU: ``xBC`` ``[b, L, D]``, ``weight`` ``[D, 1, W]``.

    With ``seq_idx`` ``[b, L]`` (packed samples) a tap that would reach a token of another sample reads
    zero instead, exactly as the zero padding before a sample run alone: the conv state resets at
    every sample boundary. (``cu_seqlens`` / ``cu_seqlens_cpu``, the varlen kernels' form of the same
    boundaries, are not needed.)
    """
    del cu_seqlens, cu_seqlens_cpu
    k = weight.shape[-1]
    if seq_idx is None:
        out = F.conv1d(F.pad(xBC.transpose(1, 2), (k - 1, 0)), weight, bias, groups=weight.shape[0])
        return F.silu(out).transpose(1, 2)
    # out[t] = bias + sum_j weight[:, W-1-j] * x[t-j], tap j kept only where seq_idx[t-j] == seq_idx[t].
    L = xBC.shape[1]
    xp = F.pad(xBC, (0, 0, k - 1, 0))
    sp = F.pad(seq_idx, (k - 1, 0), value=-1)
    w = weight[:, 0, :].to(xBC.dtype)  # [D, W]
    out = xBC.new_zeros(xBC.shape) if bias is None else bias.to(xBC.dtype).expand_as(xBC).clone()
    for j in range(k):
        same = (sp[:, k - 1 - j:k - 1 - j + L] == seq_idx)[:, :, None].to(xBC.dtype)
        out = out + xp[:, k - 1 - j:k - 1 - j + L] * same * w[:, k - 1 - j]
    return F.silu(out)


def cu_seqlens_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """int32 ``[n + 1]`` start offsets of the ``n`` samples of ``seq_idx`` ``[b, L]`` read as one
    flattened row of ``b * L`` tokens (a new row always starts a new sample): the varlen kernels' form."""
    b, L = seq_idx.shape
    flat = seq_idx.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts.view(b, L)[:, 0] = True
    pos = torch.nonzero(starts).flatten()
    end = torch.tensor([b * L], device=seq_idx.device, dtype=pos.dtype)
    return torch.cat([pos, end]).to(torch.int32)


@dataclass(frozen=True)
class PackedSequences:
    """Packed samples of a batch, in every form the layers' kernels take.

    :param seq_idx: int32 ``[b, L]``, each token's sample index in its row (padding: an index of its own).
    :param cu_seqlens: int32 ``[n + 1]``, the samples' start offsets over the ``b * L`` tokens read as one
        flattened row (:func:`cu_seqlens_from_seq_idx`), on ``seq_idx``'s device.
    :param max_seqlen: the longest sample (padding runs included), in tokens.
    :param cu_seqlens_cpu: the same offsets on the host (kernels that plan their launch from them).

    Built once per forward, from the boundaries the processor found on the host (``collate_packed``), so
    that no layer synchronises with the GPU to find them.
    """

    seq_idx: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    cu_seqlens_cpu: torch.Tensor

    @classmethod
    def of(cls, seq_idx: torch.Tensor | PackedSequences | None,
           cu_seqlens: Sequence[int] | torch.Tensor | None = None,
           max_seqlen: int | None = None) -> PackedSequences | None:
        """``seq_idx`` as packed sequences (None stays None). ``cu_seqlens`` (host ints or a tensor) and
        ``max_seqlen`` are found from ``seq_idx`` (a host synchronisation) when not given."""
        if seq_idx is None or isinstance(seq_idx, PackedSequences):
            return seq_idx
        if cu_seqlens is None:
            cpu = cu_seqlens_from_seq_idx(seq_idx).cpu()
        elif isinstance(cu_seqlens, torch.Tensor):
            cpu = cu_seqlens.to("cpu", torch.int32)
        else:
            cpu = torch.tensor(list(cu_seqlens), dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cpu[1:] - cpu[:-1]).max())
        if seq_idx.device.type == "cuda":
            # From pinned memory the copy is queued; from pageable memory CUDA waits for the stream first.
            cpu = cpu.pin_memory()
            return cls(seq_idx, cpu.to(seq_idx.device, non_blocking=True), int(max_seqlen), cpu)
        return cls(seq_idx, cpu.to(seq_idx.device), int(max_seqlen), cpu)


def gated_norm_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                         group_size: int) -> torch.Tensor:
    """``weight * RMSNorm_grouped(y * SiLU(z))`` in fp32 (``norm_before_gate=False``)."""
    g = y.float() * F.silu(z.float())
    shape = g.shape
    g = g.view(*shape[:-1], shape[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * g.view(shape)


def _fp32_scan(scan: Callable[..., Any]) -> Callable[..., Any]:
    """``(x, dt_raw, A_log, B, C, chunk, D, dt_bias) -> y + D x`` (fp32) over a reference-signature scan.

    The scan runs with autocast off, so its einsums stay in fp32 under bf16 autocast (the state's
    precision is what the reference promises).
    """

    def run(x, dt, A_log, B, C, chunk_size, D, dt_bias, seq_idx=None):
        with torch.autocast(x.device.type, enabled=False):
            dtf = F.softplus(dt.float() + dt_bias.float())
            kw = {} if seq_idx is None else {"seq_idx": seq_idx}
            y, _ = scan(x.float(), dtf, -torch.exp(A_log.float()), B.float(), C.float(), chunk_size, **kw)
            return y + D.float()[:, None] * x.float()

    return run


# ---------------------------------------------------------------------------------- kernel ops
def _mamba_scan(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(x, dt, A_log, B, C, chunk_size, D, dt_bias, seq_idx=None):
        A = -torch.exp(A_log.float())
        # seq_idx (int32 [b, L]): the kernel resets the state at every change of index.
        sid = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        return fn(x, dt, A, B, C, chunk_size, D=D.float(), dt_bias=dt_bias.float(), dt_softplus=True, seq_idx=sid)

    return run


def _fla_scan(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SSD as simple GLA: q = C, k = B (expanded from groups to heads), v = dt x, log-decay g = dt A."""

    def run(x, dt, A_log, B, C, chunk_size, D, dt_bias, seq_idx=None):
        b, L, h = x.shape[:3]
        r = h // B.shape[2]
        dtf = F.softplus(dt.float() + dt_bias.float())
        g = dtf * -torch.exp(A_log.float())
        v = (x.float() * dtf[..., None]).to(x.dtype)
        q = C.repeat_interleave(r, dim=2).to(x.dtype)
        k = B.repeat_interleave(r, dim=2).to(x.dtype)
        if seq_idx is None:
            y, _ = fn(q, k, v, g=g, scale=1.0)
        else:
            # varlen form: all rows as one of b * L tokens, samples delimited by cu_seqlens.
            flat = lambda t: t.reshape(1, b * L, *t.shape[2:])  # noqa: E731
            y, _ = fn(flat(q), flat(k), flat(v), g=flat(g), scale=1.0, cu_seqlens=cu_seqlens_from_seq_idx(seq_idx))
            y = y.view(b, L, *y.shape[2:])
        return y.float() + D.float()[:, None] * x.float()

    return run


def _fla_conv(fn: Callable[..., Any]) -> Callable[..., Any]:
    import inspect

    # Newer releases plan a varlen launch from host offsets when given them, instead of reading the
    # device ones back (a GPU synchronisation per call).
    takes_cpu = "cu_seqlens_cpu" in inspect.signature(fn).parameters

    def run(xBC, weight, bias, seq_idx=None, cu_seqlens=None, cu_seqlens_cpu=None):
        w = weight.squeeze(1).to(xBC.dtype)
        bb = None if bias is None else bias.to(xBC.dtype)
        if seq_idx is None:
            out, _ = fn(xBC.contiguous(), w, bb, activation="silu")
            return out
        # varlen form: all rows as one of b * L tokens, the conv restarting at every cu_seqlens offset.
        b, L, d = xBC.shape
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_seq_idx(seq_idx)
        extra = {"cu_seqlens_cpu": cu_seqlens_cpu} if takes_cpu and cu_seqlens_cpu is not None else {}
        out, _ = fn(xBC.reshape(1, b * L, d).contiguous(), w, bb, activation="silu", cu_seqlens=cu_seqlens, **extra)
        return out.view(b, L, d)

    return run


def _triton_gated_norm(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(y, z, weight, eps, group_size):
        shape = y.shape
        out = fn(y.reshape(-1, shape[-1]), weight, None, z=z.reshape(-1, shape[-1]).to(y.dtype), eps=eps,
                 group_size=group_size, norm_before_gate=False)
        return out.view(shape)

    return run


def _triton_norms(fn: Callable[..., Any]) -> dict[str, Callable[..., torch.Tensor]]:
    """``kind -> (x, weight, bias_or_None, eps) -> norm(x)`` over mamba-ssm's ``layer_norm_fn``: statistics
    and the affine in fp32, the result in ``x``'s dtype (what :func:`.parallel.rms_norm` computes), and
    ``x`` plus the fp32 ``rstd`` saved for backward."""

    from .parallel import layer_norm, rms_norm

    def rms(x, weight, bias, eps):
        if _capturing():
            return rms_norm(x, weight, eps)
        return fn(x, weight, None, eps=eps, is_rms_norm=True)

    def layer(x, weight, bias, eps):
        if _capturing():
            return layer_norm(x, weight, bias, eps)
        return fn(x, weight, bias, eps=eps, is_rms_norm=False)

    return {"rms": rms, "layer": layer}


def _varlen_attention() -> Callable[..., torch.Tensor]:
    """PyTorch's varlen flash attention (``torch.nn.attention.varlen.varlen_attn``, PyTorch >= 2.9) as
    ``run(q, k, v, packed)``: ``q`` ``[T, heads, d]``, ``k``/``v`` ``[T, kv_heads, d]`` over the ``T = b * L``
    tokens of :class:`PackedSequences` ``packed``, causal within each sample. Its keyword for causality
    and whether it takes grouped KV heads changed between releases; both are read from its signature."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]
        extra = dict(causal)
        if rep > 1 and gqa:
            extra["enable_gqa"] = True
        elif rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        cu, n = packed.cu_seqlens, packed.max_seqlen
        return varlen_attn(q, k, v, cu, cu, n, n, **extra)

    return run


def _torch_varlen() -> dict[str, Callable[..., Any]]:
    return {"attn": _varlen_attention()}


def _capturing() -> bool:
    """True while a CUDA graph is being captured (the decode step): the norm and activation kernels
    step aside for the plain-PyTorch ops there, since an autotuning Triton kernel or a recompiling
    ``torch.compile`` function cannot run inside a capture; a one-token step gains nothing from them."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@functools.cache
def _compiled_squared_relu() -> Callable[[torch.Tensor], torch.Tensor]:
    """``relu(x)^2`` with forward and backward each one fused elementwise kernel (``torch.compile``,
    dynamic shapes: compiled once per process), saving only ``x`` like :func:`.mlp.squared_relu`."""
    from .mlp import relu_squared, relu_squared_grad, squared_relu, squared_relu_function

    fused = squared_relu_function(torch.compile(relu_squared, dynamic=True, fullgraph=True),
                                  torch.compile(relu_squared_grad, dynamic=True, fullgraph=True))

    def run(x: torch.Tensor) -> torch.Tensor:
        if _capturing():
            return squared_relu(x)
        return fused.apply(x)

    return run


_COMPILED_RELU2 = "torch.compile (one fused kernel forward, one backward)"
_SDPA_BLOCK_MASK = "SDPA with a block-diagonal causal boolean mask (every key block computed)"
_VARLEN = "PyTorch varlen flash attention (torch.nn.attention.varlen, causal per sample)"
#: What the report says of packed attention when the varlen kernel imports: attention.py takes it only
#: for 16-bit inputs without a padding mask, so the report names both; :meth:`Kernels.record` says which ran.
_VARLEN_OR_MASK = (f"{_VARLEN} for bf16/fp16 packed rows without a padding mask, else {_SDPA_BLOCK_MASK}")
#: Packed attention paths as :meth:`Kernels.record` names them (``attention.py`` picks one per call).
PACKED_VARLEN = "varlen flash attention"
PACKED_MASK_NO_KERNEL = "SDPA block mask (no varlen kernel selected)"
PACKED_MASK_FP32 = "SDPA block mask (fp32 inputs: the varlen kernel takes bf16/fp16 only)"
PACKED_MASK_PADDING = "SDPA block mask (rows with a padding mask)"


# ----------------------------------------------------------------------------------- selection
@dataclass
class Kernels:
    """The model's ops: callables plus the name of each implementation (for the run's report).

    ``norms`` maps a norm kind (``"rms"``, ``"layer"``) to ``(x, weight, bias_or_None, eps) -> y``, and
    ``relu2`` is the LM's activation; ``None`` in either means the modules' own reference code.
    """

    scan: Callable[..., torch.Tensor]
    conv: Callable[..., torch.Tensor]
    gated_norm: Callable[..., torch.Tensor]
    chunked_loss: bool
    norms: dict[str, Callable[..., torch.Tensor]] | None = None
    relu2: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: packed rows' causal attention, ``(q [T, H, d], k, v [T, KV, d], PackedSequences) -> [T, H, d]``;
    #: ``None``: SDPA with the block-diagonal causal mask (:func:`.attention.packed_attention_mask`)
    packed_attention: Callable[..., torch.Tensor] | None = None
    names: dict[str, str] = field(default_factory=dict)
    #: op -> the implementations that actually ran, in first-use order (ops whose path depends on the
    #: inputs: ``packed_attention``), filled by :meth:`record`
    ran: dict[str, list[str]] = field(default_factory=dict)

    def record(self, op: str, impl: str) -> None:
        """Note that ``op`` ran as ``impl`` (kept once): what the run's "kernels that ran" line reports."""
        seen = self.ran.setdefault(op, [])
        if impl not in seen:
            seen.append(impl)


def select_kernels(choice: str, device: torch.device | str) -> Kernels:
    """The implementations for ``model.kernels=choice`` on ``device`` (see the module docstring)."""
    from .ssd import compiled_ssd_scan, ssd_scan

    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model.kernels must be one of {', '.join(KERNEL_CHOICES)}; got {choice!r}")
    cuda = torch.device(device).type == "cuda"
    ref_scan = _fp32_scan(ssd_scan)
    k = Kernels(scan=ref_scan, conv=conv_reference, gated_norm=gated_norm_reference, chunked_loss=choice != "reference",
                names={"scan": "reference (PyTorch, fp32)", "conv": "reference (F.conv1d)",
                       "gated_norm": "reference (PyTorch, fp32)", "norm": "reference (PyTorch, fp32)",
                       "relu2": "reference (PyTorch)", "packed_attention": _SDPA_BLOCK_MASK})
    if choice == "reference":
        k.names["loss"] = "reference (full logits)"
        return k
    k.names["loss"] = "chunked vocab-parallel cross-entropy (logits recomputed in backward)"
    if choice == "compiled":
        k.scan, k.names["scan"] = _fp32_scan(compiled_ssd_scan()), "reference, torch.compile"
        if cuda:
            k.relu2, k.names["relu2"] = _compiled_squared_relu(), _COMPILED_RELU2
        return k
    if not cuda:
        if choice in ("mamba_ssm", "fla"):
            raise ValueError(f"model.kernels={choice}: Triton kernels need a CUDA device; use auto or reference on CPU")
        return k
    mamba = _try(_mamba_triton)
    fla = _try(_fla)
    if choice == "mamba_ssm" and mamba is None:
        raise ValueError("model.kernels=mamba_ssm but mamba-ssm's Triton kernels cannot be imported "
                         f"({_LOAD_ERRORS.get('_mamba_triton', '?')}); pip install 'nvl-nemotron-vl[gpu]' (or "
                         "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
                         "pip install --no-build-isolation mamba-ssm)")
    if choice == "fla" and fla is None:
        raise ValueError("model.kernels=fla but flash-linear-attention cannot be imported "
                         f"({_LOAD_ERRORS.get('_fla', '?')}); pip install fla-core")
    if mamba is not None and choice in ("auto", "mamba_ssm"):
        k.scan, k.names["scan"] = _mamba_scan(mamba["scan"]), "mamba-ssm mamba_chunk_scan_combined (Triton)"
    elif fla is not None and choice in ("auto", "fla"):
        k.scan, k.names["scan"] = _fla_scan(fla["simple_gla"]), "flash-linear-attention chunk_simple_gla (Triton)"
    else:
        k.scan, k.names["scan"] = _fp32_scan(compiled_ssd_scan()), "reference, torch.compile (no kernel library)"
    if fla is not None:
        k.conv, k.names["conv"] = _fla_conv(fla["conv"]), "flash-linear-attention causal_conv1d (Triton)"
    if mamba is not None:
        k.gated_norm, k.names["gated_norm"] = _triton_gated_norm(mamba["rmsnorm"]), "mamba-ssm rmsnorm_fn (Triton)"
        k.norms, k.names["norm"] = _triton_norms(mamba["layer_norm"]), "mamba-ssm layer_norm_fn (Triton)"
    elif fla is not None:
        k.gated_norm = _triton_gated_norm(fla["rmsnorm"])
        k.names["gated_norm"] = "flash-linear-attention rmsnorm_fn (Triton)"
    k.relu2, k.names["relu2"] = _compiled_squared_relu(), _COMPILED_RELU2
    varlen = _try(_torch_varlen)
    if varlen is not None:
        k.packed_attention = varlen["attn"]
        k.names["packed_attention"] = _VARLEN_OR_MASK
    if choice == "auto":
        _warn_reference_on_gpu(k)
    return k


_WARNED_FALLBACK = False


def _warn_reference_on_gpu(k: Kernels) -> None:
    """Warn once per process when ``model.kernels=auto`` on a GPU leaves ops on the reference (a kernel
    library missing or failing to import): a run then is slower than it need be, and says why."""
    global _WARNED_FALLBACK
    ops = [op for op in ("scan", "conv", "gated_norm", "norm") if k.names[op].startswith("reference")]
    if k.packed_attention is None:
        ops.append("packed_attention")
    if not ops or _WARNED_FALLBACK:
        return
    _WARNED_FALLBACK = True
    import warnings

    why = "; ".join(f"{name.lstrip('_')}: {err}" for name, err in _LOAD_ERRORS.items()) or "no kernel library"
    warnings.warn(f"model.kernels=auto on a GPU runs the reference implementation for {', '.join(ops)} ({why}); "
                  "install the kernels with pip install 'nvl-nemotron-vl[gpu]' (PyTorch >= 2.9 for varlen "
                  "attention), or set model.kernels=reference to choose it", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------- LM loss
def chunked_vocab_parallel_loss(
    hidden: torch.Tensor, labels: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy ``[B, L]`` (fp32, 0 where ``labels < 0``) without all logits at once.

    Tokens are processed ``chunk_tokens`` at a time: each chunk's logits (this rank's vocabulary shard,
    from ``logits_fn``) exist only inside a checkpointed function, so the fp32 logits of a 131k
    vocabulary are never materialised for the whole sequence; backward recomputes one chunk at a time.
    The values equal the full computation's (same ops per token).
    """
    from torch.utils.checkpoint import checkpoint

    from ..memory import LOSS_CHUNK_TOKENS  # the memory plan counts one chunk's logits: one constant for both

    chunk_tokens = chunk_tokens or LOSS_CHUNK_TOKENS
    B, L, H = hidden.shape
    flat_h = hidden.reshape(B * L, H)
    flat_y = labels.reshape(B * L)
    out = []
    for s in range(0, B * L, chunk_tokens):
        h, y = flat_h[s:s + chunk_tokens], flat_y[s:s + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_loss, h, y, logits_fn, use_reentrant=False))
        else:
            out.append(_chunk_loss(h, y, logits_fn))
    return torch.cat(out).view(B, L)


def _chunk_loss(h: torch.Tensor, y: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ignore = y < 0
    logits = logits_fn(h[None])[0]
    # Megatron's CE subtracts the max in place on its (fp32) input; give it a tensor of its own.
    x = logits.float() if logits.dtype != torch.float32 else logits.clone()
    return vocab_parallel_cross_entropy(x, y.masked_fill(ignore, 0)).masked_fill(ignore, 0.0)
