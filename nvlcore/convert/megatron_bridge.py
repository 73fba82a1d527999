"""``nvl convert import --format megatron-bridge``: an HF model directory -> a Megatron-Bridge checkpoint.

The checkpoint is what Megatron-Bridge's own import writes for this model (``iter_0000000/`` with the
weights only, no optimizer or RNG state; see :mod:`nvlcore.checkpoint.megatron_bridge` for the
layout): megatron-core's ``dist_checkpointing.save`` with the ``torch_dist`` backend writes the tensors,
under the names the model bridge gives (:meth:`nvlcore.bridge.ModelBridge.megatron_bridge_names`).
Megatron-Bridge's loaders reshard it to any TP. Unlike nvl's own import, the whole model is held in
memory once (``dist_checkpointing.save`` takes one state dict), as Megatron-Bridge's import holds it.
HF tensors the training model has no parameter for (the bridge's carried keys) are not written:
Megatron-Bridge has no place for them either; ``nvl convert export`` takes them from the HF directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from nvlcore.checkpoint import check_can_write, iter_dir_name
from nvlcore.checkpoint.megatron_bridge import MegatronBridgeError, save_megatron_bridge_checkpoint, to_megatron_bridge
from nvlcore.convert.engine import (
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    ConversionSummary,
    main_dtype,
    parse_dtype,
    peak_rss_bytes,
    read_hf_config,
    warm_imports,
)
from nvlcore.convert.safetensors_io import SafetensorsReader

FORMATS = ("nvl", "megatron-bridge")


def import_hf_to_megatron_bridge(bridge: Any, hf_dir: str | os.PathLike[str], megatron_path: str | os.PathLike[str],
                                 *, tp: int = 1, dtype: str | None = None, overwrite: bool = False,
                                 progress: bool = True) -> ConversionSummary:
    """Write the HF model at ``hf_dir`` as a Megatron-Bridge checkpoint at ``megatron_path`` (iteration 0)."""
    from nvlcore.progress import progress_iter

    warm_imports()
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir).expanduser().absolute()
    out = Path(megatron_path).expanduser().absolute()
    names = bridge.megatron_bridge_names()
    if names is None:
        raise MegatronBridgeError(f"model bridge {bridge.name!r} does not say how Megatron-Bridge names its tensors; "
                                  "use --format nvl")
    check_can_write(out, overwrite=overwrite, what="--megatron-path")
    bridge.check_tensor_parallel(tp)
    config = read_hf_config(hf_dir)
    reader = SafetensorsReader(hf_dir)
    table = bridge.mapping_table()
    missing = [k for m in table for k in m.hf if k not in reader.tensors]
    if missing:
        raise MegatronBridgeError(f"{hf_dir}: {len(missing)} tensor(s) the model needs are missing, e.g. {missing[:5]}")
    src_main = main_dtype(config, {k: t for k, t in reader.tensors.items()})
    target = parse_dtype(dtype)
    summary = ConversionSummary("import (megatron-bridge)", str(hf_dir), str(out / iter_dir_name(0)), tp=tp)
    comps: dict[str, Any] = {}
    for m in progress_iter(table, "import", unit="tensor", enabled=progress):
        hf = reader.read(m.hf)
        summary.bytes_read += sum(t.numel() * t.element_size() for t in hf.values())
        for k, t in m.hf_to_components(hf).items():
            comps[k] = t.to(target) if target is not None and t.dtype == src_main and t.is_floating_point() else t
    tensors = to_megatron_bridge(table, names, comps)
    del comps
    summary.hf_tensors = sum(len(m.hf) for m in table)
    summary.checkpoint_tensors = len(tensors)
    summary.dtype = str(target or src_main).replace("torch.", "")
    summary.bytes_written = sum(sum(x.numel() * x.element_size() for x in (t.values() if isinstance(t, dict) else [t]))
                                for t in tensors.values())
    files = {f"{TOKENIZER_DIR}/{n}": hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()}
    run_config = {
        "model": {"_target_": names.model_target, "tensor_model_parallel_size": tp},
        "checkpoint": {"ckpt_format": "torch_dist", "save": str(out)},
        "convert": {"tool": "nvl convert import --format megatron-bridge", "source": str(hf_dir),
                    "source_architectures": list(config.get("architectures") or []), "dtype": summary.dtype},
    }
    save_megatron_bridge_checkpoint(out, 0, tensors, run_config=run_config, overwrite=overwrite, files=files)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary
