"""Sequence packing in the core: the packer, the packed data position, and a packed `nvl finetune` run
(tiny toy, Raven-schema data, CPU) resumed mid-way reproducing the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvlcore.training.packing import PackedBatches, PackWindow, WindowSampler, pack_lengths, packing_mode

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def test_first_fit_and_best_fit() -> None:
    lengths = [6, 5, 4, 3, 2, 2, 7]
    assert pack_lengths(lengths, 10, "first_fit") == [[0, 2], [1, 3, 4], [5, 6]]
    # best fit: 2 (len 4) -> room 4 (bin 0); 3 (len 3) -> room 5 (bin 1, tighter than none); ...
    assert pack_lengths(lengths, 10, "best_fit") == [[0, 2], [1, 3, 4], [5, 6]]
    assert pack_lengths([5, 4, 3, 6, 1], 10, "first_fit") == [[0, 1, 4], [2, 3]]
    assert pack_lengths([5, 4, 3, 6, 1], 10, "best_fit") == [[0, 1, 4], [2, 3]]
    assert pack_lengths([6, 3, 4, 1], 10, "first_fit") == [[0, 1, 3], [2]]
    assert pack_lengths([6, 3, 4, 1], 10, "best_fit") == [[0, 1, 3], [2]]
    assert pack_lengths([3, 6, 2], 8, "first_fit") == [[0, 2], [1]]
    assert pack_lengths([3, 6, 2], 8, "best_fit") == [[0], [1, 2]]  # 2 fills the 6-bin exactly
    for mode in ("first_fit", "best_fit"):
        bins = pack_lengths(list(range(1, 30)), 40, mode)
        assert sorted(i for b in bins for i in b) == list(range(29))
        assert all(sum(i + 1 for i in b) <= 40 for b in bins)
    with pytest.raises(ValueError, match="dataset.seq_length=10"):
        pack_lengths([11], 10, "best_fit")
    with pytest.raises(ValueError, match="dataset.packing"):
        pack_lengths([1], 10, "next_fit")


def test_packing_mode_and_the_original_name() -> None:
    from nvlcore.config import load_config

    cfg = load_config(overrides=["dataset.enable_in_batch_packing=true"])
    assert packing_mode(cfg) == "best_fit"
    cfg = load_config(overrides=["dataset.pack_sequences_in_batch=true", "dataset.packing=first_fit"])
    assert packing_mode(cfg) == "first_fit"
    assert packing_mode(load_config()) == "none"


def _stream(order_len=10, window=4, dp_rank=0, dp_size=1, start=None, mbs=1, prefetch=0):
    sampler = WindowSampler(lambda p: p % order_len, window, dp_rank, dp_size,
                            None if start is None else start[0])
    pack = PackWindow(10, "first_fit", length=lambda s: s["n"])
    lengths = [3, 8, 4, 5, 2, 9, 1, 6, 7, 3]
    windows = (pack([{"n": lengths[i], "pos": p} for p, i in w]) for w in sampler)
    return PackedBatches(windows, lambda rows: [[s["pos"] for s in r] for r in rows], micro_batch_size=mbs,
                         dp_rank=dp_rank, dp_size=dp_size, start=start, prefetch=prefetch)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_packed_position_resumes_exactly_on_every_rank(prefetch: int) -> None:
    for dp_size in (1, 2):
        for rank in range(dp_size):
            full = _stream(dp_rank=rank, dp_size=dp_size)
            rows = [next(full) for _ in range(12)]
            seen = [p for b in rows for r in b for p in r]
            assert len(seen) == len(set(seen))  # no sample twice
            for cut in (1, 2, 3, 5, 7):
                first = _stream(dp_rank=rank, dp_size=dp_size, prefetch=prefetch)
                for _ in range(cut):
                    next(first)
                # with prefetch the thread has made batches past the cut; the position names the cut
                resumed = _stream(dp_rank=rank, dp_size=dp_size, start=first.position, prefetch=prefetch)
                assert [next(resumed) for _ in range(12 - cut)] == rows[cut:], (dp_size, rank, cut)
                first.close()
                resumed.close()
    # the two ranks pack disjoint windows of the one stream
    r0, r1 = _stream(dp_rank=0, dp_size=2), _stream(dp_rank=1, dp_size=2)
    s0 = {p for _ in range(6) for r in next(r0) for p in r}
    s1 = {p for _ in range(6) for r in next(r1) for p in r}
    assert not s0 & s1 and {p // 4 % 2 for p in s0} == {0} and {p // 4 % 2 for p in s1} == {1}


def test_prefetch_thread_raises_the_loaders_error_and_stops() -> None:
    import threading

    def windows():
        yield [[{"pos": 0}], [{"pos": 1}]]
        raise OSError("row 7 of make_x/train: cannot open image")

    batches = PackedBatches(windows(), lambda rows: rows[0][0]["pos"], micro_batch_size=1, prefetch=4)
    assert [next(batches), next(batches)] == [0, 1]
    assert batches.position == (1, 0)
    with pytest.raises(OSError, match="row 7"):
        next(batches)
    with pytest.raises(OSError, match="row 7"):  # and again: the error is not swallowed
        next(batches)
    batches.close()
    assert not any(t.name == "nvl-packed-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):  # not a wait for a batch that never comes
        next(batches)


def test_dropping_the_batches_stops_the_prefetch_thread() -> None:
    import gc
    import itertools
    import threading

    def alive() -> int:
        return sum(t.name == "nvl-packed-prefetch" and t.is_alive() for t in threading.enumerate())

    before = alive()
    endless = ([[{"pos": i}]] for i in itertools.count())
    batches = PackedBatches(endless, lambda rows: rows[0][0]["pos"], micro_batch_size=1, prefetch=2)
    assert next(batches) == 0 and alive() == before + 1
    del batches
    gc.collect()
    assert alive() == before


# ------------------------------------------------------------------------------ nvl finetune, packed
def nvl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nvlcore.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(save: Path) -> dict[int, dict]:
    return {row["iteration"]: row for row in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())
            if "loss" in row}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "hf", "tiny", seed=0)


@pytest.fixture(scope="module")
def raven(tmp_path_factory) -> Path:
    import random

    from datasets import Dataset, Features, List, Value
    from datasets import Image as HFImage
    from PIL import Image

    from nvl_data_testing import write_hub_dataset

    rng = random.Random(0)
    colours = {"A": (200, 30, 30), "B": (30, 200, 30), "C": (30, 30, 200), "D": (200, 200, 30)}
    rows: dict[str, list] = {"images": [], "texts": []}
    for _ in range(24):
        answer = rng.choice("ABCD")
        rows["images"].append([Image.new("RGB", (rng.choice([32, 64]), 64), colours[answer])
                               for _ in range(rng.randint(0, 2))])
        rows["texts"].append(
            [{"user": "Which figure completes the sequence? Answer with the letter." * rng.randint(1, 3),
                               "assistant": answer, "source": "raven"}])
    features = Features({"images": List(HFImage()),
                         "texts": List({"user": Value("string"), "assistant": Value("string"),
                                        "source": Value("string")})})
    root = tmp_path_factory.mktemp("cauldron")
    return write_hub_dataset(root, {"raven/train-00000-of-00001.parquet": Dataset.from_dict(rows, features=features)},
                             {"raven": {"train": "raven/train-*"}})


def run_args(toy: Path, raven: Path, save: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy),
        "dataset.maker_name", "make_raven_dataset", "dataset.maker_kwargs", json.dumps({"path": str(raven)}),
        "train.train_iters=10", "train.global_batch_size=2", "model.tensor_model_parallel_size=1",
        "model.seq_length=256", "dataset.seq_length=256", "dataset.num_workers=0", "optimizer.lr=1e-3",
        "optimizer.min_lr=1e-4", "checkpoint.save_interval=5", f"checkpoint.save={save}",
        "dataset.packing=best_fit", "dataset.packing_buffer_size=7", *extra,
    ]


def test_packed_finetune_resumed_mid_way_reproduces_the_losses(toy, raven, tmp_path) -> None:
    base = tmp_path / "base"
    proc = nvl(*run_args(toy, raven, base))
    assert "packing (best_fit) samples into rows of 256 tokens" in proc.stdout
    # what ran after the first step, where the start's kernel report could not know (CPU: no varlen kernel)
    assert proc.stdout.count("nvl finetune: kernels that ran: packed_attention: SDPA block mask (no varlen") == 1
    a = metrics(base)
    assert sorted(a) == list(range(1, 11))
    # more samples than rows were trained on (2 rows per iteration), and the position was saved
    assert a[10]["consumed_samples"] > 2 * 10 * 1.5, a[10]["consumed_samples"]
    import torch

    extra = torch.load(base / "iter_0000005" / "extra_state.pt", weights_only=False)
    assert len(extra["data"]["packing"]) == 1 and extra["data"]["packing"][0][0] >= 1
    # resumed from iteration 5 (with a DataLoader worker this time: processing moves to the worker)
    resumed = tmp_path / "resumed"
    proc = nvl(*run_args(toy, raven, resumed, f"checkpoint.load={base / 'iter_0000005'}", "dataset.num_workers=1"))
    b = metrics(resumed)
    assert sorted(b) == list(range(6, 11))
    assert [a[i]["loss"] for i in range(6, 11)] == [b[i]["loss"] for i in range(6, 11)]
    assert [a[i]["consumed_samples"] for i in range(6, 11)] == [b[i]["consumed_samples"] for i in range(6, 11)]
    assert b[10]["tflops_per_gpu"] > 0 and b[10]["tokens_per_s"] > 0


def test_packed_data_parallel_run_saves_every_ranks_position_and_resumes(toy, raven, tmp_path) -> None:
    """DP=2: each rank packs its own windows; both positions are saved, and the resumed run reproduces
    the losses; resuming at another data-parallel size is refused with a one-line error."""
    base = tmp_path / "dp2"
    nvl(*run_args(toy, raven, base), "--nproc-per-node", "2")
    import torch

    positions = torch.load(base / "iter_0000005" / "extra_state.pt", weights_only=False)["data"]["packing"]
    assert len(positions) == 2 and positions[0][0] % 2 == 0 and positions[1][0] % 2 == 1
    resumed = tmp_path / "dp2-resumed"
    nvl(*run_args(toy, raven, resumed, f"checkpoint.load={base / 'iter_0000005'}"), "--nproc-per-node", "2")
    a, b = metrics(base), metrics(resumed)
    assert [a[i]["loss"] for i in range(6, 11)] == [b[i]["loss"] for i in range(6, 11)]
    cmd = [sys.executable, "-m", "nvlcore.cli",
           *run_args(toy, raven, tmp_path / "dp1", f"checkpoint.load={base / 'iter_0000005'}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "saved by 2 data-parallel rank(s), this run has 1" in proc.stderr + proc.stdout
