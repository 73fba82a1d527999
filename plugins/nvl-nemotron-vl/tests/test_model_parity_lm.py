"""The language model against transformers' NemotronHForCausalLM on the tiny toy's weights, fp32."""

from __future__ import annotations

import pytest
import torch

TOL = 1e-4


def _sequences(vocab: int) -> list[torch.Tensor]:
    from nemotron_vl_testing import random_sequences

    return random_sequences(vocab)


@pytest.fixture(scope="module")
def reference(tiny_toy):
    from nemotron_vl_testing import hf_lm_from_toy

    return hf_lm_from_toy(tiny_toy)


@pytest.fixture(scope="module")
def ours(tiny_toy):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    return NemotronVLBridge.from_hf_dir(tiny_toy).build_model(dtype=torch.float32, device="cpu", load_weights=True)


def test_toy_lm_loads_strictly_into_transformers(tiny_toy):
    """Must show: rename backbone.->model., lm_head.->lm_head., strict key matching."""
    from nemotron_vl_testing import hf_lm_config, lm_state_for_transformers, load_toy_state
    from transformers import NemotronHForCausalLM

    state = lm_state_for_transformers(load_toy_state(tiny_toy))
    model = NemotronHForCausalLM(hf_lm_config(tiny_toy))
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(model.state_dict())


def test_lm_logits_match_transformers_tp1(reference, ours, tiny_cfg):
    worst = 0.0
    for ids in _sequences(tiny_cfg.llm.vocab_size):
        with torch.no_grad():
            want = reference(ids).logits
            got = ours.forward_inference(ids)
        assert got.shape == want.shape
        worst = max(worst, (got - want).abs().max().item())
    print(f"max |logit diff| TP=1: {worst:.3e}")
    assert worst <= TOL


def test_lm_logits_with_right_padding_match_on_real_tokens(reference, ours, tiny_cfg):
    ids = _sequences(tiny_cfg.llm.vocab_size)[1]
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        got = ours.forward_inference(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= TOL


def test_per_token_loss_is_cross_entropy_of_the_reference(reference, ours, tiny_cfg):
    ids = _sequences(tiny_cfg.llm.vocab_size)[2]
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100
    loss = ours(ids, labels=labels)
    with torch.no_grad():
        logits = reference(ids).logits
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    assert loss.shape == ids.shape and loss.dtype == torch.float32
    assert (loss.detach() - want).abs().max().item() <= TOL
    assert torch.all(loss[labels == -100] == 0)
