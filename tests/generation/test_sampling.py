"""Sampling filters against transformers' logits warpers, and the sampler's contract."""

from __future__ import annotations

import pytest
import torch

from nvlcore.generation import SamplingParams, sample_next_token, top_k_filter, top_p_filter


def _logits(seed: int = 0, batch: int = 4, vocab: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


@pytest.mark.parametrize("k", [1, 2, 7, 49])
def test_top_k_matches_transformers(k: int) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = _logits(k)
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), ref)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(p: float) -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = _logits(int(p * 1000))
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    got = top_p_filter(logits, p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got, ref)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(top_p_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_greedy_is_argmax_and_ignores_generator() -> None:
    logits = _logits(3)
    assert torch.equal(sample_next_token(logits, SamplingParams()), logits.argmax(-1))
    assert SamplingParams().make_generator("cpu") is None


def test_seeded_sampling_is_repeatable_and_seed_dependent() -> None:
    logits = _logits(4, batch=64, vocab=1000) / 3
    p = SamplingParams(temperature=1.0, seed=7)
    a = sample_next_token(logits, p, p.make_generator("cpu"))
    b = sample_next_token(logits, p, p.make_generator("cpu"))
    q = SamplingParams(temperature=1.0, seed=8)
    c = sample_next_token(logits, q, q.make_generator("cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_sampling_equals_greedy() -> None:
    logits = _logits(5, batch=16)
    p = SamplingParams(temperature=2.0, top_k=1, seed=0)
    assert torch.equal(sample_next_token(logits, p, p.make_generator("cpu")), logits.argmax(-1))


def test_samples_stay_inside_the_nucleus() -> None:
    logits = _logits(6, batch=8, vocab=200)
    p = SamplingParams(temperature=0.7, top_p=0.5, top_k=20, seed=1)
    allowed = ~torch.isinf(top_p_filter(top_k_filter(logits / 0.7, 20), 0.5))
    gen = p.make_generator("cpu")
    for _ in range(20):
        tok = sample_next_token(logits, p, gen)
        assert allowed.gather(1, tok[:, None]).all()


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"top_k": -2}, "top_k")],
)
def test_bad_params_are_refused(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)
