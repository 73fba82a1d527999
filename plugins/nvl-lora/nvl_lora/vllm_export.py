"""``nvl export --format hf-peft --target vllm``: a LoRA adapter that ``vllm serve --lora-modules`` loads as it is.

vLLM serves LoRA adapters on a model's language model only, under its own module names, without DoRA and
without ``modules_to_save``. The model bridge says, module by module, what vLLM calls it or that vLLM serves
no adapter there (:meth:`nvlcore.bridge.ModelBridge.vllm_adapter_module`). The export then writes:

* ``OUTPUT/adapter_config.json`` + ``adapter_model.safetensors``: the adapters vLLM serves, named as vLLM
  names the modules (fused QKV adapters split into q/k/v adapters sharing a copy of A, exact, as in the
  plain ``hf-peft`` export; vLLM packs them back into its ``qkv_proj``);
* ``OUTPUT/base/`` when the run changed anything else (the README's LoRA recipe trains the vision tower and
  projector fully; adapters on the vision tower; any tensor trained fully): an HF model directory, the run's
  model without the served adapters, i.e. the base those adapters apply to (written by ``nvl peft merge
  --format hf`` with the served adapters left out; the language model is the original unless the run
  trained part of it fully). ``adapter_config.json``'s ``base_model_name_or_path`` names the base to
  serve: ``OUTPUT/base``, or ``--hf-model-path`` when the run changed nothing else;
* ``OUTPUT/vllm_serve.json``: that base and the ``vllm serve`` arguments the adapter needs
  (``nvlcore.serve.vllm_backend`` reads it), and a README with the command line.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

#: vLLM's ``MaxLoRARanks`` (``vllm/config/lora.py``): ``--max-lora-rank`` takes one of these.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PEFT_PREFIX = "base_model.model."
MANIFEST = "vllm_serve.json"


def vllm_max_lora_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds rank ``r``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


def split_for_vllm(bridge: Any, by_module: dict[str, dict[str, tuple[Any, ...]]]
                   ) -> tuple[dict[str, tuple[Any, ...]], set[str]]:
    """``({vLLM module name: (A, B)}, {training modules whose adapters go into the base})``.

    A training module whose HF modules vLLM names only in part cannot be split between adapter and base.
    """
    served: dict[str, tuple[Any, ...]] = {}
    merged: set[str] = set()
    for module, hf in sorted(by_module.items()):
        names = {h: bridge.vllm_adapter_module(h) for h in hf}
        if all(n is None for n in names.values()):
            merged.add(module)
            continue
        if any(n is None for n in names.values()):
            raise ValueError(f"vLLM serves adapters on only part of {module} ({sorted(names)})")
        if any(len(t) != 2 for t in hf.values()):
            raise ValueError(f"{module} carries a DoRA adapter, which vLLM does not serve (its adapter loader "
                             "refuses use_dora); use `nvl peft merge --format hf` and serve the merged model")
        served.update({names[h]: t for h, t in hf.items()})
    if not served:
        raise ValueError("the run has no adapter vLLM can serve (vLLM serves adapters on the language model "
                         "only); use `nvl peft merge --format hf` and serve the merged model")
    return served, merged


def export_for_vllm(*, checkpoint: Path, hf_model_path: Path, output: Path, overwrite: bool, plugin_manager: Any,
                    dtype: str | None, pretrained: str | Path | None) -> Path:
    """Write the vLLM adapter (and its base where needed) to ``output``; returns ``output``."""
    import torch
    from safetensors.torch import save_file

    from nvl_lora.layout import adapters_by_module
    from nvl_lora.merge_io import merge_checkpoints, read_lora_run
    from nvlcore.bridge import resolve_bridge
    from nvlcore.checkpoint import atomic_output_dir, check_can_write

    output = Path(output).expanduser().absolute()
    check_can_write(output, overwrite=overwrite, what="--output")
    ck, peft, rc = read_lora_run(checkpoint)
    bridge = resolve_bridge(hf_model_path, manager=plugin_manager)
    by_module, trained = adapters_by_module(bridge.mapping_table(), ck.load())
    if not by_module:
        raise ValueError(f"{ck.path} holds no LoRA adapter tensors")
    served, merged = split_for_vllm(bridge, by_module)
    r = int(peft["dim"])
    cast = getattr(torch, dtype) if dtype else None
    tensors = {f"{PEFT_PREFIX}{name}.lora_{ab}.weight": (t.to(cast) if cast else t).detach().contiguous().clone()
               for name, pair in served.items() for ab, t in zip("AB", pair, strict=True)}
    needs_base = bool(merged or trained)
    # a Hub id names the cached snapshot the bridge resolved
    base = output / "base" if needs_base else Path(bridge.hf_dir or hf_model_path).expanduser().absolute()
    with atomic_output_dir(output, overwrite=overwrite, what="--output") as tmp:
        if needs_base:
            served_modules = set(by_module) - merged
            print(f"nvl export: vLLM serves adapters on the language model only; writing {base}: the run's model "
                  f"without them ({len(merged)} other adapted module(s) merged, {len(trained)} fully trained "
                  "tensor(s)); serve it with the adapter", file=sys.stderr)
            merge_checkpoints(hf_model_path=hf_model_path, lora_checkpoint=ck.path, output=tmp / "base",
                              pretrained=pretrained, fmt="hf", plugin_manager=plugin_manager,
                              keep_adapter=lambda m: m not in served_modules)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = _adapter_config(sorted(served), peft, base)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        manifest = {"base_model": str(base), "adapter_args": ["--enable-lora", "--max-lora-rank",
                                                              str(vllm_max_lora_rank(r))],
                    "module_option": "--lora-modules"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(ck.path, config, base, output, manifest, needs_base))
    return output


def _adapter_config(targets: list[str], peft: dict[str, Any], base: Path) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` as vLLM's ``PEFTHelper`` reads it (no DoRA, no ``modules_to_save``)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": int(peft["dim"]), "lora_alpha": float(peft["alpha"]), "lora_dropout": float(peft.get("dropout") or 0.0),
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def _readme(source: Path, config: dict[str, Any], base: Path, output: Path, manifest: dict[str, Any],
            needs_base: bool) -> str:
    line = shlex.join(["vllm", "serve", str(base), "--trust-remote-code", *manifest["adapter_args"],
                       manifest["module_option"], f"{output.name}={output}"])
    return (
        "# LoRA adapter for vLLM, exported by `nvl export --format hf-peft --target vllm`\n\n"
        f"- source checkpoint: `{source}`\n- r={config['r']}, lora_alpha={config['lora_alpha']:g}, "
        f"{len(config['target_modules'])} language-model modules, named as vLLM names them\n"
        + ("- `base/`: the run's model without these adapters (what the run changed outside them); serve it, "
           "not the original model\n" if needs_base else f"- base: the original model `{base}`\n")
        + f"\n```bash\n{line}\n```\n\n`nvl serve --backend vllm` adds this model's recommended settings.\n"
    )
