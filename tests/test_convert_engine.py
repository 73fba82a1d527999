"""nvl convert import/export through the model-agnostic engine, with a small fake bridge.

The fake bridge has the kinds of groups a real one has: renames, a fused tensor stored as components
(q/k/v -> qkv.q/.k/.v is a rename set; in_proj is split into z/x components), and an HF-only fp32
buffer carried under a reserved prefix. The Nemotron-VL bridge's own round trip is tested in its plugin.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvlcore import hookimpl
from nvlcore.bridge import ModelBridge
from nvlcore.checkpoint import Checkpoint, open_checkpoint, save_checkpoint
from nvlcore.convert import ConversionGroup
from nvlcore.convert import engine as engine_mod
from nvlcore.convert.engine import ConversionError, export_hf_checkpoint, import_hf_checkpoint

HIDDEN, HEADS = 8, 4
CARRY = "__hf_only__."


class FakeBridge(ModelBridge):
    """A conversion-only bridge: it overrides conversion_groups with hand-written groups (the engine's
    contract), so its mapping table is empty and it builds no model."""

    name = "fake"
    architectures = ("FakeArch",)

    def build_model(self, *, dtype, device=None, init="none", seed=1234):
        raise NotImplementedError("the conversion-only test bridge builds no model")

    def processor(self, *, seq_length=None, pad_to_multiple_of=None, **options):
        raise NotImplementedError("the conversion-only test bridge has no processor")

    def mapping_table(self):
        return []

    def check_tensor_parallel(self, tp):
        if HEADS % tp:
            raise ValueError(f"tensor-parallel size {tp} does not divide num_attention_heads ({HEADS})")

    def conversion_groups(self, hf_specs):
        groups = []
        for k in hf_specs:
            if k.endswith("in_proj.weight"):
                n = hf_specs[k].shape[0] // 2
                ck = k.replace("hf.", "mg.")

                def fwd(d, k=k, ck=ck, n=n):
                    z, x = d[k].split([n, n])
                    return {ck + ".z": z, ck + ".x": x}

                def back(d, k=k, ck=ck):
                    return {k: torch.cat([d[ck + ".z"], d[ck + ".x"]])}

                groups.append(ConversionGroup((k,), (ck + ".z", ck + ".x"), fwd, back, name=ck))
            elif k.startswith("hf.") and not k.endswith(("q.weight", "k.weight", "v.weight")):
                groups.append(ConversionGroup.rename(k, k.replace("hf.", "mg.")))
            elif k.endswith("q.weight"):
                base = k[: -len("q.weight")]
                hk = tuple(base + p + ".weight" for p in "qkv")
                ck = tuple(base.replace("hf.", "mg.") + "qkv.weight." + p for p in "qkv")
                groups.append(ConversionGroup(hk, ck, lambda d, hk=hk,
                                              ck=ck: {c: d[h] for h, c in zip(hk, ck, strict=True)},
                                              lambda d, hk=hk, ck=ck: {h: d[c] for h, c in zip(hk, ck, strict=True)}))
            elif not k.startswith("hf."):
                groups.append(ConversionGroup.rename(k, CARRY + k, carried=True))
        return groups


@hookimpl
def nvl_register_model_bridges(register):
    register("fake", FakeBridge)


def make_hf(d: Path, *, shape_tweak: int = 0, sharded: bool = True, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ts = {
        "hf.emb.weight": torch.randn(16 + shape_tweak, HIDDEN, generator=g).to(dtype),
        "hf.layers.0.in_proj.weight": torch.randn(12, HIDDEN, generator=g).to(dtype),
        "hf.layers.0.q.weight": torch.randn(HIDDEN, HIDDEN, generator=g).to(dtype),
        "hf.layers.0.k.weight": torch.randn(4, HIDDEN, generator=g).to(dtype),
        "hf.layers.0.v.weight": torch.randn(4, HIDDEN, generator=g).to(dtype),
        "hf.layers.0.A_log": torch.randn(4, generator=g),  # fp32 in a bf16 model: keeps its dtype
        "vision.input_conditioner.norm_mean": torch.tensor([0.48, 0.45, 0.40]).view(3, 1, 1),
        "vision.input_conditioner.norm_std": torch.tensor([0.26, 0.26, 0.27]).view(3, 1, 1),
    }
    d.mkdir(parents=True, exist_ok=True)
    if sharded:
        keys = list(ts)
        parts = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
        for f, ks in parts.items():
            save_file({k: ts[k] for k in ks}, d / f)
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    else:
        save_file(ts, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"architectures": ["FakeArch"], "torch_dtype": str(dtype)[6:],
                                               "llm_config": {"torch_dtype": str(dtype)[6:], "eos_token_id": 2}}))
    (d / "tokenizer.json").write_text('{"fake": true}')
    (d / "tokenizer_config.json").write_text("{}")
    (d / "preprocessor_config.json").write_text('{"image_size": 64}')
    (d / "modeling_fake.py").write_text("# remote code stays byte-identical\n")
    return ts


def exported(d: Path) -> dict[str, torch.Tensor]:
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(idx["weight_map"].values())):
        out.update(load_file(d / f))
    assert set(out) == set(idx["weight_map"])
    return out


def _bytes(t):
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_is_lossless(tmp_path, tp):
    src = make_hf(tmp_path / "hf")
    s = import_hf_checkpoint(FakeBridge.from_hf_dir(tmp_path / "hf"), tmp_path / "hf", tmp_path / "mg", tp=tp,
                             progress=False)
    assert s.hf_tensors == 8 and s.checkpoint_tensors == 9 and s.carried_tensors == 2
    ck = open_checkpoint(tmp_path / "mg")
    assert ck.path.name == "iter_0000000"
    assert ck.run_config()["model"]["tensor_model_parallel_size"] == tp
    assert (ck.path / "tokenizer" / "tokenizer.json").is_file()
    assert CARRY + "vision.input_conditioner.norm_mean" in ck.keys()
    e = export_hf_checkpoint(FakeBridge.from_hf_dir(tmp_path / "hf"), tmp_path / "hf", tmp_path / "mg",
                             tmp_path / "out", shard_size=300, progress=False)
    got = exported(tmp_path / "out")
    assert set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(_bytes(got[k]), _bytes(v)), k
    assert e.bytes_written == sum(v.numel() * v.element_size() for v in src.values())
    for n in ("config.json", "tokenizer.json", "preprocessor_config.json", "modeling_fake.py"):
        assert (tmp_path / "out" / n).read_bytes() == (tmp_path / "hf" / n).read_bytes() or n == "config.json"
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_single_file_source_and_dtype_conversion(tmp_path):
    src = make_hf(tmp_path / "hf", sharded=False)
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", dtype="float32", progress=False)
    specs = Checkpoint(tmp_path / "mg").specs()
    assert specs["mg.emb.weight"].dtype == torch.float32
    assert specs[CARRY + "vision.input_conditioner.norm_mean"].dtype == torch.float32
    export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", tmp_path / "out32", progress=False)
    got = exported(tmp_path / "out32")
    assert got["hf.emb.weight"].dtype == torch.float32
    cfg = json.loads((tmp_path / "out32" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["llm_config"]["torch_dtype"] == "float32"
    # bf16 -> fp32 -> bf16 is exact
    export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", tmp_path / "out16", dtype="bfloat16", progress=False)
    got = exported(tmp_path / "out16")
    for k, v in src.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_export_of_a_trained_checkpoint(tmp_path):
    """Iteration N from a trainer: no carried tensors, optimizer state present; export still lossless."""
    src = make_hf(tmp_path / "hf")
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    model = {k: v for k, v in Checkpoint(tmp_path / "mg").load().items() if not k.startswith(CARRY)}
    model["mg.emb.weight"] = model["mg.emb.weight"] + 1
    save_checkpoint(tmp_path / "run", 5, model_state=model,
                    sharded_states={"optimizer": {k + ".exp_avg": torch.zeros_like(v) for k, v in model.items()}},
                    extra_state={"scheduler": {"step": 5}})
    s = export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "run", tmp_path / "out", progress=False)
    assert s.from_source_hf == 2
    got = exported(tmp_path / "out")
    assert set(got) == set(src)
    assert torch.equal(got["hf.emb.weight"], src["hf.emb.weight"] + 1)
    assert torch.equal(got["vision.input_conditioner.norm_std"], src["vision.input_conditioner.norm_std"])


def test_export_with_a_config_only_reference(tmp_path):
    src = make_hf(tmp_path / "hf")
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    export_hf_checkpoint(b, ref, tmp_path / "mg", tmp_path / "out", progress=False)
    got = exported(tmp_path / "out")
    assert set(got) == set(src) and (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "modeling_fake.py").is_file()


# ---------------------------------------------------------------------------------------------- errors


def test_errors_are_specific(tmp_path):
    make_hf(tmp_path / "hf")
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"tensor-parallel size 3 does not divide num_attention_heads \(4\)"):
        import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", tp=3, progress=False)
    with pytest.raises(ConversionError, match="does not exist"):
        import_hf_checkpoint(b, tmp_path / "nope", tmp_path / "mg", progress=False)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="no model.safetensors.index.json or model.safetensors"):
        import_hf_checkpoint(b, tmp_path / "noweights", tmp_path / "mg", progress=False)
    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    with pytest.raises(FileExistsError, match="--megatron-path .* exists"):
        import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", overwrite=True, progress=False)
    # shape mismatch: the reference model differs from the checkpoint
    make_hf(tmp_path / "hf2", shape_tweak=1)
    with pytest.raises(ConversionError,
                       match=r"hf\.emb\.weight: the checkpoint gives \(16, 8\), "
                             r"the source HF checkpoint has \(17, 8\)"):
        export_hf_checkpoint(b, tmp_path / "hf2", tmp_path / "mg", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="--hf-path .* exists"):
        export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="not an nvl/Megatron checkpoint"):
        export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "hf", tmp_path / "out2", progress=False)


def test_strict_export_refuses_missing_tensors_and_not_strict_skips(tmp_path):
    src = make_hf(tmp_path / "hf")
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    model = {k: v for k, v in Checkpoint(tmp_path / "mg").load().items() if k != "mg.emb.weight"}
    save_checkpoint(tmp_path / "partial", 1, model_state=model)
    with pytest.raises(ConversionError, match=r"cannot be produced.*hf\.emb\.weight.*--not-strict"):
        export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "partial", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    s = export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "partial", tmp_path / "out", strict=False, progress=False)
    assert s.skipped == ["hf.emb.weight"] and set(exported(tmp_path / "out")) == set(src) - {"hf.emb.weight"}
    # a checkpoint tensor that maps to nothing (an unmerged adapter, another model) is refused too
    model = dict(Checkpoint(tmp_path / "mg").load())
    model["mg.layers.0.lora_a.weight"] = torch.zeros(2, 2)
    save_checkpoint(tmp_path / "extra", 1, model_state=model)
    with pytest.raises(ConversionError, match=r"map to no HF tensor.*lora_a"):
        export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "extra", tmp_path / "out3", progress=False)


def test_failure_mid_write_leaves_no_output(tmp_path, monkeypatch):
    make_hf(tmp_path / "hf")
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    real = engine_mod.ShardedSafetensorsWriter.write
    calls = []

    def flaky(self, key, t):
        calls.append(key)
        if len(calls) == 4:
            raise OSError("Input/output error (simulated)")
        return real(self, key, t)

    monkeypatch.setattr(engine_mod.ShardedSafetensorsWriter, "write", flaky)
    with pytest.raises(OSError, match="simulated"):
        export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()

    real_read = engine_mod.SafetensorsReader.read
    n = []

    def flaky_read(self, keys):
        n.append(1)
        if len(n) == 3:
            raise OSError("I/O error (simulated)")
        return real_read(self, keys)

    monkeypatch.setattr(engine_mod.SafetensorsReader, "read", flaky_read)
    with pytest.raises(OSError, match="simulated"):
        import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg2", progress=False)
    assert not (tmp_path / "mg2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _enospc_after(n: int, real: Any) -> Any:
    """``real`` that writes ``n`` times, then fails as a full disk does."""
    calls = []

    def write(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """Import (DCP's file writer) and export (the safetensors writer) meeting ENOSPC mid-write: one
    ConversionError naming the output option, path, space needed and free; no output, no temp dirs."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    make_hf(tmp_path / "hf")
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    monkeypatch.setattr(dcp_fs, "_write_item", _enospc_after(2, dcp_fs._write_item))
    with pytest.raises(ConversionError) as err:
        import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    msg = str(err.value)
    assert msg.startswith(f"--megatron-path {tmp_path / 'mg'}: not enough space on ") and "\n" not in msg
    assert "needs about" in msg and " free; nothing was written" in msg and "intact" not in msg
    assert not (tmp_path / "mg").exists() and _leftovers(tmp_path) == []
    monkeypatch.undo()

    import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    monkeypatch.setattr(engine_mod.ShardedSafetensorsWriter, "write",
                        _enospc_after(3, engine_mod.ShardedSafetensorsWriter.write))
    with pytest.raises(ConversionError, match=r"^--hf-path .*out: not enough space on .* free; nothing was written"):
        export_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    make_hf(tmp_path / "hf")
    b = FakeBridge.from_hf_dir(tmp_path / "hf")
    writes = []
    monkeypatch.setattr(engine_mod, "save_checkpoint", lambda *a, **k: writes.append(1))
    monkeypatch.setattr(engine_mod, "free_bytes", lambda path: 1000)
    with pytest.raises(ConversionError, match=r"needs about 0\.0 MB, 0\.0 MB free; nothing was written"):
        import_hf_checkpoint(b, tmp_path / "hf", tmp_path / "mg", progress=False)
    assert writes == [] and not (tmp_path / "mg").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_round_trip_and_errors(tmp_path, register_plugin, nvl_cli):
    import sys

    register_plugin(sys.modules[__name__], name="fake_bridge_plugin")
    src = make_hf(tmp_path / "hf")
    r = nvl_cli("convert", "import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "mg"),
                "--tp", "2", "--no-progress", "--summary-json", str(tmp_path / "s.json"))
    assert r.exit_code == 0, r.output
    assert "9 checkpoint" in r.output and "GB/s" in r.output
    assert json.loads((tmp_path / "s.json").read_text())["hf_tensors"] == 8
    r = nvl_cli("convert", "export", "--hf-model", str(tmp_path / "hf"), "--megatron-path",
                str(tmp_path / "mg" / "iter_0000000"),
                "--hf-path", str(tmp_path / "out"), "--not-strict", "--shard-size", "1KB", "--no-progress")
    assert r.exit_code == 0, r.output
    assert set(exported(tmp_path / "out")) == set(src)
    r = nvl_cli("convert", "import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "mg2"),
                "--tp", "3")
    assert r.exit_code != 0 and "does not divide num_attention_heads" in r.output
    r = nvl_cli("convert", "import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "mg"))
    assert r.exit_code != 0 and "--overwrite" in r.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    r = nvl_cli("convert", "import", "--hf-model", str(other), "--megatron-path", str(tmp_path / "mg3"))
    assert r.exit_code != 0 and "no installed model bridge handles architectures ['LlamaForCausalLM']" in r.output
    r = nvl_cli("convert", "export", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "mg"),
                "--hf-path", str(tmp_path / "o2"), "--shard-size", "lots")
    assert r.exit_code != 0 and "cannot parse size" in r.output


def test_cli_import_onto_a_full_disk(tmp_path, register_plugin, nvl_cli, monkeypatch):
    import sys

    import torch.distributed.checkpoint.filesystem as dcp_fs

    register_plugin(sys.modules[__name__], name="fake_bridge_plugin")
    make_hf(tmp_path / "hf")
    monkeypatch.setattr(dcp_fs, "_write_item", _enospc_after(1, dcp_fs._write_item))
    r = nvl_cli("convert", "import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "mg"),
                "--no-progress")
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip() and "warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith(f"Error: --megatron-path {tmp_path / 'mg'}: not enough space")
    assert "Traceback" not in r.output and "intact" not in r.output
    assert not (tmp_path / "mg").exists() and _leftovers(tmp_path) == []
