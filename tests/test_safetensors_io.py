"""Streaming safetensors reader and sharded writer, checked against the safetensors library itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvlcore.convert.safetensors_io import (
    SafetensorsError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    parse_size,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g),
        "c.ids": torch.arange(5, dtype=torch.int64),
        "d.half": torch.randn(3, 3, generator=g).half(),
        "e.flag": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
    }


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5KB") == 1500
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("5 parsecs")


@pytest.mark.parametrize("shard_size", [10**9, 700])
def test_writer_output_loads_with_safetensors_and_round_trips(tmp_path, shard_size):
    ts = _tensors()
    plan = [(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    w = ShardedSafetensorsWriter(tmp_path, plan, max_shard_size=shard_size)
    for k in reversed(list(ts)):  # any order
        w.write(k, ts[k])
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    shards = sorted(set(index["weight_map"].values()))
    if shard_size == 700:
        assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    loaded = {}
    for s in shards:
        loaded.update(load_file(tmp_path / s))
    for k, v in ts.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(loaded[k], v), k
    # and our reader reads the index-sharded form back
    r = SafetensorsReader(tmp_path)
    got = r.read(list(ts))
    for k, v in ts.items():
        assert torch.equal(got[k], v)
    assert r.tensors["a.weight"].shape == (64, 32) and r.tensors["a.weight"].dtype == torch.bfloat16


def test_writer_rejects_wrong_shape_unplanned_and_missing(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [("a", (2, 2), torch.float32), ("b", (3,), torch.float32)])
    with pytest.raises(SafetensorsError, match=r"'a': got \(4,\)"):
        w.write("a", torch.zeros(4))
    with pytest.raises(SafetensorsError, match="not planned"):
        w.write("zzz", torch.zeros(1))
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(SafetensorsError, match="never written.*'b'"):
        w.finish()


def test_reader_single_file_and_errors(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "model.safetensors")
    r = SafetensorsReader(tmp_path)
    assert set(r.keys()) == set(ts) and r.total_bytes == sum(v.numel() * v.element_size() for v in ts.values())
    assert torch.equal(r.read(["a.weight"])["a.weight"], ts["a.weight"])
    with pytest.raises(SafetensorsError, match="not in"):
        r.read(["nope"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SafetensorsError, match="no model.safetensors.index.json.*pytorch_model.bin"):
        SafetensorsReader(empty)
    with pytest.raises(SafetensorsError, match="does not exist"):
        SafetensorsReader(tmp_path / "missing")
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(SafetensorsError, match="model-1.safetensors"):
        SafetensorsReader(idx)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(SafetensorsError, match="corrupt JSON header"):
        SafetensorsReader(bad)
