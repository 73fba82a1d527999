"""Sequence parallelism (``model.sequence_parallel``) at TP=2 in two gloo processes, fp32, tiny toy:
losses and every gradient equal those of the same model without it, on an image batch (2 rows), packed
rows (under full-layer recomputation) and a right-padded batch whose length does not divide over the
ranks (padded inside); packed rows that do not divide are refused in one line; the state after a
sequence-parallel step loads into a model without it and gives the same logits. The negative control
skips one reduce-scatter and must fail the comparison."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

TOL = 1e-5


def _cases(cfg) -> dict[str, dict[str, torch.Tensor | str | None]]:
    g = torch.Generator().manual_seed(5)
    vocab = cfg.llm.vocab_size
    tok, img = cfg.num_image_token, cfg.img_context_token_id

    def text(n: int) -> list[int]:
        return torch.randint(30, min(vocab, 500), (n,), generator=g).tolist()

    def labelled(ids: torch.Tensor, **extra) -> dict:
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        loss_mask = (torch.rand(ids.shape, generator=g) > 0.3).float()
        return {"input_ids": ids, "labels": labels, "loss_mask": loss_mask, **extra}

    row0 = text(5) + [img] * (2 * tok) + text(17)
    row1 = text(3) + [img] * tok + text(20)
    L = max(len(row0), len(row1))
    L += L % 2  # divides over 2 ranks
    ids = torch.tensor([row0 + text(L - len(row0)), row1 + text(L - len(row1))])
    mean = torch.tensor(cfg.norm_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.norm_std).view(1, 3, 1, 1)
    pixels = (torch.rand(3, 3, cfg.force_image_size, cfg.force_image_size, generator=g) - mean) / std

    packed_ids = torch.tensor([text(30)])
    seq_idx = torch.tensor([[0] * 11 + [1] * 14 + [2] * 5])
    odd = torch.tensor([text(27), text(27)])
    odd_mask = torch.ones_like(odd)
    odd_mask[1, 20:] = 0
    return {
        "vlm": labelled(ids, pixel_values=pixels),
        "packed": labelled(packed_ids, seq_idx=seq_idx, recompute="layers"),
        "odd": labelled(odd, attention_mask=odd_mask, recompute="ssm"),
        "refused": labelled(torch.tensor([text(29)]), seq_idx=torch.tensor([[0] * 20 + [1] * 9])),
    }


def _run(tiny_toy, tiny_cfg, skip_one_reduction: bool):
    from nemotron_vl_testing_sp import sp_worker

    from nvl_dist_testing import run_distributed

    return run_distributed(sp_worker, 2, str(tiny_toy), _cases(tiny_cfg), skip_one_reduction)


def _worst(results: list[dict], case: str) -> float:
    """The largest difference, over both ranks, of the per-token loss and every gradient."""
    worst = 0.0
    for r in results:
        off, on = r[case]["off"], r[case]["on"]
        worst = max(worst, (off["loss"] - on["loss"]).abs().max().item())
        assert set(off["grads"]) == set(on["grads"])
        for name, g in off["grads"].items():
            worst = max(worst, (g - on["grads"][name]).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def sp_run(tiny_toy, tiny_cfg):
    return _run(tiny_toy, tiny_cfg, skip_one_reduction=False)


@pytest.mark.parametrize("case", ["vlm", "packed", "odd"])
def test_losses_and_gradients_match_without_sequence_parallelism(sp_run, case):
    for r in sp_run:
        # the norms' weights get their gradient from every rank's shard of the sequence
        assert any("layer_norm_weight" in n for n in r[case]["on"]["grads"])
    assert _worst(sp_run, case) < TOL


def test_packed_rows_that_do_not_divide_are_refused(sp_run):
    for r in sp_run:
        msg = r["refused"]
        assert msg is not None and "\n" not in msg
        assert "model.sequence_parallel" in msg and "dataset.seq_length" in msg


def test_state_after_a_sequence_parallel_step_loads_without_it(sp_run):
    for r in sp_run:
        rl = r["reload"]
        assert any(k.endswith("final_norm.weight") for k in rl["keys"])
        torch.testing.assert_close(rl["loaded"], rl["saved"], rtol=0, atol=TOL)


@pytest.mark.slow
def test_negative_control_one_reduce_scatter_skipped_fails(tiny_toy, tiny_cfg):
    broken = _run(tiny_toy, tiny_cfg, skip_one_reduction=True)
    assert _worst(broken, "vlm") > 100 * TOL
