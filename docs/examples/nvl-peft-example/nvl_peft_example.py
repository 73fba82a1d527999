"""nvl plugin: ``peft.method=vera``, a VeRA-style method (Kopiczko et al. 2024, "VeRA: Vector-based Random
Matrix Adaptation"). Each target linear layer ``W`` gets a frozen random pair ``A [r, in]``, ``B [out, r]``
and learns only two vectors, ``d [r]`` and ``b [out]``: the layer computes ``W x + b ⊙ (B (d ⊙ (A x)))``.
``b`` starts at 0 (the model unchanged), ``d`` at ``d_initial``. Merging adds ``diag(b) B diag(d) A`` to ``W``.

Unlike the paper, which shares one pair across layers, each layer's pair is drawn from
``projection_prng_key`` and the layer's name, so the pair needs no storage: the checkpoint holds only the
vectors and :meth:`VeRA.apply` regenerates the same matrices. ``r`` is the core ``peft.dim``.

It implements :class:`nvlcore.contracts.PeftMethod` (``apply``, ``adapter_parameters``,
``load_trainable_state_dict``, ``merge``) and declares its ``peft.*`` fields in ``Config``. See
docs/plugin-authors.md, "Add a PEFT method".
"""

import fnmatch
import hashlib

import attrs

from nvlcore import hookimpl

ATTR = "vera"  # the adapter is this child of the adapted layer: `...linear_qkv.vera.vera_b`


def _absent(name, default):
    """VeRA has no alpha or dropout: the core ``peft`` fields it cannot honour are refused, not ignored."""

    def check(_inst, _attr, value):
        if value != default:
            raise ValueError(f"peft.{name}={value!r} has no meaning for vera (no alpha, no dropout); remove it")

    return check


@attrs.define
class VeRAConfig:
    """``peft.*`` fields of ``peft.method=vera``: the core ones it refuses, and its own (peft's VeraConfig names)."""

    alpha: float = attrs.field(default=32, converter=float, validator=_absent("alpha", 32.0))
    dropout: float = attrs.field(default=0.0, converter=float, validator=_absent("dropout", 0.0))
    dropout_position: str = attrs.field(default="pre", validator=_absent("dropout_position", "pre"))
    d_initial: float = attrs.field(default=0.1, converter=float)  # the initial value of every d
    projection_prng_key: int = 0  # seeds the frozen random matrices


def _selected(name, targets, excluded):
    """A pattern selects a module by its short name (``linear_qkv``) or its full name with wildcards."""

    def hit(p):
        return p == name.rsplit(".", 1)[-1] or fnmatch.fnmatchcase(name, p)

    return any(hit(p) for p in targets or ["*"]) and not any(hit(p) for p in excluded)


def _uniform(shape, fan_in, seed, torch):
    """kaiming_uniform(a=sqrt(5)) as nn.Linear draws it (bound 1/sqrt(fan_in)), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1) / fan_in**0.5


def _add_delta(module, args, output):
    import torch.nn.functional as F

    v = module.get_submodule(ATTR)
    x = args[0]
    if getattr(module, "layer_norm_weight", None) is not None:  # a norm-fused linear: W sees the normalised input
        x = module.normalize(x)
    h = F.linear(x.to(v.vera_A.dtype), v.vera_A) * v.vera_d
    delta = F.linear(h, v.vera_B) * v.vera_b
    if isinstance(output, tuple):  # Megatron's parallel linears return (output, bias or None)
        return (output[0] + delta.to(output[0].dtype), *output[1:])
    return output + delta.to(output.dtype)


class VeRA:
    """The registered ``vera`` method."""

    Config = VeRAConfig

    def apply(self, model, *, bridge=None, target_modules=(), exclude_modules=(), dim=16, d_initial=0.1,
              projection_prng_key=0, **_checked):
        """Freeze every parameter and give each selected linear layer its vectors and frozen random pair."""
        import torch

        for p in model.parameters():
            p.requires_grad_(False)
        found = [(n, m) for n, m in model.named_modules()
                 if n and getattr(m, "weight", None) is not None and getattr(m.weight, "ndim", 0) == 2
                 and _selected(n, list(target_modules), list(exclude_modules))]
        if not found:
            raise ValueError(f"peft.target_modules {list(target_modules)} selected no layer with a 2-D weight")
        for name, module in found:
            if getattr(module, "output_size_per_partition", None) not in (None, getattr(module, "output_size", None)) \
                    or getattr(module, "input_size_per_partition",
                               None) not in (None, getattr(module, "input_size", None)):
                raise ValueError(f"{name}: vera (nvl-peft-example) runs at model.tensor_model_parallel_size=1 only")
            out_f, in_f = module.weight.shape
            seed = int.from_bytes(hashlib.sha256(f"{projection_prng_key}:{name}".encode()).digest()[:7], "little")
            v = torch.nn.Module()
            v.register_buffer("vera_A", _uniform((dim, in_f), in_f, seed, torch), persistent=False)
            v.register_buffer("vera_B", _uniform((out_f, dim), dim, seed + 1, torch), persistent=False)
            v.vera_d = torch.nn.Parameter(torch.full((dim,), float(d_initial)))
            v.vera_b = torch.nn.Parameter(torch.zeros(out_f))
            module.add_module(ATTR, v.to(module.weight.device))
            module.__dict__["_vera_hook"] = module.register_forward_hook(_add_delta)
        return model

    def adapter_parameters(self, model):
        """Each adapted layer's ``vera_d`` and ``vera_b``, by full name."""
        return {f"{n}.{ATTR}.{k}": p for n, m in model.named_modules() if "_vera_hook" in m.__dict__
                for k, p in m.get_submodule(ATTR).named_parameters()}

    def load_trainable_state_dict(self, model, state):
        """Copy the vectors in ``state`` (full names) into the model; a missing one or a wrong shape is an error."""
        import torch

        own = self.adapter_parameters(model)
        missing = sorted(set(own) - set(state))
        if missing:
            raise KeyError(f"vera state lacks {len(missing)} vector(s), e.g. {missing[0]}")
        with torch.no_grad():
            for key, p in own.items():
                if tuple(state[key].shape) != tuple(p.shape):
                    raise ValueError(f"vera vector {key}: shape {tuple(state[key].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[key])
        return sorted(own)

    def merge(self, model):
        """Add ``diag(b) B diag(d) A`` to every adapted weight (fp32, cast back) and remove the adapters."""
        import torch

        with torch.no_grad():
            for module in list(model.modules()):
                handle = module.__dict__.pop("_vera_hook", None)
                if handle is None:
                    continue
                handle.remove()
                v = module.get_submodule(ATTR)
                delta = (v.vera_b[:, None] * v.vera_B.float()) @ (v.vera_d[:, None] * v.vera_A.float())
                module.weight.copy_((module.weight.float() + delta.to(module.weight.device)).to(module.weight.dtype))
                delattr(module, ATTR)
        return model


@hookimpl
def nvl_register_peft_methods(register):
    register("vera", VeRA, aliases=("VeRA",))
