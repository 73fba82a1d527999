"""What the FP8 tests of the CPU (test_fp8.py) and the GPU (test_fp8_gpu.py) share: a batch and the tolerance."""

from __future__ import annotations

import torch

#: Logits' deviation from the fp32 model allowed under FP8: e4m3 keeps 3 mantissa bits (a relative
#: rounding of up to 1/16 per element, averaged down by the GEMMs' sums); measured 0.025 on the tiny toy,
#: and 0.069 for the missing-scale bug of the negative control.
TOLERANCE = 0.04


def deviation(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """``|logits - ref|`` relative to the spread of ``ref``'s logits around each position's mean."""
    return float((logits - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm())


def toy_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (2, 48), generator=g)
    return {"input_ids": ids, "labels": ids.roll(-1, dims=1)}
