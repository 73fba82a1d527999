"""nvl plugin: ``peft.method=ia3``, IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning") in the form of peft's ``IA3Config`` for non-feed-forward
targets: every target linear layer's output is multiplied by a learned vector ``l`` (one value per
output channel, initialised to ``init_value``, 1.0 = the model unchanged); everything else is frozen.
Merging folds ``l`` into the layer: ``W' = diag(l) W``, ``b' = l * b``.

It implements :class:`nvlcore.contracts.PeftMethod` (``apply``, ``adapter_parameters``,
``load_trainable_state_dict``, ``merge``) and declares its ``peft.*`` fields in ``Config``. See
docs/plugin-authors.md, "Add a PEFT method".
"""

import fnmatch

import attrs

from nvlcore import hookimpl

ATTR = "ia3"  # the vector's holder is this child of the adapted layer: `...linear_qkv.ia3.weight`


def _absent(name, default):
    """IA3 has no rank, scale or dropout: the core ``peft`` fields it cannot honour are refused, not ignored."""

    def check(_inst, _attr, value):
        if value != default:
            raise ValueError(f"peft.{name}={value!r} has no meaning for IA3 (no rank, scale or dropout); remove it")

    return check


@attrs.define
class IA3Config:
    """``peft.*`` fields of ``peft.method=ia3``: the core ones it refuses, and its own."""

    dim: int = attrs.field(default=16, validator=_absent("dim", 16))
    alpha: float = attrs.field(default=32, converter=float, validator=_absent("alpha", 32.0))
    dropout: float = attrs.field(default=0.0, converter=float, validator=_absent("dropout", 0.0))
    dropout_position: str = attrs.field(default="pre", validator=_absent("dropout_position", "pre"))
    init_value: float = attrs.field(default=1.0, converter=float)  # the vectors' initial value


def _selected(name, targets, excluded):
    """A pattern selects a module by its short name (``linear_qkv``) or its full name with wildcards."""

    def hit(p):
        return p == name.rsplit(".", 1)[-1] or fnmatch.fnmatchcase(name, p)

    return any(hit(p) for p in targets or ["*"]) and not any(hit(p) for p in excluded)


def _scale_output(module, _args, output):
    scale = module.get_submodule(ATTR).weight
    if isinstance(output, tuple):  # Megatron's parallel linears return (output, bias or None)
        bias = output[1] if len(output) > 1 and output[1] is not None else None
        out = (output[0] * scale).to(output[0].dtype)
        return (out, None if bias is None else (bias * scale).to(bias.dtype), *output[2:])
    return (output * scale).to(output.dtype)


class IA3:
    """The registered ``ia3`` method."""

    Config = IA3Config

    def apply(self, model, *, bridge=None, target_modules=(), exclude_modules=(), init_value=1.0, **_checked):
        """Freeze every parameter and give each selected linear layer a trainable output scale."""
        import torch

        for p in model.parameters():
            p.requires_grad_(False)
        found = [(n, m) for n, m in model.named_modules()
                 if n and getattr(m, "weight", None) is not None and getattr(m.weight, "ndim", 0) == 2
                 and _selected(n, list(target_modules), list(exclude_modules))]
        if not found:
            raise ValueError(f"peft.target_modules {list(target_modules)} selected no layer with a 2-D weight")
        for name, module in found:
            if getattr(module, "output_size_per_partition", None) not in (None, getattr(module, "output_size", None)):
                raise ValueError(f"{name}: ia3 (nvl-peft-example) runs at model.tensor_model_parallel_size=1 only")
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(torch.full((module.weight.shape[0],), float(init_value),
                                                          device=module.weight.device))
            module.add_module(ATTR, holder)
            module.__dict__["_ia3_hook"] = module.register_forward_hook(_scale_output)
        return model

    def adapter_parameters(self, model):
        """Each adapted layer's vector, by full name."""
        return {f"{n}.{ATTR}.weight": m.get_submodule(ATTR).weight
                for n, m in model.named_modules() if "_ia3_hook" in m.__dict__}

    def load_trainable_state_dict(self, model, state):
        """Copy the vectors in ``state`` (full names) into the model; a missing one or a wrong shape is an error."""
        import torch

        own = self.adapter_parameters(model)
        missing = sorted(set(own) - set(state))
        if missing:
            raise KeyError(f"IA3 state lacks {len(missing)} vector(s), e.g. {missing[0]}")
        with torch.no_grad():
            for key, p in own.items():
                if tuple(state[key].shape) != tuple(p.shape):
                    raise ValueError(f"IA3 vector {key}: shape {tuple(state[key].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[key])
        return sorted(own)

    def merge(self, model):
        """Fold every vector into its layer (``W' = diag(l) W``, ``b' = l * b``) and remove it."""
        import torch

        with torch.no_grad():
            for _, module in list(model.named_modules()):
                handle = module.__dict__.pop("_ia3_hook", None)
                if handle is None:
                    continue
                handle.remove()
                scale = module.get_submodule(ATTR).weight.float()
                module.weight.copy_((module.weight.float() * scale[:, None]).to(module.weight.dtype))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_((module.bias.float() * scale).to(module.bias.dtype))
                delattr(module, ATTR)
        return model


@hookimpl
def nvl_register_peft_methods(register):
    register("ia3", IA3, aliases=("IA3",))
