"""``nvl peft merge``: fold a LoRA checkpoint into its base checkpoint, streaming tensor by tensor.

Inputs are nvl checkpoints of logical tensors (:mod:`nvlcore.checkpoint`), so the TP sizes the
base was imported at and the adapters were trained at do not matter, and merging runs on CPU in one
process. Memory: the LoRA checkpoint's tensors (adapters plus whatever the run trained fully) plus one
base tensor at a time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from nvl_lora.layout import adapter_entry, base_entry, split_adapter_key, to_components
from nvl_lora.merge import MergeError, adapter_pairs, check_rank, magnitude_key, merged_weight
from nvlcore.bridge import resolve_bridge


@attrs.define
class MergeSummary:
    output: str
    base: str
    lora: str
    dim: int
    alpha: float
    merged_tensors: int = 0
    replaced_tensors: int = 0
    total_tensors: int = 0
    seconds: float = 0.0
    fmt: str = "megatron"
    method: str = "lora"

    def describe(self) -> str:
        return (
            f"merged {self.merged_tensors} weight tensor(s) with {'DoRA' if self.method == 'dora' else 'LoRA'} "
            f"r={self.dim} alpha={self.alpha:g}, "
            f"replaced {self.replaced_tensors} fully trained tensor(s), copied the other "
            f"{self.total_tensors - self.merged_tensors - self.replaced_tensors} from {self.base}; "
            f"wrote {self.output} ({self.fmt}) in {self.seconds:.1f} s"
        )


def read_lora_run(lora_checkpoint: str | Path, bridge: Any = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Open a LoRA checkpoint; return it, its ``peft`` settings and its whole run config.

    With a ``bridge``, a Megatron-Bridge LoRA run is read too (``bridge.open_checkpoint``: its tensors
    and run_config.yaml in nvl's names). Errors name the file and the missing field.
    """
    from nvlcore.checkpoint import open_checkpoint

    ck = bridge.open_checkpoint(lora_checkpoint) if bridge is not None else open_checkpoint(lora_checkpoint)
    rc = ck.run_config()
    if rc is None:
        raise MergeError(
            f"{ck.path}/run_config.yaml is missing: it records the LoRA rank, alpha and base checkpoint "
            "(is this a checkpoint written by `nvl finetune --lora-on-*`?)"
        )
    peft = rc.get("peft") or {}
    if not peft.get("method") and peft.get("_target_"):
        peft = from_megatron_bridge(peft, ck.path)
    if not peft.get("method"):
        raise MergeError(f"{ck.path}/run_config.yaml: peft.method is not set, so this is not a LoRA run's checkpoint")
    for key in ("dim", "alpha"):
        if peft.get(key) is None:
            raise MergeError(f"{ck.path}/run_config.yaml: peft.{key} is absent; cannot scale the adapters")
    return ck, dict(peft), rc


#: Megatron-Bridge's PEFT classes (run_config.yaml ``peft._target_``; its ``src/megatron/bridge/peft/lora.py``,
#: repo NVIDIA-NeMo/Megatron-Bridge) whose adapter checkpoints are LoRA's: ``linear_in`` = A, ``linear_out`` = B.
MEGATRON_BRIDGE_LORA = ("LoRA", "VLMLoRA")


def from_megatron_bridge(peft: dict[str, Any], where: Any) -> dict[str, Any]:
    """A Megatron-Bridge run's ``peft`` section as nvl's (``method: lora``, its ``dim``/``alpha`` as they are)."""
    target = str(peft["_target_"])
    if target.rsplit(".", 1)[-1] not in MEGATRON_BRIDGE_LORA:
        raise MergeError(
            f"{where}/run_config.yaml: peft._target_ is {target}; nvl merges Megatron-Bridge "
            f"{' and '.join(MEGATRON_BRIDGE_LORA)} runs (merge this one with Megatron-Bridge's merge_lora.py)"
        )
    return {"method": "lora", **{k: v for k, v in peft.items() if k != "_target_"}}


def _base_checkpoint(base: Path, bridge: Any, workdir: Path, say: Callable[[str], None]) -> Path:
    """A base given as an HF directory is imported into ``workdir`` first (the trainer accepts both)."""
    from nvlcore.bridge import is_hf_dir

    if not is_hf_dir(base):
        return base
    from nvlcore.convert import import_hf_checkpoint

    say(f"base {base} is an HF directory: importing it first")
    out = workdir / "base"
    import_hf_checkpoint(bridge, base, out, progress=False)
    return out


def _to_base_form(
    table: list[Any], tensors: Mapping[str, Any], base_keys: set[str]
) -> dict[str, Any]:
    """Fully trained tensors of the LoRA run, keyed and laid out like the base checkpoint.

    The trainer may store a parameter fused (its training name) where an imported base stores
    components (``linear_qkv.weight.q/.k/.v``), or the reverse; both directions go through the
    bridge's mapping.
    """
    by_name = {m.megatron: m for m in table}
    owner = {c: m for m in table for c in m.components}
    out: dict[str, Any] = {}
    pending: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key in base_keys:
            out[key] = t
        elif key in by_name and all(c in base_keys for c in by_name[key].components):
            out.update(by_name[key].local_to_components([t]))
        elif key in owner and owner[key].megatron in base_keys:
            pending.setdefault(owner[key].megatron, {})[key] = t
        else:
            raise MergeError(
                f"the LoRA checkpoint's trained tensor {key} has no counterpart in the base checkpoint "
                "(is --pretrained the base this run started from?)"
            )
    for fused, comps in pending.items():
        out[fused] = by_name[fused].components_to_local(comps, 1, 0)
    return out


def merge_checkpoints(
    *,
    hf_model_path: str | Path,
    lora_checkpoint: str | Path,
    output: str | Path,
    pretrained: str | Path | None = None,
    fmt: str = "megatron",
    overwrite: bool = False,
    plugin_manager: Any = None,
    say: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    keep_adapter: Callable[[str], bool] | None = None,
) -> MergeSummary:
    """Write ``base + (alpha/r)·B·A`` for every adapter as a Megatron checkpoint (``fmt="megatron"``)
    or an HF directory (``fmt="hf"``, through ``nvl convert export``'s writer).

    :param keep_adapter: given an adapted module's training name, whether to merge its adapter (default:
        all); the others are left out, so the output is the run's model without them (the base a server
        applies those adapters to). The fully trained tensors are always written.
    """
    from nvlcore.checkpoint import (
        StreamedState,
        TensorSpec,
        atomic_output_dir,
        check_can_write,
        save_checkpoint,
    )

    t0 = time.perf_counter()
    if fmt not in ("megatron", "hf"):
        raise ValueError(f"--format must be megatron or hf, got {fmt!r}")
    output = Path(output).expanduser().absolute()
    check_can_write(output, overwrite=overwrite, what="--output")
    bridge = resolve_bridge(hf_model_path, manager=plugin_manager)
    lora, peft, rc = read_lora_run(lora_checkpoint, bridge)
    dim, alpha = int(peft["dim"]), float(peft["alpha"])
    recorded = (rc.get("checkpoint") or {}).get("pretrained_checkpoint")
    base_arg = pretrained if pretrained is not None else recorded
    if not base_arg:
        raise MergeError(
            f"{lora.path}/run_config.yaml records no checkpoint.pretrained_checkpoint; pass --pretrained DIR"
        )
    base_path = Path(base_arg).expanduser()
    if not base_path.exists():
        raise FileNotFoundError(
            f"base checkpoint {base_path} ({'--pretrained' if pretrained else 'recorded in run_config.yaml'}) "
            "does not exist; pass --pretrained DIR"
        )
    if pretrained is not None and recorded and Path(recorded).expanduser().absolute() != base_path.absolute():
        say(f"warning: --pretrained {base_path} differs from the recorded base {recorded}; shapes are checked")

    table = bridge.mapping_table()
    by_name = {m.megatron: m for m in table}

    from nvlcore.checkpoint import scratch_dir

    # next to the output (same disk); a kill -9 leftover is removed by the next merge to the same output
    with scratch_dir(output) as work:
        work_dir = Path(work)
        base = bridge.open_checkpoint(_base_checkpoint(base_path, bridge, work_dir, say))
        specs = base.specs()
        say(f"merging {lora.path} (r={dim}, alpha={alpha:g}) into {base_path}")

        saved = lora.load()  # adapters + fully trained tensors: small next to the base
        comps = to_components(table, saved)
        adapter = {k: v for k, v in comps.items() if split_adapter_key(k)}
        trained = _to_base_form(table, {k: v for k, v in comps.items() if not split_adapter_key(k)}, set(specs))
        if not adapter:
            raise MergeError(f"{lora.path} holds no adapter tensors (keys with .adapter.linear_in/out.weight)")
        if keep_adapter is not None:
            adapter = {k: v for k, v in adapter.items() if keep_adapter(split_adapter_key(k)[0])}  # type: ignore[index]
        pairs = adapter_pairs(adapter)
        check_rank(pairs, adapter, dim)
        scale = alpha / dim

        # base key -> (B, A, DoRA magnitude or None) for component-stored bases;
        # fused base key -> [(component, B, A, magnitude or None)]
        plan: dict[str, tuple[Any, Any, Any]] = {}
        fused_plan: dict[str, list[tuple[str, Any, Any, Any]]] = {}
        dora = any(split_adapter_key(k)[1] == "M" for k in adapter)  # type: ignore[index]
        for p in pairs:
            entry = base_entry(by_name, p.module)
            a = adapter[p.a_key]
            b_entry = adapter_entry(entry, p.module, "B")
            for bk, base_comp in zip(b_entry.components, entry.components, strict=True):
                if bk not in adapter:
                    raise MergeError(f"adapter tensor {bk} is missing from {lora.path}")
                mag = adapter.get(magnitude_key(bk))
                if dora and mag is None:
                    raise MergeError(f"DoRA magnitude {magnitude_key(bk)} is missing from {lora.path}")
                if base_comp in specs:
                    plan[base_comp] = (adapter[bk], a, mag)
                elif entry.megatron in specs:
                    fused_plan.setdefault(entry.megatron, []).append((base_comp, adapter[bk], a, mag))
                else:
                    raise MergeError(f"adapter on {p.module}: the base checkpoint has no {base_comp} (nor "
                                     f"{entry.megatron})")
        summary = MergeSummary(str(output), str(base_path), str(lora.path), dim, alpha, fmt=fmt,
                               method="dora" if dora else "lora")
        summary.total_tensors = len(specs)

        from nvlcore.progress import Progress

        bar = Progress(len(specs), "merge", unit="tensor")

        def produce(key: str) -> Any:
            bar.update(1, key)
            t = trained[key].to(specs[key].dtype) if key in trained else base.load([key])[key]
            if key in trained:
                summary.replaced_tensors += 1
            if key in plan:
                b, a, mag = plan[key]
                if tuple(t.shape) != (b.shape[0], a.shape[1]):
                    raise MergeError(f"{key}: base shape {tuple(t.shape)} does not match B {tuple(b.shape)} @ A "
                                     f"{tuple(a.shape)}")
                t = merged_weight(t, b, a, scale, mag)
                summary.merged_tensors += 1
            elif key in fused_plan:
                entry = by_name[key]
                parts = entry.local_to_components([t])
                for comp, b, a, mag in fused_plan[key]:
                    if tuple(parts[comp].shape) != (b.shape[0], a.shape[1]):
                        raise MergeError(f"{comp}: base shape {tuple(parts[comp].shape)} does not match B @ A")
                    parts[comp] = merged_weight(parts[comp], b, a, scale, mag)
                t = entry.components_to_local(parts, 1, 0)
                summary.merged_tensors += 1
            return t

        missing = [k for k in list(plan) + list(fused_plan) if k not in specs]
        if missing:
            raise MergeError(f"base checkpoint {base.path} lacks {missing[:4]}")
        merged_rc = dict(base.run_config() or {})
        merged_rc["merge"] = {
            "tool": "nvl peft merge",
            "base": str(base_path),
            "lora_checkpoint": str(lora.path),
            "dim": dim,
            "alpha": alpha,
            "method": "dora" if dora else "lora",
            "adapted_modules": [p.module for p in pairs],
        }
        files = {n: base.path / n for n in ("tokenizer", "hf_source") if (base.path / n).exists()}
        stream = StreamedState({k: TensorSpec(s.shape, s.dtype) for k, s in specs.items()}, produce)
        try:
            if fmt == "megatron":
                with atomic_output_dir(output, overwrite=overwrite, what="--output") as tmp_root:
                    save_checkpoint(tmp_root, 0, model_state=stream, run_config=merged_rc,
                                    train_state={"iteration": 0}, files=files)
            else:
                from nvlcore.convert import export_hf_checkpoint

                staged = work_dir / "merged"
                save_checkpoint(staged, 0, model_state=stream, run_config=merged_rc, train_state={"iteration": 0},
                                files=files)
                bar.close()
                export_hf_checkpoint(bridge, hf_model_path, staged, output, overwrite=overwrite, progress=None)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary

