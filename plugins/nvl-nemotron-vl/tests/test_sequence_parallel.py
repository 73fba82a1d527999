"""Sequence parallelism (``model.sequence_parallel``) at TP=2 in two gloo processes, fp32, tiny toy:
losses and every gradient equal those of the same model without it, on an image batch (2 rows), packed
rows (under full-layer recomputation), and a right-padded batch and two packed rows whose length does not
divide over the ranks (padded inside); the state after a sequence-parallel step loads into a model
without it and gives the same logits. The negative control skips one reduce-scatter and must fail the
comparison."""

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
        "packed_odd": labelled(torch.tensor([text(29), text(29)]),
                               seq_idx=torch.tensor([[0] * 20 + [1] * 9, [0] * 3 + [1] * 12 + [2] * 14])),
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


@pytest.mark.parametrize("case", ["vlm", "packed", "odd", "packed_odd"])
def test_losses_and_gradients_match_without_sequence_parallelism(sp_run, case):
    for r in sp_run:
        # the norms' weights get their gradient from every rank's shard of the sequence
        assert any("layer_norm_weight" in n for n in r[case]["on"]["grads"])
    assert _worst(sp_run, case) < TOL


def test_padding_packed_rows_moves_their_boundaries_on_the_host():
    """The padded rows' offsets, moved without reading the GPU, are those found from the padded seq_idx."""
    from types import SimpleNamespace

    from nvl_nemotron_vl.model.kernels import PackedSequences, cu_seqlens_from_seq_idx
    from nvl_nemotron_vl.model.lm import _Decoder

    seq_idx = torch.tensor([[0] * 4 + [1] * 3, [5] * 2 + [6] * 5, [0] * 7])
    for tp in (2, 3, 4):
        fake = SimpleNamespace(tp=SimpleNamespace(size=tp))
        h, mask, packed = _Decoder._pad_for_sequence_parallel(fake, torch.zeros(3, 7, 2), None,
                                                              PackedSequences.of(seq_idx))
        assert h.shape[1] % tp == 0 and mask is None
        assert packed.seq_idx.shape == (3, h.shape[1])
        assert torch.equal(packed.seq_idx[:, :7], seq_idx)
        assert torch.equal(packed.cu_seqlens_cpu, cu_seqlens_from_seq_idx(packed.seq_idx))
        assert packed.max_seqlen == 7


def test_state_after_a_sequence_parallel_step_loads_without_it(sp_run):
    for r in sp_run:
        rl = r["reload"]
        assert any(k.endswith("final_norm.weight") for k in rl["keys"])
        torch.testing.assert_close(rl["loaded"], rl["saved"], rtol=0, atol=TOL)


@pytest.mark.slow
def test_negative_control_one_reduce_scatter_skipped_fails(tiny_toy, tiny_cfg):
    broken = _run(tiny_toy, tiny_cfg, skip_one_reduction=True)
    assert _worst(broken, "vlm") > 100 * TOL
