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

``-O for_causal_lm=true`` keeps only the language model's adapters and names them as in
transformers' ``NemotronHForCausalLM`` (``language_model.backbone.`` -> ``model.``), with
``task_type: CAUSAL_LM``: the adapter then loads onto the LM alone. ``-O module_prefix_map`` gives
other renames (``{"old.prefix.": "new.prefix."}``) and ``-O include`` keeps modules matching globs.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path
from typing import Any, Mapping

CAUSAL_LM_PREFIX_MAP = {"language_model.backbone.": "model.", "language_model.lm_head": "lm_head"}
PEFT_PREFIX = "base_model.model."


def _rename(name: str, prefix_map: Mapping[str, str]) -> str:
    for old, new in prefix_map.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def adapter_tensors_hf(
    table: list[Any], state: Mapping[str, Any]
) -> tuple[dict[str, tuple[Any, ...]], list[str]]:
    """HF module name -> ``(lora_A [r, in], lora_B [out, r])`` for every adapter in ``state``, plus
    ``lora_magnitude_vector [out]`` as a third element for a DoRA adapter (its rows split like B's).

    Also returns the non-adapter tensors of ``state`` (weights the run trained fully), which an
    adapter cannot carry.
    """
    from nvl_lora.layout import adapter_entry, base_entry, split_adapter_key, to_components

    by_name = {m.megatron: m for m in table}
    comps = to_components(table, state)
    modules = sorted({p[0] for k in comps if (p := split_adapter_key(k))})
    trained = sorted(k for k in comps if not split_adapter_key(k))
    out: dict[str, tuple[Any, Any]] = {}
    for module in modules:
        base = base_entry(by_name, module)
        a = comps[f"{module}.adapter.linear_in.weight"]
        b_entry = adapter_entry(base, module, "B")
        missing = [c for c in b_entry.components if c not in comps]
        if missing:
            raise KeyError(f"adapter of {module}: tensors {missing} are missing from the checkpoint")
        b_hf = b_entry.components_to_hf({c: comps[c] for c in b_entry.components})
        m_entry = adapter_entry(base, module, "M")
        m_hf = None
        if any(c in comps for c in m_entry.components):
            missing = [c for c in m_entry.components if c not in comps]
            if missing:
                raise KeyError(f"DoRA adapter of {module}: magnitude tensors {missing} are missing from the checkpoint")
            m_hf = m_entry.components_to_hf({c: comps[c] for c in m_entry.components})
        for hf_key in base.hf:
            hf_module = hf_key[: -len(".weight")]
            pair = (a, b_hf[f"{hf_module}.lora_B.weight"])
            if m_hf is not None:
                pair += (m_hf[f"{hf_module}.lora_magnitude_vector"].reshape(-1),)
            out[hf_module] = pair
    return out, trained


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
        **unknown: Any,
    ) -> Path:
        """Write the adapter; returns the output directory.

        :param dtype: cast the adapter tensors (``float32``, ``bfloat16``, ``float16``); default: as saved.
        :param for_causal_lm: only the LM's adapters, named for transformers' ``NemotronHForCausalLM``.
        :param module_prefix_map: ``{old_prefix: new_prefix}`` applied to HF module names.
        :param include: glob(s) over HF module names (after renaming) to keep.
        """
        import torch
        from safetensors.torch import save_file

        from nvlcore.checkpoint import atomic_output_dir, check_can_write
        from nvlcore.bridge import resolve_bridge
        from nvl_lora.merge_io import read_lora_run

        if unknown:
            raise ValueError(
                f"unknown hf-peft option(s) {sorted(unknown)}; known: dtype, for_causal_lm, module_prefix_map, include"
            )
        if hf_model_path is None:
            raise ValueError("--hf-model-path is required: its config picks the weight mapping and HF names")
        output = Path(output).expanduser().absolute()
        check_can_write(output, overwrite=overwrite, what="--output")
        ck, peft, _ = read_lora_run(checkpoint)
        bridge = resolve_bridge(hf_model_path, manager=plugin_manager)
        table = bridge.mapping_table()
        saved = ck.load()
        adapters, trained = adapter_tensors_hf(table, saved)
        if not adapters:
            raise ValueError(f"{ck.path} holds no LoRA/DoRA adapter tensors")
        if trained:
            print(
                f"nvl export hf-peft: warning: the run also trained {len(trained)} tensor(s) fully (e.g. "
                f"{trained[0]}); an adapter cannot carry them. Use `nvl peft merge --format hf` for a model "
                "that includes them.",
                file=sys.stderr,
            )
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
            "modules_to_save": None,
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
            )
        return output
