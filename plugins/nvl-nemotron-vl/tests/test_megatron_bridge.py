"""Megatron-Bridge checkpoints in and out, on the tiny toy.

The fixtures are written by megatron-core's own ``dist_checkpointing.save`` in Megatron-Bridge's layout and
names, each rank saving its TP shards (support/nemotron_vl_testing_mb.py says where each name comes from):
a full checkpoint at TP 1 (``common.pt``, as releases <= 0.5.1) and at TP 2 (the common state inside the
.distcp files, as later releases), and an adapter-only VLMLoRA run at TP 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

LORA = {"dim": 4, "alpha": 8, "seed": 7}
#: writing a checkpoint with megatron-core spawns processes (the fixtures: two gloo ranks, about 25 s of CPU)
slow = pytest.mark.slow


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


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def mb(tiny_toy, tmp_path_factory):
    """Megatron-Bridge checkpoints of the toy: ``tp1`` (common.pt), ``tp2`` (common state in the .distcp files),
    ``lora`` (adapter-only, TP 2, base ``tp1``)."""
    from nemotron_vl_testing_mb import write_all_worker

    from nvl_dist_testing import run_distributed

    root = tmp_path_factory.mktemp("mb")
    jobs = [("tp1", 1, {"iteration": 0, "common": "pt"}), ("tp2", 2, {"iteration": 7, "common": "distcp"}),
            ("lora", 2, {"iteration": 20, "common": "distcp", "lora": {**LORA, "pretrained": str(root / "tp1")}})]
    run_distributed(write_all_worker, 2, str(tiny_toy), str(root), jobs)
    return {k: root / k for k in ("tp1", "tp2", "lora")}


def _toy_logits(tiny_toy, path=None):
    from nemotron_vl_testing_convert import logits_of, vlm_inputs

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.parallel import init_parallel

    init_parallel(1, device_type="cpu")
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    inputs = vlm_inputs(bridge.config)
    if path is None:
        return logits_of(bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True), inputs)
    model = bridge.build_model(dtype=torch.float32, device="cpu", seed=99)
    bridge.load_checkpoint_weights(model, path)
    return logits_of(model, inputs)


@slow
def test_layout_is_megatron_bridges(mb):
    from nvlcore.checkpoint import megatron_bridge_iter_dir
    from nvlcore.checkpoint.megatron_bridge import MegatronBridgeCheckpoint

    for name, it in (("tp1", 0), ("tp2", 7), ("lora", 20)):
        d = mb[name] / f"iter_{it:07d}"
        assert megatron_bridge_iter_dir(mb[name]) == d and megatron_bridge_iter_dir(d) == d
        assert {".metadata", "metadata.json", "run_config.yaml"} <= {p.name for p in d.iterdir()}
        assert (d / "common.pt").is_file() == (name == "tp1")
        ck = MegatronBridgeCheckpoint(d)
        assert ck.common_state()["iteration"] == it  # from common.pt, or from the .distcp files
        assert ck.iteration == it
    raw = MegatronBridgeCheckpoint(mb["tp2"]).specs()
    stacked = raw["llava_model.vision_model.decoder.layers.self_attention.linear_qkv.weight"]
    assert stacked.shape[0] == 2  # the ViT's two layers on a leading axis
    assert "llava_model.language_model.decoder.layers.0.mixer.in_proj.weight.dt" in raw
    assert raw["llava_model.language_model.embedding.word_embeddings.weight"].shape[0] == 768  # 523 -> 128 x TP 2


@slow
def test_checkpoints_at_tp1_and_tp2_load_with_hf_logits(tiny_toy, mb):
    ref = _toy_logits(tiny_toy)
    for name in ("tp1", "tp2"):
        assert torch.equal(_toy_logits(tiny_toy, mb[name]), ref), name


@slow
def test_a_wrong_name_mapping_fails_the_logits_test(tiny_toy, mb, monkeypatch):
    """Negative control: the reader with two Mamba layers' out_proj names swapped gives other logits."""
    from nvlcore.checkpoint.megatron_bridge import MegatronBridgeView

    real = MegatronBridgeView._flatten

    def swapped(self):
        flat = real(self)
        a, b = (f"language_model.decoder.layers.{i}.mixer.out_proj.weight" for i in (0, 4))
        flat[a], flat[b] = flat[b], flat[a]
        return flat

    monkeypatch.setattr(MegatronBridgeView, "_flatten", swapped)
    assert not torch.equal(_toy_logits(tiny_toy, mb["tp1"]), _toy_logits(tiny_toy))


@pytest.mark.slow
def test_loads_at_tp2(tiny_toy, mb):
    from nemotron_vl_testing_mb import load_worker

    from nvl_dist_testing import run_distributed

    for rank in run_distributed(load_worker, 2, str(tiny_toy), str(mb["tp1"])):
        assert torch.equal(rank["mb"], rank["hf"])


@slow
def test_import_writes_megatron_bridges_layout_and_round_trips(tiny_toy, tmp_path):
    """HF -> Megatron-Bridge (nvl convert import --format megatron-bridge) -> nvl's components and -> HF:
    byte-identical to nvl's own import and to the source."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.checkpoint import open_checkpoint

    r = nvl("convert", "import", "--hf-model", str(tiny_toy), "--megatron-path", str(tmp_path / "mb"),
            "--format", "megatron-bridge", "--no-progress")
    assert r.exit_code == 0, r.output
    r = nvl("convert", "import", "--hf-model", str(tiny_toy), "--megatron-path", str(tmp_path / "nvl"), "--no-progress")
    assert r.exit_code == 0, r.output
    it = tmp_path / "mb" / "iter_0000000"
    assert {"metadata.json", "common.pt", "run_config.yaml", "train_state.pt"} <= {p.name for p in it.iterdir()}
    assert (it / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "mb" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    view = NemotronVLBridge.from_hf_dir(tiny_toy).open_checkpoint(tmp_path / "mb")
    nvl_ck = open_checkpoint(tmp_path / "nvl")
    model_keys = [k for k in nvl_ck.keys() if not k.startswith("hf_only.")]
    assert sorted(view.keys()) == sorted(model_keys)
    got, want = view.load(), nvl_ck.load(model_keys)
    assert all(same_bytes(got[k], want[k]) for k in model_keys)
    r = nvl("convert", "export", "--hf-model", str(tiny_toy), "--megatron-path", str(tmp_path / "mb"),
            "--hf-path", str(tmp_path / "hf"), "--no-progress")
    assert r.exit_code == 0, r.output
    src, out = hf_tensors(tiny_toy), hf_tensors(tmp_path / "hf")  # RADIO's statistics come from the HF directory
    assert set(out) == set(src) and all(same_bytes(out[k], src[k]) for k in src)


@slow
def test_import_writes_the_tensors_megatron_bridge_writes(tiny_toy, mb, tmp_path):
    """The writer's keys, shapes and bytes are the fixture's (Megatron-Bridge's names, stacked ViT, padding)."""
    from nvlcore.checkpoint.megatron_bridge import MegatronBridgeCheckpoint

    r = nvl("convert", "import", "--hf-model", str(tiny_toy), "--megatron-path", str(tmp_path / "mb"),
            "--format", "megatron-bridge", "--no-progress")
    assert r.exit_code == 0, r.output
    ours, theirs = MegatronBridgeCheckpoint(tmp_path / "mb"), MegatronBridgeCheckpoint(mb["tp1"])
    assert ours.specs() == theirs.specs()
    a, b = ours.load(), theirs.load()
    assert all(same_bytes(a[k], b[k]) for k in a)


@slow
def test_lora_run_merges_like_nvls_own(tiny_toy, mb, tmp_path):
    """The adapter-only VLMLoRA checkpoint merges to the weights of the nvl LoRA run with the same tensors."""
    from nemotron_vl_testing_mb import lora_tensors, toy_components, trained_vit

    from nvlcore.checkpoint import save_checkpoint

    r = nvl("convert", "import", "--hf-model", str(tiny_toy), "--megatron-path", str(tmp_path / "base"),
            "--no-progress")
    assert r.exit_code == 0, r.output
    _, table, comps = toy_components(str(tiny_toy))
    state = {k: t for k, (t, _) in lora_tensors(table, comps, LORA["dim"], LORA["seed"]).items() if ".adapter." in k}
    state.update(trained_vit(comps))
    save_checkpoint(tmp_path / "nvl_run", 20, model_state=state, train_state={"iteration": 20},
                    run_config={"peft": {"method": "lora", "dim": LORA["dim"], "alpha": LORA["alpha"]},
                                "checkpoint": {"pretrained_checkpoint": str(tmp_path / "base")}})
    for name, run in (("mb", mb["lora"]), ("nvl", tmp_path / "nvl_run")):
        r = nvl("peft", "merge", "--hf-model-path", str(tiny_toy), "--lora-checkpoint", str(run),
                "--output", str(tmp_path / f"merged_{name}"), "--format", "hf")
        assert r.exit_code == 0, r.output
    a, b, src = hf_tensors(tmp_path / "merged_mb"), hf_tensors(tmp_path / "merged_nvl"), hf_tensors(tiny_toy)
    assert set(a) == set(b) and all(same_bytes(a[k], b[k]) for k in a)
    changed = [k for k in a if not torch.equal(a[k], src[k])]
    assert any("q_proj" in k for k in changed) and any("vision_model" in k for k in changed)


@slow
def test_errors_are_one_line(tiny_toy, mb, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(mb["tp1"], wrong)
    rc = wrong / "iter_0000000" / "run_config.yaml"
    rc.write_text(rc.read_text().replace("NemotronVLModelProvider", "Qwen25VLModelProvider"))
    r = nvl("convert", "export", "--hf-model", str(tiny_toy), "--megatron-path", str(wrong),
            "--hf-path", str(tmp_path / "o1"), "--no-progress")
    assert r.exit_code != 0 and "Qwen25VLModelProvider" in r.output and "Traceback" not in r.output
    torn = tmp_path / "torn"
    shutil.copytree(mb["tp2"], torn)
    next((torn / "iter_0000007").glob("*.distcp")).unlink()
    r = nvl("convert", "export", "--hf-model", str(tiny_toy), "--megatron-path", str(torn),
            "--hf-path", str(tmp_path / "o2"), "--no-progress")
    assert r.exit_code != 0 and "is missing" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


@slow
def test_pretrained_checkpoint_and_megatron_model_path_take_it(tiny_toy, mb):
    """The loaders of nvl finetune --pretrained-checkpoint and nvl generate --megatron-model-path; a LoRA run
    given as full weights is refused with what to type."""
    from nemotron_vl_testing_convert import logits_of, vlm_inputs

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.inference import load_model
    from nvlcore.training.finetune import load_pretrained

    ref = _toy_logits(tiny_toy)
    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    inputs = vlm_inputs(bridge.config)
    loaded = load_model(bridge, megatron_model_path=mb["tp2"], device="cpu", dtype=torch.float32)
    assert torch.equal(logits_of(loaded.model, inputs), ref)
    model = bridge.build_model(dtype=torch.float32, device="cpu", seed=99)
    load_pretrained(model, str(mb["tp2"] / "iter_0000007"), bridge=bridge, ctx=None)
    assert torch.equal(logits_of(model, inputs), ref)
    with pytest.raises(ValueError, match="VLMLoRA run's adapter checkpoint"):
        load_model(bridge, megatron_model_path=mb["lora"], device="cpu", dtype=torch.float32)


@slow
def test_other_backends_and_methods_are_refused_in_one_line(tiny_toy, mb, tmp_path):
    zarr = tmp_path / "zarr"
    shutil.copytree(mb["tp1"], zarr)
    meta = zarr / "iter_0000000" / "metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sharded_backend": "zarr"}))
    r = nvl("convert", "export", "--hf-model", str(tiny_toy), "--megatron-path", str(zarr),
            "--hf-path", str(tmp_path / "o"), "--no-progress")
    assert r.exit_code != 0 and "checkpoint.ckpt_format=torch_dist" in r.output
    assert len(r.output.strip().splitlines()) == 1
    dora = tmp_path / "dora"
    shutil.copytree(mb["lora"], dora)
    rc = dora / "iter_0000020" / "run_config.yaml"
    rc.write_text(rc.read_text().replace("megatron.bridge.peft.lora.VLMLoRA", "megatron.bridge.peft.dora.DoRA"))
    r = nvl("peft", "merge", "--hf-model-path", str(tiny_toy), "--lora-checkpoint", str(dora),
            "--output", str(tmp_path / "m"))
    assert r.exit_code != 0 and "peft._target_ is megatron.bridge.peft.dora.DoRA" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
