"""Distributed worker of the generation tests (importable by module path, so spawn can pickle it)."""

from __future__ import annotations

from typing import Any


def tp_generate_worker(
    rank: int, world: int, hf_dir: str, conversations: list[dict], new_tokens: int, lora_checkpoint: str | None = None
) -> dict[str, Any]:
    """Greedy generation at TP=``world`` on CPU: this rank's tokens and first-step logits (with a PEFT
    run's adapters applied unmerged when ``lora_checkpoint`` is given)."""
    import torch

    from nvl_nemotron_vl import load_generator
    from nvlcore.generation import left_pad, merge_model_inputs

    gen = load_generator(hf_dir, tensor_parallel_size=world, device="cpu", lora_checkpoint=lora_checkpoint)
    results = gen.generate(conversations, max_new_tokens=new_tokens)
    prepared = [gen.prepare(c) for c in conversations]
    ids, mask = left_pad([p.pop("input_ids") for p in prepared], gen.pad_token_id)
    with torch.inference_mode():
        cache = gen.model.allocate_cache(ids.shape[0], ids.shape[1] + 1, dtype=torch.float32, device="cpu")
        logits = gen.model.prefill(ids, attention_mask=mask, cache=cache, **merge_model_inputs(prepared))
    return {"tokens": [r.token_ids for r in results], "prefill_logits": logits.clone()}


def dp_eval_worker(rank: int, world: int, hf_dir: str, num_examples: int) -> dict[str, Any]:
    """``nvl eval``'s engine on this data-parallel rank's shard of ``synthetic_shapes``/test, gathered."""
    from nvl_nemotron_vl import load_generator
    from nvlcore.builtin.synthetic_vqa import SyntheticShapes
    from nvlcore.eval import evaluate_generator, metrics_for

    gen = load_generator(hf_dir, device="cpu")  # TP=1 over `world` processes: data parallel
    made = SyntheticShapes(split="test", num_examples=num_examples, questions=["color", "shape"])
    shard_sizes: list[int] = []
    report = evaluate_generator(gen, made, metrics_for(SyntheticShapes), batch_size=2, max_new_tokens=4,
                                rank=rank, world=world,
                                progress=lambda m: shard_sizes.append(int(m.split()[2].split("/")[1])))
    return {"summary": report.summary(), "records": [r.as_json() for r in report.records],
            "shard": shard_sizes[-1] if shard_sizes else 0}
