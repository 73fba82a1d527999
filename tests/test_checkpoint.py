"""nvlcore.checkpoint: layout and resolve rules, atomic saves, extra states, resharding across TP sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvlcore.checkpoint import (
    Checkpoint,
    CheckpointKeyError,
    CheckpointNotFoundError,
    OutputExistsError,
    SaveOptions,
    StreamedState,
    TensorSpec,
    capture_rng_state,
    iter_dir_name,
    list_iterations,
    load_model_state,
    open_checkpoint,
    read_tracker,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from nvlcore.checkpoint import save as save_mod

WORKERS = Path(__file__).parent / "workers"


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.count": torch.arange(6, dtype=torch.int64),
    }


def test_iter_dir_name_is_seven_digits():
    assert iter_dir_name(0) == "iter_0000000"
    assert iter_dir_name(1234567) == "iter_1234567"
    with pytest.raises(ValueError):
        iter_dir_name(-1)


def test_round_trip_every_part(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    st = _state()
    out = save_checkpoint(
        tmp_path / "ck",
        12,
        model_state=st,
        sharded_states={"optimizer": {"a.weight.exp_avg": st["a.weight"] * 3}},
        extra_state={"scheduler": {"last_epoch": 12}, "data": {"consumed": 96}},
        rank_state={"rng": capture_rng_state()},
        run_config={"model": {"tensor_model_parallel_size": 1}, "paths": (Path("/x"),)},
        train_state={"iteration": 12, "consumed_train_samples": 96},
        files={"tokenizer": tok},
    )
    assert out == tmp_path / "ck" / "iter_0000012"
    assert read_tracker(tmp_path / "ck") == 12
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.path == out and ck.iteration == 12
    got = ck.load()
    assert set(got) == set(st)
    for k in st:
        assert got[k].dtype == st[k].dtype and torch.equal(got[k], st[k])
    assert torch.equal(ck.load(state="optimizer")["a.weight.exp_avg"], st["a.weight"] * 3)
    assert ck.sharded_state_names() == ["optimizer"]
    assert ck.extra_state() == {"scheduler": {"last_epoch": 12}, "data": {"consumed": 96}}
    assert ck.train_state()["consumed_train_samples"] == 96
    assert ck.run_config() == {"model": {"tensor_model_parallel_size": 1}, "paths": ["/x"]}
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert ck.rank_state(0) is not None and ck.rank_state(1) is None
    # a subset of keys, and into a template of another dtype
    assert set(load_model_state(out, ["a.weight"])) == {"a.weight"}
    t = ck.load({"b.weight": torch.zeros(5, dtype=torch.float32)})
    assert torch.equal(t["b.weight"], st["b.weight"].float())


def test_rng_state_round_trip_through_weights_only(tmp_path):
    import random

    import numpy as np

    save_checkpoint(tmp_path, 1, model_state=_state(), rank_state=capture_rng_state())
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    restore_rng_state(Checkpoint(tmp_path).rank_state(0))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def test_load_errors_name_the_key_and_shapes(tmp_path):
    save_checkpoint(tmp_path, 0, model_state=_state())
    ck = Checkpoint(tmp_path)
    with pytest.raises(CheckpointKeyError, match=r"nope\.weight"):
        ck.load(["nope.weight"])
    with pytest.raises(ValueError, match=r"a\.weight.*\(4, 3\).*\(3, 4\)"):
        ck.load({"a.weight": torch.zeros(3, 4)})


def test_resolve_rules(tmp_path):
    root = tmp_path / "run"
    for it in (5, 10, 15):
        save_checkpoint(root, it, model_state=_state(it))
    assert resolve_checkpoint_dir(root) == root / "iter_0000015"
    assert resolve_checkpoint_dir(root / "iter_0000010") == root / "iter_0000010"
    assert list_iterations(root) == [5, 10, 15]
    # Megatron-LM tracker only
    (root / "latest_train_state.pt").unlink()
    (root / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert resolve_checkpoint_dir(root) == root / "iter_0000010"
    # no tracker at all: the newest complete iteration
    (root / "latest_checkpointed_iteration.txt").unlink()
    assert resolve_checkpoint_dir(root) == root / "iter_0000015"
    # tracker pointing at a missing iteration: say so and list what exists
    (root / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(CheckpointNotFoundError, match=r"iteration 20.*\[5, 10, 15\]"):
        resolve_checkpoint_dir(root)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "missing")
    other = tmp_path / "hf"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match=r"not an nvl/Megatron checkpoint.*config\.json"):
        resolve_checkpoint_dir(other)
    bad = tmp_path / "iter_0000003"
    bad.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no .metadata"):
        resolve_checkpoint_dir(bad)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    save_checkpoint(tmp_path, 4, model_state=_state(0))
    with pytest.raises(OutputExistsError, match="iter_0000004 exists"):
        save_checkpoint(tmp_path, 4, model_state=_state(1))
    assert torch.equal(load_model_state(tmp_path)["a.weight"], _state(0)["a.weight"])
    save_checkpoint(tmp_path, 4, model_state=_state(1), options=SaveOptions(overwrite=True))
    assert torch.equal(load_model_state(tmp_path)["a.weight"], _state(1)["a.weight"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_most_recent_k(tmp_path):
    for it in range(1, 6):
        save_checkpoint(tmp_path, it, model_state=_state(it), options=SaveOptions(most_recent_k=2))
    assert list_iterations(tmp_path) == [4, 5]
    assert read_tracker(tmp_path) == 5


def _assert_untouched(root: Path, latest: int) -> None:
    assert list_iterations(root) == [latest]
    assert read_tracker(root) == latest
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(latest)
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_failure_mid_tensor_write_leaves_nothing(tmp_path):
    save_checkpoint(tmp_path, 1, model_state=_state())
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in _state().items()}
    calls = []

    def produce(key):
        calls.append(key)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return _state()[key]

    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, model_state=StreamedState(specs, produce))
    _assert_untouched(tmp_path, 1)


def test_failure_after_tensors_leaves_nothing(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, model_state=_state())

    def boom(*a, **k):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(save_mod, "publish_dir", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, model_state=_state(), run_config={"a": 1})
    _assert_untouched(tmp_path, 1)


def test_unloadable_extra_state_fails_the_save(tmp_path):
    import numpy as np

    save_checkpoint(tmp_path, 1, model_state=_state())
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path, 2, model_state=_state(), extra_state={"arr": np.zeros(3)})
    _assert_untouched(tmp_path, 1)


def test_streamed_save_checks_announced_shapes(tmp_path):
    specs = {"a": TensorSpec((2, 2), torch.float32)}
    with pytest.raises(ValueError, match=r"a: produced \(3,\)"):
        save_checkpoint(tmp_path, 0, model_state=StreamedState(specs, lambda k: torch.zeros(3)))
    assert list_iterations(tmp_path) == []


def test_model_keys_may_not_use_the_state_separator(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 0, model_state={"a/b": torch.zeros(1)})


@pytest.mark.distributed
def test_tp2_save_loads_at_tp1_and_back(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(
        [sys.executable, str(WORKERS / "ckpt_dist_worker.py"), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    # TP=2 checkpoint read back in full by one process: shards reassembled, nothing duplicated
    import importlib.util

    spec = importlib.util.spec_from_file_location("ckpt_dist_worker", WORKERS / "ckpt_dist_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full = mod.full_tensors()
    ck = Checkpoint(tmp_path / "tp2")
    got = ck.load()
    for k in full:
        assert got[k].dtype == full[k].dtype and torch.equal(got[k], full[k]), k
    assert torch.equal(ck.load(state="optimizer")["col.weight.exp_avg"], full["col.weight"] * 2)
    assert ck.extra_state() == {"scheduler": {"last_step": 7}}
    assert ck.rank_state(1)["rank"] == 1
    assert ck.manifest()["saved_world_size"] == 2
    # each logical chunk stored once: DP replicas / replicated tensors are deduplicated by DCP
    for name in ("tp1", "tp2"):
        md = Checkpoint(tmp_path / name)._md()
        chunks = {}
        for idx in md.storage_data:
            chunks.setdefault(idx.fqn, []).append(tuple(idx.offset))
        for fqn, offs in chunks.items():
            assert len(offs) == len(set(offs)), f"{name}: {fqn} written twice at {offs}"
        assert len(chunks["norm.weight"]) == 1
    assert len(Checkpoint(tmp_path / "tp2")._md().state_dict_metadata["col.weight"].chunks) == 2


def test_a_one_rank_process_group_saves_like_a_single_process(tmp_path):
    """torch.distributed initialised with world size 1 (a one-rank init_parallel) must not
    turn streamed saves or fsync batching into collective behaviour."""
    import subprocess
    import sys

    code = f"""
import torch, torch.distributed as dist
from nvlcore.checkpoint import StreamedState, TensorSpec, save_checkpoint, load_model_state
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
spec = {{"a": TensorSpec((2, 3), torch.float32)}}
save_checkpoint({str(tmp_path)!r}, 0, model_state=StreamedState(spec, lambda k: torch.ones(2, 3)))
assert torch.equal(load_model_state({str(tmp_path)!r})["a"], torch.ones(2, 3))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
