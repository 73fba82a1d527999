"""Distributed worker for the conversion tests (importable by module path, so spawn can pickle it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def vlm_inputs(cfg: Any, seed: int = 5) -> dict[str, Any]:
    """One row with a 1-tile image between text tokens: exercises the LM, the ViT and the projector."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(30, min(500, cfg.llm.vocab_size), (n,), generator=g).tolist()  # noqa: E731
    ids = torch.tensor([text(4) + [cfg.img_context_token_id] * cfg.num_image_token + text(9)])
    pixels = torch.randn(1, 3, cfg.force_image_size, cfg.force_image_size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels}


def logits_of(model: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return model.forward_inference(inputs["input_ids"], pixel_values=inputs["pixel_values"])


def tp_load_worker(rank: int, world: int, hf_dir: str, checkpoints: dict[str, str], save_root: str) -> dict[str, Any]:
    """At TP=``world``: logits with HF-loaded weights and with each checkpoint loaded; then save the
    model's components (DTensor shards from every rank) to ``save_root`` for a TP=1 load by the caller."""
    import torch
    from megatron.core import parallel_state

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.checkpoint import save_checkpoint
    from nvlcore.parallel import init_parallel

    init_parallel(world, device_type="cpu")
    group = parallel_state.get_tensor_model_parallel_group()
    bridge = NemotronVLBridge.from_hf_dir(hf_dir)
    inputs = vlm_inputs(bridge.config)
    out: dict[str, Any] = {}
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True, tp_group=group)
    out["hf"] = logits_of(model, inputs)
    for name, path in checkpoints.items():
        m2 = bridge.build_model(dtype=torch.float32, device="cpu", tp_group=group, seed=99)
        report = bridge.load_checkpoint_weights(m2, path)
        out[name] = logits_of(m2, inputs)
        out[name + ":loaded"] = report["loaded"]
    # the trainer's resume path (nvlcore.training.checkpointing) through the bridge's entry hooks
    from types import SimpleNamespace

    from nvlcore.training.checkpointing import load_model_weights

    m3 = bridge.build_model(dtype=torch.float32, device="cpu", tp_group=group, seed=98)
    ctx = SimpleNamespace(tp_group=group, tp_rank=group.rank(), tp_size=group.size())
    load_model_weights(m3, Path(checkpoints["tp1"]), bridge=bridge, ctx=ctx)
    out["trainer_path"] = logits_of(m3, inputs)
    save_checkpoint(save_root, 3, model_state=bridge.model_components(model),
                    train_state={"iteration": 3}, run_config={"model": {"tensor_model_parallel_size": world}})
    return out
