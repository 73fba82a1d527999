"""Random initialisation with realistic scales, shared by the model (TP-local shards) and toy checkpoints.

One rule per parameter family, keyed on the Megatron-style name, so a toy checkpoint and a randomly
initialised model have the same statistics: linear weights N(0, 0.02) (residual-branch outputs scaled
by 1/sqrt(2 * layers)), norms near 1, Mamba ``A_log = log U(1, 16)``, ``dt_bias`` the inverse softplus of
a log-uniform time step in [time_step_min, time_step_max], ``D`` near 1. Norm weights and biases get a
little noise so that tests can tell parameters apart.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..config import NemotronVLConfig

_RESIDUAL_OUT = ("mixer.out_proj.weight", "self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _component_base(name: str) -> str:
    # "...in_proj.weight.z" -> "...in_proj.weight"
    head, _, tail = name.rpartition(".")
    return head if tail in {"z", "x", "B", "C", "dt", "q", "k", "v"} else name


def init_tensor(name: str, shape: tuple[int, ...], cfg: NemotronVLConfig, generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A freshly initialised fp32 tensor for parameter ``name`` (Megatron naming, component suffix allowed)."""
    base = _component_base(name)
    kw = dict(generator=generator, device=device, dtype=torch.float32)
    llm = cfg.llm
    if base.endswith(("layer_norm_weight", "final_norm.weight", "mixer.norm.weight")):
        return 1.0 + 0.05 * torch.randn(shape, **kw)
    if base.endswith("A_log"):
        return torch.log(1.0 + 15.0 * torch.rand(shape, **kw))
    if base.endswith("mixer.D"):
        return 0.5 + torch.rand(shape, **kw)
    if base.endswith("dt_bias"):
        lo, hi = math.log(llm.time_step_min), math.log(llm.time_step_max)
        dt = torch.exp(lo + (hi - lo) * torch.rand(shape, **kw)).clamp(min=llm.time_step_floor)
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if base.endswith("conv1d.weight") or base.endswith("conv1d.bias"):
        bound = 1.0 / math.sqrt(llm.conv_kernel)
        return (2 * torch.rand(shape, **kw) - 1) * bound
    if base.endswith(("bias", "layer_norm_bias")):
        return 0.02 * torch.randn(shape, **kw)
    std = 0.02
    if base.startswith("language_model.") and base.endswith(_RESIDUAL_OUT):
        std = 0.02 / math.sqrt(2 * llm.num_layers)
    return std * torch.randn(shape, **kw)


def seed_for(seed: int, name: str, rank: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{rank}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters(model: torch.nn.Module, cfg: NemotronVLConfig, seed: int = 1234, tp_rank: int = 0) -> None:
    """Fill every parameter of ``model`` (this rank's shards) in place, deterministically per name and rank.

    Replicated parameters (norms, ViT embeddings) get the same values on every rank; split ones get
    independent draws per rank. A parameter in host memory of a process that already uses a GPU (a model built
    in host memory for a GPU run, ``model.use_cpu_initialization``) is drawn on that GPU, one parameter at a time,
    and copied back: the CPU's generator takes minutes over a 12B model, and the values are then those a model
    built on the GPU gets.
    """
    gpu = (torch.device("cuda", torch.cuda.current_device())
           if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    for name, p in model.named_parameters():
        rank = tp_rank if getattr(p, "tensor_model_parallel", False) else 0
        where = gpu if gpu is not None and p.device.type == "cpu" else p.device
        gen = torch.Generator(device=where)
        gen.manual_seed(seed_for(seed, name, rank))
        p.copy_(init_tensor(name, tuple(p.shape), cfg, gen, device=where))
