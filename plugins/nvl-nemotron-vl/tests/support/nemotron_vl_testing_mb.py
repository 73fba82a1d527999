"""Megatron-Bridge checkpoints of the tiny toy, written the way Megatron-Bridge writes them: workers for
spawned gloo processes (importable by module path, so spawn can pickle them).

Each rank builds megatron-core ``ShardedTensor`` s of *its* tensor-parallel shards and calls megatron-core's
own ``dist_checkpointing.save`` (``torch_dist``), as Megatron-Bridge's ``save_checkpoint`` does
(``src/megatron/bridge/training/checkpointing.py``, repo NVIDIA-NeMo/Megatron-Bridge). Names and layouts
follow Megatron-Bridge and megatron-core, not nvl's reader:

* parameter names are the ``llava_model.*`` names of ``models/nemotron_vl/nemotron_vl_bridge.py``'s mapping registry;
* the ViT's layers are stacked on a leading axis (megatron-core ``transformer/transformer_block.py``
  ``sharded_state_dict`` with ``singleton_local_shards=False``, which Megatron-Bridge's
  ``_build_sharded_state_dict_metadata`` sets), the Mamba stack's are not (``ssm/mamba_block.py``);
* Mamba ``in_proj``/``conv1d`` are split into ``.z .x .B .C .dt`` / ``.x .B .C`` per rank
  (``ssm/mamba_mixer.py`` ``_split_tensor_factory``); ``linear_qkv`` is the rank's per-group rows, sharded on axis 0;
* the embedding and output layer are padded to a multiple of 128 x TP (``make_vocab_size_divisible_by``);
* LoRA adapters are ``<linear>.adapter.linear_in.weight`` / ``linear_out.weight`` (``peft/adapter_wrapper.py``);
  ``linear_in`` is split on axis 0 under a column-parallel base and on axis 1 under a row-parallel one,
  ``linear_out`` on axis 0 (``peft/utils.py`` ``ParallelLinearAdapter``);
* run_config.yaml: ``model._target_`` the provider, ``peft._target_`` ``megatron.bridge.peft.lora.VLMLoRA``.

``common="distcp"`` keeps the common state as the ``common_state`` ShardedObject inside the .distcp files and
no ``common.pt`` (the layout of Megatron-Bridge after 0.5.1, megatron-core after NVIDIA/Megatron-LM#5160; the
installed megatron-core 0.16 writes ``common.pt``, so the fixture removes the file it leaves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PREFIX = "llava_model."
VIT_LAYERS = "vision_model.decoder.layers."
PROVIDER = "megatron.bridge.models.nemotron_vl.nemotron_vl_provider.NemotronVLModelProvider"
VLM_LORA = "megatron.bridge.peft.lora.VLMLoRA"
VOCAB_PADDED = ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight")


def _global_tensors(table: list[Any], comps: dict[str, Any], tp: int) -> dict[str, tuple[Any, int | None]]:
    """name (no prefix, layers unstacked) -> (global tensor as megatron-core sees it, TP axis or None)."""
    import torch

    out: dict[str, tuple[Any, int | None]] = {}
    for m in table:
        if m.kind == "qkv":
            out[m.megatron] = (m.components_to_local(comps, 1, 0), 0)
        elif m.kind == "parts":
            for c in m.components:
                out[c] = (comps[c], 0)
        elif m.megatron in VOCAB_PADDED:
            t = comps[m.megatron]
            pad = (-t.shape[0]) % (128 * tp)
            out[m.megatron] = (torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]), 0)
        else:
            out[m.megatron] = (comps[m.megatron], m.tp_dim)
    return out


def _sharded(name: str, t: Any, axis: int | None, rank: int, tp: int, vit_layers: int) -> tuple[str, Any]:
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets: list[tuple[int, int, int]] = []
    prepend = 0
    key = PREFIX + name
    if name.startswith(VIT_LAYERS):
        idx, _, rest = name[len(VIT_LAYERS):].partition(".")
        key, prepend = PREFIX + VIT_LAYERS + rest, 1
        offsets.append((0, int(idx), vit_layers))
    replica = 0
    if axis is not None and tp > 1:
        t = t.chunk(tp, dim=axis)[rank]
        offsets.append((axis + prepend, rank, tp))
    else:
        replica = rank
    sh = ShardedTensor.from_rank_offsets(key, t.contiguous(), *offsets, replica_id=replica, prepend_axis_num=prepend)
    return f"{key}@{offsets}", sh


LORA_LINEARS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def lora_tensors(table: list[Any], comps: dict[str, Any], dim: int, seed: int) -> dict[str, tuple[Any, int | None]]:
    """A LoRA run on the LM's attention and MLP linears with the ViT trained fully (VLMLoRA with
    ``--lora-on-language-model``): adapter factors in their global form (``linear_in`` [dim, in], ``linear_out``
    [out, dim], rows in the base weight's global order) with their TP axis, and the ViT's weights + 0.01."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = _global_tensors(table, comps, 1)
    out: dict[str, tuple[Any, int | None]] = {}
    for m in table:
        if m.megatron.startswith("language_model.decoder.layers.") and m.megatron.endswith(LORA_LINEARS):
            rows, cols = base[m.megatron][0].shape
            mod = m.megatron[: -len(".weight")]
            out[f"{mod}.adapter.linear_in.weight"] = (torch.randn(dim, cols, generator=g) * 0.1,
                                                      0 if m.tp_dim == 0 else 1)
            out[f"{mod}.adapter.linear_out.weight"] = (torch.randn(rows, dim, generator=g) * 0.1, 0)
    vit = [m for m in table if m.megatron.startswith("vision_model.")]
    out.update(_global_tensors(vit, trained_vit(comps), 1))
    return out


def trained_vit(comps: dict[str, Any]) -> dict[str, Any]:
    """The ViT's components as the LoRA run left them (trained fully): + 0.01."""
    return {k: v + 0.01 for k, v in comps.items() if k.startswith("vision_model.")}


def toy_components(hf_dir: str) -> tuple[Any, list[Any], dict[str, Any]]:
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.convert.safetensors_io import SafetensorsReader
    from nvlcore.mapping import hf_to_components

    bridge = NemotronVLBridge.from_hf_dir(hf_dir)
    table = bridge.mapping_table()
    reader = SafetensorsReader(hf_dir)
    return bridge, table, hf_to_components(table, reader.read([k for m in table for k in m.hf]))


def write_all_worker(rank: int, world: int, hf_dir: str, root: str, jobs: list[tuple[str, int, dict]]) -> None:
    """Write each ``(name, tp, opts)`` of ``jobs`` as ``root/name`` (:func:`write_checkpoint`) from ``world``
    ranks; a checkpoint at TP 1 is saved by them as data-parallel replicas."""
    for name, tp, opts in jobs:
        write_checkpoint(rank, tp, hf_dir, str(Path(root) / name), opts)


def write_checkpoint(rank: int, tp: int, hf_dir: str, out_dir: str, opts: dict[str, Any]) -> None:
    """Write a Megatron-Bridge checkpoint of the toy at TP=``tp`` into ``out_dir`` (collective).

    ``opts``: ``iteration``; ``common`` (``"pt"`` or ``"distcp"``); ``lora`` (``None`` or ``{"dim", "alpha",
    "seed", "pretrained"}``: an adapter-only run); ``target`` (run_config's provider class, default the real one).
    """
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    from nvlcore.checkpoint.megatron_bridge import cpu_without_cuda_sync

    bridge, table, comps = toy_components(hf_dir)
    lora = opts.get("lora")
    tensors = lora_tensors(table, comps, lora["dim"], lora["seed"]) if lora else _global_tensors(table, comps, tp)
    n_vit = bridge.config.vision.num_layers
    model = dict(_sharded(n, t, axis, rank, tp, n_vit) for n, (t, axis) in tensors.items())
    it = int(opts.get("iteration", 0))
    it_dir = Path(out_dir) / f"iter_{it:07d}"
    if rank == 0:
        it_dir.mkdir(parents=True)
    torch.distributed.barrier()
    state: dict[str, Any] = {"model": model}
    common = {"checkpoint_version": 3.0, "iteration": it}
    if opts.get("common") == "distcp":
        state["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=rank)
    else:
        state.update(common)
    with cpu_without_cuda_sync():
        dist_checkpointing.save(state, str(it_dir), sharded_strategy=("torch_dist", 1))
    if rank == 0:
        _small_files(it_dir, tp, it, opts)
    torch.distributed.barrier()


def _small_files(it_dir: Path, tp: int, it: int, opts: dict[str, Any]) -> None:
    import torch
    import yaml

    if opts.get("common") == "distcp":
        (it_dir / "common.pt").unlink()
    lora = opts.get("lora")
    rc: dict[str, Any] = {"model": {"_target_": opts.get("target", PROVIDER), "tensor_model_parallel_size": tp},
                          "checkpoint": {"save": str(it_dir.parent), "ckpt_format": "torch_dist"}}
    if lora:
        rc["peft"] = {"_target_": VLM_LORA, "dim": lora["dim"], "alpha": lora["alpha"], "dropout": 0.0,
                      "target_modules": ["*language_model*.linear_qkv", "*language_model*.linear_proj",
                                         "*language_model*.linear_fc1", "*language_model*.linear_fc2"],
                      "freeze_language_model": True, "freeze_vision_model": False}
        rc["checkpoint"]["pretrained_checkpoint"] = lora["pretrained"]
    (it_dir / "run_config.yaml").write_text(yaml.safe_dump(rc))
    ts = {"step": torch.tensor(it), "consumed_train_samples": torch.tensor(0)}
    torch.save(ts, it_dir / "train_state.pt")
    torch.save(ts, it_dir.parent / "latest_train_state.pt")
    (it_dir.parent / "latest_checkpointed_iteration.txt").write_text(str(it))


def load_worker(rank: int, world: int, hf_dir: str, mb_path: str) -> dict[str, Any]:
    """At TP=``world``: logits of the HF-loaded model and of the model loaded from the Megatron-Bridge checkpoint."""
    import torch
    from megatron.core import parallel_state
    from nemotron_vl_testing_convert import logits_of, vlm_inputs

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.parallel import init_parallel

    init_parallel(world, device_type="cpu")
    group = parallel_state.get_tensor_model_parallel_group()
    bridge = NemotronVLBridge.from_hf_dir(hf_dir)
    inputs = vlm_inputs(bridge.config)
    ref = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True, tp_group=group)
    model = bridge.build_model(dtype=torch.float32, device="cpu", tp_group=group, seed=99)
    bridge.load_checkpoint_weights(model, mb_path)
    return {"hf": logits_of(ref, inputs), "mb": logits_of(model, inputs)}
