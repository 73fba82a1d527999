"""Generation-based validation during training (``validation.generate_eval_interval``): every N
iterations the training model answers the first ``validation.generate_eval_samples`` examples of
the validation split and they are scored with the dataset maker's metrics, exactly as ``nvl eval``
scores them. The trainer logs ``val_gen_<metric>`` through its loggers."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any


def build_generate_eval(cfg: Any, bridge: Any, model: Any, manager: Any, ctx: Any, *,
                        print_fn: Callable[[str], None] = print) -> Callable[[], Mapping[str, float]] | None:
    """The trainer's ``generate_eval_fn``, or None (with a note) when the maker has no validation split.

    :raises ValueError: naming the config key when the model bridge cannot generate from the training model.
    """
    from nvlcore.eval.metrics import metrics_for

    ds = cfg.dataset
    maker = manager.registry("dataset_maker").get(ds.maker_name)
    splits = tuple(getattr(maker, "splits", ()) or ())
    if "validation" not in splits:
        print_fn(f"nvl finetune: generation-based validation skipped: dataset maker {ds.maker_name!r} has no "
                 f"validation split (it has {', '.join(splits) or 'train only'})")
        return None
    made = maker(split="validation", **{**dict(ds.maker_kwargs), **dict(ds.val_maker_kwargs)})
    metrics = metrics_for(maker)
    n = min(cfg.validation.generate_eval_samples, len(made))
    try:
        generator = bridge.generator_for_model(model, device=ctx.device, cuda_graph=False)
    except NotImplementedError as exc:
        raise ValueError(f"validation.generate_eval_interval: {exc}; set it to null") from None
    batch = max(1, min(cfg.train.micro_batch_size, n))
    print_fn(f"nvl finetune: generation-based validation: {n} example(s) every "
             f"{cfg.validation.generate_eval_interval} iterations, metrics {', '.join(metrics.names)}")

    def generate_eval() -> Mapping[str, float]:
        import torch

        from nvlcore.eval.runner import evaluate_generator

        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                report = evaluate_generator(generator, made, metrics, limit=n, batch_size=batch,
                                            rank=ctx.dp_rank, world=ctx.dp_size, contribute=ctx.tp_rank == 0,
                                            name=f"{ds.maker_name}/validation")
        finally:
            model.train(was_training)
        return {**report.metrics, "seconds": time.perf_counter() - t0}

    return generate_eval
