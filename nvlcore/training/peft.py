"""Applying a PEFT method: the one lookup in the ``peft_method`` registry, the one way the ``peft``
section's method options are merged, and the one way a PEFT run's checkpoint is put back on a model.

* :func:`apply_peft_method`: ``nvl finetune`` (the run's ``peft`` section) and :func:`apply_peft_run`
  (the section recorded in a run's ``run_config.yaml``) both apply a method through it;
* :func:`open_peft_run` / :func:`apply_peft_run`: ``--adapter-checkpoint`` of ``nvl generate`` and
  ``nvl eval`` (through :mod:`nvlcore.inference`): the run's config is rebuilt, so the same
  parameters train (``model.freeze_*``, then the method) and exactly those are read back from the
  adapter-only checkpoint, whatever the method calls its parameters.

Importing this module is cheap; torch and the checkpoint machinery are imported inside functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

    from nvlcore.parallel import ParallelContext


def apply_peft_method(model: torch.nn.Module, peft: Mapping[str, Any], *, bridge: Any, manager: Any) -> Any:
    """Apply the PEFT method a ``peft`` section names to ``model``; returns the method object, or None
    when ``peft["method"]`` is empty.

    The method is looked up in ``manager``'s ``peft_method`` registry; the section's fields, with the
    method's own ``options`` merged in, are its keyword arguments.

    :raises ValueError: when no installed plugin provides the method.
    """
    section = dict(peft)
    name = section.pop("method", None)
    if not name:
        return None
    try:
        target = manager.registry("peft_method").get(name)
    except Exception as exc:
        raise ValueError(
            f"peft.method={name!r} is not available ({exc}); install the plugin that provides it "
            "(`nvl plugins list --all` shows the installed PEFT methods)"
        ) from exc
    section.update(section.pop("options", None) or {})
    method = target() if isinstance(target, type) else target
    check_peft_method(method, name)
    method.apply(model, bridge=bridge, **section)
    return method


def check_peft_method(method: Any, name: str) -> None:
    """Refuse, in one line, a registered PEFT method that lacks a method of :class:`nvlcore.contracts.PeftMethod`."""
    from nvlcore.contracts import PeftMethod

    if not isinstance(method, PeftMethod):
        missing = [m for m in ("apply", "adapter_parameters", "load_trainable_state_dict", "merge")
                   if not callable(getattr(method, m, None))]
        raise TypeError(f"peft.method={name!r} ({type(method).__name__}) lacks {', '.join(missing)} of "
                        "nvlcore.contracts.PeftMethod; update the plugin that registers it")


@attrs.frozen
class PeftRun:
    """The checkpoint of a PEFT run (``nvl finetune`` with ``peft.method`` set).

    :param path: its ``iter_N`` directory.
    :param run_config: its ``run_config.yaml``.
    """

    path: Path
    run_config: Mapping[str, Any]

    @property
    def method(self) -> str:
        return str((self.run_config.get("peft") or {}).get("method"))

    def recorded_base(self) -> Path | None:
        """The run's ``checkpoint.pretrained_checkpoint`` when it is an nvl checkpoint that still exists
        (an HF directory is None: its weights are those of the model's HF directory)."""
        from nvlcore.bridge import is_hf_dir

        src = (self.run_config.get("checkpoint") or {}).get("pretrained_checkpoint")
        if not src:
            return None
        p = Path(src).expanduser()
        return p if p.exists() and not is_hf_dir(p) else None


def open_peft_run(path: str | Path, *, option: str = "--adapter-checkpoint") -> PeftRun:
    """The PEFT run whose checkpoint is ``path`` (a base directory: its latest iteration; or ``iter_N``).

    :raises ValueError: naming ``option`` and the file when ``path`` is not one (a full checkpoint
        says to pass it as ``--megatron-model-path``).
    """
    from nvlcore.checkpoint import open_checkpoint

    try:
        ck = open_checkpoint(path)
    except Exception as exc:  # the checkpoint layer's errors name the file
        raise ValueError(f"{option} {path}: {exc}") from exc
    rc = ck.run_config()
    if rc is None:
        raise ValueError(f"{option}: {ck.path}/run_config.yaml is missing (is this a `nvl finetune` checkpoint?)")
    extra = ck.extra_state() or {}
    if not (rc.get("peft") or {}).get("method") or not extra.get("adapter_only", True):
        raise ValueError(
            f"{option} {ck.path}: its run_config.yaml has no peft.method, so it holds full weights; "
            "pass it as --megatron-model-path instead"
        )
    return PeftRun(Path(ck.path), rc)


def refuse_peft_run_as_weights(path: str | Path) -> None:
    """Raise when ``path``, given as full weights, is a PEFT run's adapter checkpoint: say what to type."""
    from nvlcore.checkpoint import open_checkpoint

    try:
        rc = open_checkpoint(path).run_config() or {}
    except Exception:  # not a checkpoint: loading it reports that
        return
    peft = rc.get("peft") or {}
    method = peft.get("method") or str(peft.get("_target_") or "").rsplit(".", 1)[-1]  # nvl's, or Megatron-Bridge's
    if method:
        raise ValueError(
            f"--megatron-model-path {path} is a {method} run's adapter checkpoint, not full weights; give it as "
            f"--adapter-checkpoint {path} (the base comes from --megatron-model-path BASE, the run's recorded "
            "pretrained checkpoint, or the HF directory)"
        )


def apply_peft_run(model: torch.nn.Module, run: PeftRun, *, bridge: Any, manager: Any, ctx: ParallelContext,
                   merge: bool = False) -> Any:
    """Put a PEFT run back on ``model`` (base weights already loaded): the run's ``model.freeze_*`` and
    its method, then the tensors it trained (adapters and fully trained towers) from its checkpoint;
    with ``merge`` the adapters are folded into the weights (``method.merge``). Every parameter is left
    with ``requires_grad=False``. Returns the method object.

    :raises ValueError: naming the checkpoint when its config or tensors do not fit the model.
    """
    from nvlcore.config import config_to_dict, load_config
    from nvlcore.training.checkpointing import load_model_weights

    try:
        cfg = load_config([], [], base=dict(run.run_config), plugins=manager)
    except Exception as exc:
        raise ValueError(f"--adapter-checkpoint: {run.path}/run_config.yaml: {exc}") from exc
    bridge.freeze(model, dict(cfg.model.freeze), key="model")
    method = apply_peft_method(model, config_to_dict(cfg)["peft"], bridge=bridge, manager=manager)
    try:
        load_model_weights(model, run.path, bridge=bridge, ctx=ctx, only_trainable=True)
    except KeyError as exc:
        raise ValueError(f"--adapter-checkpoint {run.path}: {exc.args[0] if exc.args else exc}") from exc
    if merge:
        method.merge(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return method
