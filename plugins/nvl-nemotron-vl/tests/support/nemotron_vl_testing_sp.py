"""The sequence-parallel worker (``model.sequence_parallel``): the same model at TP=``world`` with and
without sequence parallelism, on the same batches; importable, so spawn can pickle it."""

from __future__ import annotations

from typing import Any

import torch


class _SkipFirstReduction(torch.autograd.Function):
    """The negative control: the first row-parallel output keeps this rank's slice of its own partial sum
    instead of the ranks' sum (one reduce-scatter skipped)."""

    calls = 0

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: Any) -> torch.Tensor:
        from nvl_nemotron_vl.model import parallel

        ctx.tp = tp
        _SkipFirstReduction.calls += 1
        if _SkipFirstReduction.calls == 1:
            return parallel._seq_split(x, tp)
        return parallel._seq_reduce_scatter(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from nvl_nemotron_vl.model import parallel

        return parallel._seq_gather(grad, ctx.tp), None


def _run(model: torch.nn.Module, case: dict[str, Any]) -> dict[str, Any]:
    """Per-token loss and every local gradient of ``sum(loss * loss_mask)``, and the logits (no grad)."""
    model.zero_grad(set_to_none=True)
    kwargs = {k: case[k] for k in ("attention_mask", "pixel_values", "seq_idx") if case.get(k) is not None}
    loss = model(case["input_ids"], labels=case["labels"], **kwargs)
    (loss * case["loss_mask"]).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads}


def sp_worker(rank: int, world: int, hf_dir: str, cases: dict[str, dict[str, Any]],
              skip_one_reduction: bool = False) -> dict[str, Any]:
    """Per case, the run without and with sequence parallelism (``{"off": ..., "on": ...}``), and the
    state after one SGD step with sequence parallelism loaded into a model without it (``"reload"``:
    logits of both)."""
    from megatron.core import parallel_state

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.model import parallel
    from nvlcore.parallel import init_parallel

    init_parallel(world, device_type="cpu")
    bridge = NemotronVLBridge.from_hf_dir(hf_dir)
    group = parallel_state.get_tensor_model_parallel_group()
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True, tp_group=group)
    out: dict[str, Any] = {}
    for name, case in cases.items():
        out[name] = {"off": _run(model, case)}
    bridge.set_sequence_parallel(model)
    if skip_one_reduction:
        parallel._ReduceScatterToSequence = _SkipFirstReduction
    for name, case in cases.items():
        model.set_recompute(case.get("recompute", "none"))
        out[name]["on"] = _run(model, case)
    model.set_recompute("none")

    # A step under sequence parallelism, saved and loaded into a model without it.
    case = cases["vlm"]
    _run(model, case)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    fresh = bridge.build_model(dtype=torch.float32, device="cpu", init="none", tp_group=group)
    fresh.load_state_dict(state, strict=True)
    ids, pixels = case["input_ids"], case["pixel_values"]
    out["reload"] = {"keys": sorted(state), "saved": model.forward_inference(ids, pixel_values=pixels),
                     "loaded": fresh.forward_inference(ids, pixel_values=pixels)}
    return out
