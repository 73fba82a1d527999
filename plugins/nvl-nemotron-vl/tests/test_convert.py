"""nvl convert on the tiny toy: lossless round trip at --tp 1 and 2, and checkpoints that load into the
training model at any TP with the logits of the HF-loaded model (TP=2 in two gloo processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

CARRIED = ("vision_model.radio_model.input_conditioner.norm_mean",
           "vision_model.radio_model.input_conditioner.norm_std")


def nvl(*args: str):
    from nvlcore.cli import build_cli

    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(d / f))
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def imported(tiny_toy, tmp_path_factory):
    """The tiny toy imported with --tp 1 and --tp 2."""
    root = tmp_path_factory.mktemp("conv")
    out = {}
    for tp in (1, 2):
        r = nvl("convert", "import", "--hf-model", str(tiny_toy), "--megatron-path", str(root / f"tp{tp}"),
                "--tp", str(tp), "--no-progress")
        assert r.exit_code == 0, r.output
        out[tp] = root / f"tp{tp}"
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_import_export_round_trip_is_byte_identical(tiny_toy, imported, tmp_path, tp):
    from nvlcore.checkpoint import open_checkpoint

    ck = open_checkpoint(imported[tp])
    keys = ck.keys()
    assert "language_model.decoder.layers.0.mixer.in_proj.weight.z" in keys
    assert all("hf_only." + k in keys for k in CARRIED)
    assert ck.run_config()["model"]["tensor_model_parallel_size"] == tp
    assert (ck.path / "tokenizer" / "tokenizer.json").is_file()
    r = nvl("convert", "export", "--hf-model", str(tiny_toy), "--megatron-path", str(imported[tp]),
            "--hf-path", str(tmp_path / "hf"), "--shard-size", "200KB", "--no-progress")
    assert r.exit_code == 0, r.output
    src, got = hf_tensors(tiny_toy), hf_tensors(tmp_path / "hf")
    assert set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and raw(got[k]) == raw(v), k
    assert len(
        set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    for n in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (tmp_path / "hf" / n).read_bytes() == (tiny_toy / n).read_bytes() or n == "config.json", n
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (tiny_toy / "config.json").read_text())


def test_tp_that_does_not_divide_names_the_dimension(tiny_toy, tmp_path):
    r = nvl("convert", "import", "--hf-model", str(tiny_toy), "--megatron-path", str(tmp_path / "x"), "--tp", "3")
    assert r.exit_code != 0 and "tensor_model_parallel_size=3 does not divide" in r.output
    assert "num_key_value_heads" in r.output and not (tmp_path / "x").exists()


def test_missing_weights_and_wrong_shapes_are_reported(tiny_toy, imported, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_toy, bad)
    ts = hf_tensors(bad)
    del ts["mlp1.1.weight"]
    (bad / "model.safetensors").unlink()
    save_file(ts, bad / "model.safetensors")
    r = nvl("convert", "import", "--hf-model", str(bad), "--megatron-path", str(tmp_path / "o"))
    assert r.exit_code != 0 and "mlp1.1.weight" in r.output and "not in the checkpoint" in r.output
    # a reference whose config says a larger projector: export names the key and both shapes
    cfg = json.loads((tiny_toy / "config.json").read_text())
    ref = tmp_path / "ref"
    ref.mkdir()
    cfg["projector_hidden_size"] *= 2
    (ref / "config.json").write_text(json.dumps(cfg))
    ts = hf_tensors(tiny_toy)
    ts["mlp1.1.weight"] = torch.zeros(ts["mlp1.1.weight"].shape[0] * 2, ts["mlp1.1.weight"].shape[1],
                                      dtype=torch.bfloat16)
    ts["mlp1.3.weight"] = torch.zeros(ts["mlp1.3.weight"].shape[0], ts["mlp1.3.weight"].shape[1] * 2,
                                      dtype=torch.bfloat16)
    save_file(ts, ref / "model.safetensors")
    r = nvl("convert", "export", "--hf-model", str(ref), "--megatron-path", str(imported[1]), "--hf-path",
            str(tmp_path / "e"))
    assert r.exit_code != 0 and "shape mismatch for mlp1.1.weight" in r.output, r.output
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def tp2_run(tiny_toy, imported, tmp_path_factory):
    from nemotron_vl_testing_convert import tp_load_worker

    from nvl_dist_testing import run_distributed

    save_root = tmp_path_factory.mktemp("tp2save") / "run"
    res = run_distributed(tp_load_worker, 2, str(tiny_toy), {"tp1": str(imported[1]), "tp2": str(imported[2])},
                          str(save_root))
    return res, save_root


def test_checkpoints_load_at_tp1_and_tp2_with_hf_logits(tiny_toy, imported, tp2_run):
    from nemotron_vl_testing_convert import logits_of, vlm_inputs

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.parallel import init_parallel

    init_parallel(1, device_type="cpu")
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    inputs = vlm_inputs(bridge.config)
    ref = logits_of(bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True), inputs)
    res, saved_at_tp2 = tp2_run
    # TP=1: imported at --tp 1, imported at --tp 2, and saved by a TP=2 model (DTensor shards) -> identical
    for name, path in (("tp1", imported[1]), ("tp2", imported[2]), ("saved at TP=2", saved_at_tp2)):
        model = bridge.build_model(dtype=torch.float32, device="cpu", seed=99)
        before = logits_of(model, inputs)
        bridge.load_checkpoint_weights(model, path)
        got = logits_of(model, inputs)
        assert not torch.equal(before, ref)
        assert torch.equal(got, ref), f"TP=1 logits from the {name} checkpoint differ"
    # TP=2: both imports give exactly the HF-loaded TP=2 logits, which match TP=1 up to reduction order
    for rank in (0, 1):
        for name in ("tp1", "tp2", "trainer_path"):
            assert torch.equal(res[rank][name], res[rank]["hf"]), (rank, name)
    assert torch.allclose(res[0]["hf"], ref, atol=1e-4, rtol=1e-4)


def test_trained_checkpoint_strict_errors(tiny_toy, imported, tmp_path):
    """A checkpoint that lacks a parameter is refused by the loader, naming it."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.bridge import BridgeError
    from nvlcore.checkpoint import Checkpoint, save_checkpoint
    from nvlcore.parallel import init_parallel

    init_parallel(1, device_type="cpu")
    state = Checkpoint(imported[1]).load()
    del state["vision_projection.encoder.linear_fc1.weight"]
    save_checkpoint(tmp_path / "c", 1, model_state=state)
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    model = bridge.build_model(dtype=torch.float32, device="cpu")
    with pytest.raises(BridgeError, match="vision_projection.encoder.linear_fc1.weight"):
        bridge.load_checkpoint_weights(model, tmp_path / "c")
    # strict=False loads the rest and says what it left alone (also parameters outside the mapping)
    model.register_parameter("lora_probe", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(BridgeError, match="outside bridge 'nemotron_nano_v2_vl'.s mapping.*lora_probe"):
        bridge.load_checkpoint_weights(model, tmp_path / "c")
    report = bridge.load_checkpoint_weights(model, tmp_path / "c", strict=False)
    assert report["not_loaded"] == ["lora_probe", "vision_projection.encoder.linear_fc1.weight"]
    assert report["loaded"] == len(dict(model.named_parameters())) - 2


@pytest.mark.parametrize("tp", [2, 4])
def test_checkpoint_layout_agrees_with_the_mapping(tp):
    """The per-rank layout of training checkpoints (nvlcore.mapping) against the table's own
    components_to_local: each rank's part is its chunk of each logical component, and reassembles."""
    from nvlcore.mapping import (
        FusedRowsMapping,
        IdentityMapping,
        PartsMapping,
        QKVMapping,
        VocabMapping,
        assemble_from_entries,
    )

    g = torch.Generator().manual_seed(0)
    cases = [
        IdentityMapping("a.weight", ("x",), 0), IdentityMapping("b.weight", ("x",), 1),
        IdentityMapping("n.weight", ("x",)), VocabMapping("emb.weight", ("x",), 37),
        QKVMapping("qkv.weight", ("q", "k", "v"), 8, 4, 3),
        QKVMapping("vqkv.bias", ("x",), 4, 4, 2),
        PartsMapping("in_proj.weight", ("x",), (("z", 8), ("x", 8), ("B", 4), ("C", 4), ("dt", 4))),
        PartsMapping("conv1d.weight", ("x",), (("x", 8), ("B", 4), ("C", 4))),
    ]
    for m in cases:
        comps = {}
        # rows of each component: its part's rows for fused kinds, the vocabulary, or 8
        rows_of = dict(zip(m.components, (n for _, n in m.part_rows()),
                           strict=True)) if isinstance(m, FusedRowsMapping) else {}
        for c in m.components:
            rows = rows_of.get(c, m.vocab_size if isinstance(m, VocabMapping) else 8)
            shape = (rows, 1,
                     3) if m.megatron == "conv1d.weight" else (rows,) if m.megatron == "vqkv.bias" else (rows, 12)
            comps[c] = torch.randn(shape, generator=g)
        table = {m.megatron: m}
        for r in range(tp):
            local = m.components_to_local(comps, tp, r)
            parts = {}
            for key, part, dim, _size in m.local_components(local, tp, r):
                full = comps[key]
                want = full if dim is None else full.tensor_split(
                    [min(full.shape[dim], i * -(-full.shape[dim] // tp)) for i in range(1, tp)], dim=dim)[r]
                assert torch.equal(part, want), (m.megatron, key, r)
                parts[key] = part
            target = torch.full_like(local, float("nan"))
            assert assemble_from_entries(table, m.megatron, parts, target, tp_rank=r, tp_size=tp)
            assert torch.equal(target, local), (m.megatron, r)


def test_export_of_a_checkpoint_saved_by_a_tp2_model(tiny_toy, tp2_run, tmp_path):
    """A trainer-style checkpoint (iteration 3, DTensor parts from two ranks, fp32 weights, no carried
    tensors) exports back to the source bytes: carried RADIO buffers come from --hf-model."""
    _, saved = tp2_run
    r = nvl("convert", "export", "--hf-model", str(tiny_toy), "--megatron-path", str(saved),
            "--hf-path", str(tmp_path / "hf"), "--dtype", "bfloat16", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "from source HF dir: 2" in r.output
    src, got = hf_tensors(tiny_toy), hf_tensors(tmp_path / "hf")
    assert set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and raw(got[k]) == raw(v), k
    # without --dtype the checkpoint's fp32 is kept and config.json says so
    r = nvl("convert", "export", "--hf-model", str(tiny_toy), "--megatron-path", str(saved),
            "--hf-path", str(tmp_path / "hf32"), "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "hf32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert hf_tensors(tmp_path / "hf32")["mlp1.1.weight"].dtype == torch.float32
