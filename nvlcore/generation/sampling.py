"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

The filters follow the usual definitions (the ones transformers' ``TopKLogitsWarper`` and
``TopPLogitsWarper`` implement, which the tests compare against): top-k keeps the ``k`` largest
logits, top-p keeps the smallest set of most likely tokens whose probabilities add up to at least
``p`` (the most likely token is always kept). Temperature divides the logits before both filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token.

    :param temperature: ``0`` (the default) means greedy argmax; above 0, softmax sampling of
        ``logits / temperature``.
    :param top_p: nucleus sampling threshold in ``(0, 1]``; ``1`` disables it.
    :param top_k: keep only the ``k`` most likely tokens; ``0`` disables it.
    :param seed: seeds the sampling generator, so a run can be repeated exactly; ``None`` draws a
        fresh seed from torch's global generator.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (no randomness)."""
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator on ``device`` seeded with :attr:`seed` (``None`` when greedy)."""
        import torch

        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(self.seed))
        return gen


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the ``k``-th largest of its row to ``-inf`` (``k <= 0``: unchanged)."""
    import torch

    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``."""
    import torch

    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Ascending order: a token is dropped when all the mass at or below it is at most 1 - p,
    # i.e. the tokens above it already reach p. The largest logit is never dropped.
    drop_sorted = cum <= (1.0 - p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row.

    :param logits: ``[B, V]`` next-token logits (any float dtype; computed in float32).
    :param params: the sampling settings.
    :param generator: the random stream (from :meth:`SamplingParams.make_generator`); ignored
        when greedy.
    :returns: ``[B]`` int64 token ids on ``logits.device``.
    """
    import torch

    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, vocab], got {tuple(logits.shape)}")
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
