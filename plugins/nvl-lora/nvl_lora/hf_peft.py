"""The ``hf-peft`` exporter: a LoRA checkpoint as a Hugging Face PEFT adapter.

``nvl export --format hf-peft --lora-checkpoint DIR --hf-model-path DIR --output DIR`` writes
``adapter_config.json`` and ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
applies to a model whose module names are the HF checkpoint's
(``language_model.backbone.layers.N.mixer.q_proj``, ``vision_model.radio_model.model.blocks.N.attn.qkv``,
``mlp1.1``...).

Fused adapters are split where the HF model has separate projections: the LM's ``linear_qkv`` adapter
(one A, one B whose rows are q, k and v) becomes three adapters ``q_proj``, ``k_proj``, ``v_proj``, each
with its rows of B and **a copy of the shared A**. This is exact: ``B @ A`` restricted to the q rows is
``B_q @ A``, so the three HF adapters add exactly what the fused one did (with the same ``r`` and
``lora_alpha``). Where the HF side is fused too (the ViT's ``attn.qkv``, Mamba ``in_proj``), B's rows
are put in the HF row order by the bridge's mapping.

Weights the run trained fully (``--lora-on-language-model`` trains the vision tower and projector)
travel in PEFT's ``modules_to_save``: each is mapped to its HF tensors, grouped into the largest HF
module whose every tensor the run trained (``vision_model``, ``mlp1``; the module's other tensors, if
any, are copied from ``--hf-model-path``), and saved under the module's own names, which is how
``peft`` saves and loads a ``modules_to_save`` module. A trained tensor that no HF module can carry
(no counterpart in the mapping, or the base weight of a layer that also has an adapter) is refused
in one line naming it; ``nvl peft merge`` writes a model with everything instead.

``-O for_causal_lm=true`` keeps only the language model's adapters and names them as in
transformers' ``NemotronHForCausalLM`` (``language_model.backbone.`` -> ``model.``), with
``task_type: CAUSAL_LM``: the adapter then loads onto the LM alone. ``-O module_prefix_map`` gives
other renames (``{"old.prefix.": "new.prefix."}``) and ``-O include`` keeps modules matching globs.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CAUSAL_LM_PREFIX_MAP = {"language_model.backbone.": "model.", "language_model.lm_head": "lm_head"}
PEFT_PREFIX = "base_model.model."


def _saved_modules(table: list[Any], trained: Mapping[str, Any], hf_model_path: Path, adapters: Mapping[str, Any],
                   prefix_map: Mapping[str, str], patterns: list[str], tensors: dict[str, Any], cast: Any) -> list[str]:
    """Put the fully trained modules' tensors into ``tensors`` (PEFT names); returns their (renamed) module names.

    Modules that ``include`` leaves out are left out with a note (the user asked for a part of the model).
    """
    if not trained:
        return []
    from nvlcore.convert.safetensors_io import SafetensorsReader

    hf = trained_tensors_hf(table, trained)
    reader = SafetensorsReader(hf_model_path)
    groups = modules_to_save(set(hf), sorted(reader.tensors), set(adapters))
    kept, dropped = [], []
    for module, keys in groups.items():
        name = _rename(module, prefix_map)
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            dropped.append(name)
            continue
        kept.append(name)
        base = reader.read([k for k in keys if k not in hf]) if any(k not in hf for k in keys) else {}
        for k in keys:
            t = hf[k] if k in hf else base[k]
            t = t.to(cast) if cast is not None else t
            tensors[f"{PEFT_PREFIX}{_rename(k, prefix_map)}"] = t.detach().contiguous().clone()
    if dropped:
        print(f"nvl export hf-peft: note: include={patterns} leaves out {len(dropped)} module(s) the run trained "
              f"fully (e.g. {dropped[0]}); the adapter carries the others", file=sys.stderr)
    return kept


def _rename(name: str, prefix_map: Mapping[str, str]) -> str:
    for old, new in prefix_map.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def adapter_tensors_hf(
    table: list[Any], state: Mapping[str, Any]
) -> tuple[dict[str, tuple[Any, ...]], dict[str, Any]]:
    """HF module name -> ``(lora_A [r, in], lora_B [out, r])`` for every adapter in ``state``, plus
    ``lora_magnitude_vector [out]`` as a third element for a DoRA adapter (its rows split like B's).

    Also returns the non-adapter tensors of ``state`` (weights the run trained fully) by training name,
    for :func:`trained_tensors_hf`.
    """
    from nvl_lora.layout import adapters_by_module

    by_module, trained = adapters_by_module(table, state)
    return {h: t for hf in by_module.values() for h, t in hf.items()}, trained


def trained_tensors_hf(table: list[Any], trained: Mapping[str, Any]) -> dict[str, Any]:
    """The run's fully trained tensors (training names, fused or component form) as HF tensors.

    :raises ValueError: naming a tensor the bridge's mapping has no HF counterpart for.
    """
    by_name = {m.megatron: m for m in table}
    owner = {c: m for m in table for c in m.components}
    parts: dict[str, dict[str, Any]] = {}
    for key, t in trained.items():
        if key in by_name:
            parts.setdefault(key, {}).update(by_name[key].local_to_components([t]))
        elif key in owner:
            parts.setdefault(owner[key].megatron, {})[key] = t
        else:
            raise ValueError(f"the run trained {key} fully, and the model bridge maps it to no HF tensor, so an HF "
                             "PEFT adapter cannot carry it; use `nvl peft merge --format hf` for a model with it")
    out: dict[str, Any] = {}
    for name, comps in parts.items():
        missing = [c for c in by_name[name].components if c not in comps]
        if missing:
            raise ValueError(f"the run trained part of {name} fully ({sorted(comps)}) but not {missing}; an HF "
                             "PEFT adapter cannot carry a partial tensor; use `nvl peft merge --format hf`")
        out.update(by_name[name].components_to_hf(comps))
    return out


def _prefixes(module: str) -> list[str]:
    """``a``, ``a.b``, ``a.b.c`` for ``a.b.c``: the module and its ancestors, outermost first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def modules_to_save(trained: set[str], hf_keys: list[str], adapted: set[str]) -> dict[str, list[str]]:
    """HF module -> its tensor keys, for the modules that carry the ``trained`` HF tensors.

    Each trained tensor goes into its outermost enclosing module whose every tensor (among ``hf_keys``,
    the base model's) was trained, or else the module that owns it. A module that is, or holds, an
    adapted module (``adapted``) cannot also be saved whole: PEFT would put the adapter inside a copy.

    :raises ValueError: naming the tensor that cannot be expressed.
    """
    under: dict[str, list[str]] = {}
    for k in hf_keys:
        for p in _prefixes(k)[:-1]:
            under.setdefault(p, []).append(k)
    chosen: set[str] = set()
    for key in sorted(trained):
        if "." not in key:
            raise ValueError(f"the run trained {key} fully, a tensor outside any module, which PEFT's "
                             "modules_to_save cannot carry; use `nvl peft merge --format hf`")
        if key not in under.get(key.rsplit(".", 1)[0], ()):
            raise ValueError(f"the run trained {key} fully, but --hf-model-path has no such tensor (another model?)")
        owner = key.rsplit(".", 1)[0]
        module = next((p for p in _prefixes(owner) if all(k in trained for k in under.get(p, [key]))), owner)
        clash = sorted(a for a in adapted if a == module or a.startswith(module + "."))
        if clash:
            raise ValueError(f"the run trained {key} fully and also put an adapter on {clash[0]}; an HF PEFT adapter "
                             "cannot carry both (exclude that layer from the adapters, or use `nvl peft merge`)")
        chosen.add(module)
    outer = {m for m in chosen if not any(m.startswith(o + ".") for o in chosen)}
    names = set(under)
    for m in outer:  # peft matches modules_to_save by name suffix: a full name must select only its module
        others = sorted(n for n in names if n != m and n.endswith(m))
        if others:
            raise ValueError(f"HF module {m} (trained fully) would also select {others[0]} in PEFT's suffix match of "
                             "modules_to_save; use `nvl peft merge --format hf`")
    return {m: sorted(under.get(m, [])) for m in sorted(outer)}


TARGETS = ("vllm",)


def _export_for_target(target: str | None, *, renames: tuple[Any, ...], **kwargs: Any) -> Path:
    """``--target vllm``: the names are vLLM's, so the renaming options do not apply."""
    if target not in TARGETS:
        raise ValueError(f"--target {target}: hf-peft exports for {', '.join(TARGETS)} (-O pretrained= goes with "
                         "--target vllm)" if target is not None else "-O pretrained= goes with --target vllm")
    if any(renames):
        raise ValueError("--target vllm names modules as vLLM does: drop -O for_causal_lm / module_prefix_map / "
                         "include")
    from nvl_lora.vllm_export import export_for_vllm

    return export_for_vllm(**kwargs)


class HFPeftExporter:
    """``nvl export --format hf-peft``."""

    name = "hf-peft"

    def export(
        self,
        *,
        checkpoint: Path,
        hf_model_path: Path | None,
        output: Path,
        overwrite: bool = False,
        plugin_manager: Any = None,
        dtype: str | None = None,
        for_causal_lm: bool = False,
        module_prefix_map: Mapping[str, str] | None = None,
        include: list[str] | str | None = None,
        target: str | None = None,
        pretrained: str | Path | None = None,
        **unknown: Any,
    ) -> Path:
        """Write the adapter; returns the output directory.

        :param dtype: cast the adapter tensors (``float32``, ``bfloat16``, ``float16``); default: as saved.
        :param for_causal_lm: only the LM's adapters, named for transformers' ``NemotronHForCausalLM``.
        :param module_prefix_map: ``{old_prefix: new_prefix}`` applied to HF module names.
        :param include: glob(s) over HF module names (after renaming) to keep.
        :param target: ``vllm``: an adapter ``vllm serve`` loads as it is, with its base where the run
            changed more than vLLM's adapters carry (:mod:`nvl_lora.vllm_export`).
        :param pretrained: with ``target=vllm``, the base checkpoint that base is merged from (default: the
            one the run recorded, as ``nvl peft merge``).
        """
        import torch
        from safetensors.torch import save_file

        from nvl_lora.merge_io import read_lora_run
        from nvlcore.bridge import resolve_bridge
        from nvlcore.checkpoint import atomic_output_dir, check_can_write

        if unknown:
            raise ValueError(f"unknown hf-peft option(s) {sorted(unknown)}; known: dtype, for_causal_lm, "
                             "module_prefix_map, include, target, pretrained")
        if hf_model_path is None:
            raise ValueError("--hf-model-path is required: its config picks the weight mapping and HF names")
        if target is not None or pretrained is not None:
            return _export_for_target(target, checkpoint=checkpoint, hf_model_path=hf_model_path, output=output,
                                      overwrite=overwrite, plugin_manager=plugin_manager, dtype=dtype,
                                      pretrained=pretrained, renames=(for_causal_lm, module_prefix_map, include))
        output = Path(output).expanduser().absolute()
        check_can_write(output, overwrite=overwrite, what="--output")
        ck, peft, _ = read_lora_run(checkpoint)
        bridge = resolve_bridge(hf_model_path, manager=plugin_manager)
        table = bridge.mapping_table()
        saved = ck.load()
        adapters, trained = adapter_tensors_hf(table, saved)
        if not adapters:
            raise ValueError(f"{ck.path} holds no LoRA/DoRA adapter tensors")
        prefix_map = dict(module_prefix_map or {})
        patterns = [include] if isinstance(include, str) else list(include or [])
        if for_causal_lm:
            prefix_map = {**CAUSAL_LM_PREFIX_MAP, **prefix_map}
            patterns = patterns or ["model.*", "lm_head*"]
        cast = getattr(torch, dtype) if dtype else None
        tensors: dict[str, torch.Tensor] = {}
        targets: list[str] = []
        dora = any(len(v) == 3 for v in adapters.values())
        if dora and not all(len(v) == 3 for v in adapters.values()):
            raise ValueError(f"{ck.path} mixes DoRA and LoRA adapters; the HF PEFT format has one use_dora for all")
        for hf_module, tensors_of in sorted(adapters.items()):
            name = _rename(hf_module, prefix_map)
            if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            targets.append(name)
            named = [("lora_A.weight", tensors_of[0]), ("lora_B.weight", tensors_of[1])]
            if dora:
                named.append(("lora_magnitude_vector", tensors_of[2]))
            for suffix, t in named:
                t = t.to(cast) if cast is not None else t
                tensors[f"{PEFT_PREFIX}{name}.{suffix}"] = t.detach().contiguous().clone()
        mamba_out = [t for t in targets if t.endswith("mixer.out_proj")]
        if mamba_out:
            print(
                f"nvl export hf-peft: note: {len(mamba_out)} adapter(s) on Mamba out_proj (e.g. {mamba_out[0]}); "
                "the peft library refuses out_proj targets on Mamba-based models (model_type nemotron_h), so "
                "PeftModel.from_pretrained on transformers' NemotronH will reject this adapter; vLLM-style "
                "loaders that map names themselves are unaffected. Train without out_proj, or merge instead.",
                file=sys.stderr,
            )
        if not targets:
            raise ValueError(f"no adapter module is left after include={patterns} (modules: {sorted(adapters)[:4]}...)")
        saved_modules = _saved_modules(table, trained, hf_model_path, adapters, prefix_map, patterns, tensors, cast)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM" if for_causal_lm else None,
            "base_model_name_or_path": str(Path(hf_model_path).expanduser().absolute()),
            "r": int(peft["dim"]),
            "lora_alpha": float(peft["alpha"]),
            "lora_dropout": float(peft.get("dropout") or 0.0),
            # full module names: PEFT matches a target by name suffix, so short names such as "fc1"
            # would also catch modules the run did not adapt
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": dora,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": saved_modules or None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
        }
        with atomic_output_dir(output, overwrite=overwrite, what="--output") as tmp:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "README.md").write_text(
                f"# {'DoRA' if dora else 'LoRA'} adapter exported by `nvl export --format hf-peft`\n\n"
                f"- source checkpoint: `{ck.path}`\n- base model: `{config['base_model_name_or_path']}`\n"
                f"- r={config['r']}, lora_alpha={config['lora_alpha']:g}, {len(targets)} modules\n"
                "- fused QKV adapters were split into q/k/v adapters sharing a copy of A (exact)\n"
                + (f"- trained fully, in modules_to_save: {', '.join(saved_modules)}\n" if saved_modules else "")
            )
        return output
