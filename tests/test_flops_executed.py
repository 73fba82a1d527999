"""Printed TFLOP/s (and metrics.jsonl's ``tflops_per_gpu``) count the work a step executes: a run whose
base is frozen (PEFT) computes no weight gradients of it, so it counts 2/3 of the bridge's 3 x forward,
the same share the benches' MFU uses (one constant: ``nvlcore.bridge.FROZEN_BASE_FLOPS_SHARE``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


class _Bridge:
    """A bridge whose formula is known: 3 x forward = 300 FLOPs per real token."""

    def train_flops(self, batch, *, num_parameters):
        return 300.0 * int(batch["attention_mask"].sum())


def _flops(frozen_base: bool) -> tuple[float, str]:
    import torch

    from nvlcore.training.finetune import _flops_fn

    fn, method = _flops_fn(_Bridge(), torch.nn.Linear(4, 4), SimpleNamespace(tp_size=1), frozen_base=frozen_base)
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8)}
    return fn(batch), method


def test_frozen_base_counts_two_thirds_of_the_training_formula():
    from nvlcore.bridge import FROZEN_BASE_FLOPS_SHARE

    full, method = _flops(frozen_base=False)
    lora, _ = _flops(frozen_base=True)
    assert method == "bridge"
    assert full == 300.0 * 16
    # forward 1x + input gradient 1x of 3x (no weight gradient): not the full formula
    assert FROZEN_BASE_FLOPS_SHARE == pytest.approx(2 / 3)
    assert lora == pytest.approx(full * 2 / 3) and lora != full
