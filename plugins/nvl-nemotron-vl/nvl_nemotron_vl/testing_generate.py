"""Distributed worker of the generation tests (importable by module path, so spawn can pickle it)."""

from __future__ import annotations

from typing import Any


def tp_generate_worker(
    rank: int, world: int, hf_dir: str, conversations: list[dict], new_tokens: int, lora_checkpoint: str | None = None
) -> dict[str, Any]:
    """Greedy generation at TP=``world`` on CPU: this rank's tokens and first-step logits (with a PEFT
    run's adapters applied unmerged when ``lora_checkpoint`` is given)."""
    import torch

    from nvlcore.generation import left_pad, merge_model_inputs

    from .generate import load_generator

    gen = load_generator(hf_dir, tensor_parallel_size=world, device="cpu", lora_checkpoint=lora_checkpoint)
    results = gen.generate(conversations, max_new_tokens=new_tokens)
    prepared = [gen.prepare(c) for c in conversations]
    ids, mask = left_pad([p.pop("input_ids") for p in prepared], gen.pad_token_id)
    with torch.inference_mode():
        cache = gen.model.allocate_cache(ids.shape[0], ids.shape[1] + 1, dtype=torch.float32, device="cpu")
        logits = gen.model.prefill(ids, attention_mask=mask, cache=cache, **merge_model_inputs(prepared))
    return {"tokens": [r.token_ids for r in results], "prefill_logits": logits.clone()}
