"""LoRA on the Nemotron VL training model (tiny toy): HF-PEFT export checked with the `peft` library on
transformers' NemotronHForCausalLM, merge, adapter checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")
peft = pytest.importorskip("peft")

from nvl_lora.config import LoRAConfig  # noqa: E402
from nvl_lora.method import apply_lora, count_parameters, merge_lora  # noqa: E402
from nvl_lora.state import gather_adapter_state, load_adapter_state  # noqa: E402

ALL_LM_AND_MAMBA = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=5))


def build(toy: Path):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(toy)
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
    return bridge, model.eval()


def randomise_adapters(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-zero B (a fresh adapter is the identity, which would hide layout errors)."""
    state = gather_adapter_state(model)
    g = torch.Generator().manual_seed(seed)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)) for k, v in state.items()}
    load_adapter_state(model, state)
    return state


def save_lora_checkpoint(root: Path, model: torch.nn.Module, cfg: LoRAConfig, base: Path, iteration: int = 4) -> Path:
    """What the trainer writes under PEFT: every trainable parameter as a logical tensor + run_config."""
    from nvlcore.checkpoint import save_checkpoint

    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return save_checkpoint(root, iteration, model_state=state, run_config={
        "peft": cfg.to_dict(), "checkpoint": {"pretrained_checkpoint": str(base)}})


def tokens(cfg, n: int = 2, length: int = 12) -> torch.Tensor:
    """Random text tokens (no image/video context token)."""
    ids = torch.randint(0, cfg.llm.vocab_size, (n, length), generator=torch.Generator().manual_seed(1))
    specials = [t for t in (cfg.img_context_token_id, cfg.video_context_token_id) if t is not None]
    ids[torch.isin(ids, torch.tensor(specials))] = 1
    return ids


def with_image(cfg, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 gets one tile: its context tokens and pixels."""
    ids = ids.clone()
    n = cfg.num_image_token
    ids[0, 1 : 1 + n] = cfg.img_context_token_id
    pix = torch.randn(1, 3, cfg.force_image_size, cfg.force_image_size, generator=torch.Generator().manual_seed(2))
    return ids, pix


def test_adapters_on_every_kind_of_layer_of_the_model(toy: Path) -> None:
    bridge, model = build(toy)
    total = count_parameters(model).total
    report = apply_lora(model, LoRAConfig(target_modules=ALL_LM_AND_MAMBA, dim=4, alpha=8), bridge=bridge)
    kinds = {n.rsplit(".", 1)[-1] for n in report.adapted}
    assert kinds == set(ALL_LM_AND_MAMBA) and report.unmatched == []
    assert any(n.startswith("vision_model.") for n in report.adapted)
    assert "vision_projection.encoder.linear_fc1" in report.adapted
    keys = set(gather_adapter_state(model))
    mamba = next(n for n in report.adapted if n.endswith("mixer.in_proj"))
    assert {f"{mamba}.adapter.linear_out.weight.{c}" for c in ("z", "x", "B", "C", "dt")} <= keys
    c = count_parameters(model)
    assert c.total == total + c.adapter and c.trainable == c.adapter


def test_hf_peft_export_matches_the_peft_library_on_transformers(toy: Path, tmp_path: Path) -> None:
    """Our model with adapters vs transformers' NemotronHForCausalLM with the exported adapter applied by
    `peft.PeftModel.from_pretrained`: same LM logits within 1e-4 (fp32)."""
    from nemotron_vl_testing import hf_lm_from_toy

    from nvl_lora.hf_peft import HFPeftExporter

    bridge, model = build(toy)
    # peft refuses adapters on Mamba's out_proj (its fused kernels read that weight directly)
    cfg = LoRAConfig(target_modules=[t for t in ALL_LM_AND_MAMBA if t != "out_proj"], dim=4, alpha=8)
    apply_lora(model, cfg, bridge=bridge)
    randomise_adapters(model)
    ids = tokens(bridge.config)
    with torch.no_grad():
        ours = model.forward_inference(ids)
    ck = save_lora_checkpoint(tmp_path / "lora", model, cfg, toy)

    out = HFPeftExporter().export(checkpoint=ck, hf_model_path=toy, output=tmp_path / "adapter", for_causal_lm=True)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["peft_type"] == "LORA"
    assert "model.layers.2.mixer.q_proj" in conf["target_modules"]  # tiny pattern M-*-M-: layer 2 is '*'
    assert not any(t.startswith(("vision", "mlp1")) for t in conf["target_modules"])

    hf = hf_lm_from_toy(toy)
    with torch.no_grad():
        base_logits = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (theirs - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, rtol=0, atol=1e-4)


def test_hf_peft_export_full_model_names_and_qkv_split(toy: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from nvl_lora.hf_peft import HFPeftExporter

    bridge, model = build(toy)
    cfg = LoRAConfig(dim=4, alpha=8)  # both towers: LM, ViT and projector
    apply_lora(model, cfg, bridge=bridge)
    state = randomise_adapters(model)
    ck = save_lora_checkpoint(tmp_path / "lora", model, cfg, toy)
    out = HFPeftExporter().export(checkpoint=ck, hf_model_path=toy, output=tmp_path / "adapter")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    conf = json.loads((out / "adapter_config.json").read_text())
    pre = "base_model.model."
    for m in ("language_model.backbone.layers.2.mixer.q_proj", "language_model.backbone.layers.2.mixer.k_proj",
              "language_model.backbone.layers.2.mixer.v_proj", "language_model.backbone.layers.2.mixer.o_proj",
              "language_model.backbone.layers.1.mixer.up_proj", "language_model.backbone.layers.1.mixer.down_proj",
              "vision_model.radio_model.model.blocks.0.attn.qkv", "vision_model.radio_model.model.blocks.0.attn.proj",
              "vision_model.radio_model.model.blocks.1.mlp.fc1", "vision_model.radio_model.model.blocks.1.mlp.fc2",
              "mlp1.1", "mlp1.3"):
        assert m in conf["target_modules"], m
        assert f"{pre}{m}.lora_A.weight" in tensors and f"{pre}{m}.lora_B.weight" in tensors, m
    # q/k/v share a copy of A; their B rows, stacked, are the fused B's rows de-interleaved per KV group
    a = state["language_model.decoder.layers.2.self_attention.linear_qkv.adapter.linear_in.weight"]
    for p in ("q", "k", "v"):
        assert torch.equal(tensors[f"{pre}language_model.backbone.layers.2.mixer.{p}_proj.lora_A.weight"], a)
    llm = json.loads((toy / "config.json").read_text())["llm_config"]
    heads, kv, d = llm["num_attention_heads"], llm["num_key_value_heads"], llm["head_dim"]
    fused = state["language_model.decoder.layers.2.self_attention.linear_qkv.adapter.linear_out.weight"]
    grouped = fused.reshape(kv, (heads // kv + 2) * d, -1)
    q = grouped[:, : heads // kv * d].reshape(heads * d, -1)
    torch.testing.assert_close(tensors[f"{pre}language_model.backbone.layers.2.mixer.q_proj.lora_B.weight"], q)
    assert tensors[f"{pre}language_model.backbone.layers.2.mixer.k_proj.lora_B.weight"].shape == (kv * d, 4)


def _train_fully(model: torch.nn.Module, extra_prefixes: tuple[str, ...], seed: int = 3) -> None:
    """Make the parameters under ``extra_prefixes`` trainable too, and change every trainable base parameter (as
    training would), so that an export that loses one of them no longer reproduces the run."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(extra_prefixes):
                p.requires_grad_(True)
            if p.requires_grad and ".adapter." not in n:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.slow
def test_hf_peft_export_carries_fully_trained_modules_in_modules_to_save(toy: Path, tmp_path: Path) -> None:
    """The README's `--lora-on-language-model` run (LM adapters; ViT and projector trained fully), with the LM's
    Mamba layer 0 and final norm trained fully too: the exported adapter lists them in modules_to_save, peft
    applied to transformers' NemotronH reproduces our logits, and the adapter's modules_to_save tensors and
    logits equal those of the merged export (`nvl peft merge --format hf`)."""
    from nemotron_vl_testing import hf_lm_from_toy
    from safetensors.torch import load_file

    from nvl_lora.hf_peft import HFPeftExporter
    from nvl_lora.recipes import lora_settings

    bridge, model = build(toy)
    cfg, freeze = lora_settings(True, False, peft_overrides={"dim": 4, "alpha": 8})
    assert not freeze["freeze_vision_model"] and not freeze["freeze_vision_projection"]
    apply_lora(model, cfg, bridge=bridge)
    randomise_adapters(model)
    _train_fully(model, ("language_model.decoder.layers.0.", "language_model.decoder.final_norm."))
    ids = tokens(bridge.config)
    with torch.no_grad():
        ours = model.forward_inference(ids)
    ck = save_lora_checkpoint(tmp_path / "lora", model, cfg, toy)

    lm = HFPeftExporter().export(checkpoint=ck, hf_model_path=toy, output=tmp_path / "lm", for_causal_lm=True)
    conf = json.loads((lm / "adapter_config.json").read_text())
    assert sorted(conf["modules_to_save"]) == ["model.layers.0", "model.norm_f"]
    peft_model = peft.PeftModel.from_pretrained(hf_lm_from_toy(toy), str(lm)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, rtol=0, atol=1e-4)

    full = HFPeftExporter().export(checkpoint=ck, hf_model_path=toy, output=tmp_path / "full")
    conf = json.loads((full / "adapter_config.json").read_text())
    # the ViT's input conditioner (normalisation constants) is not a training parameter: the ViT module below it
    assert sorted(conf["modules_to_save"]) == ["language_model.backbone.layers.0", "language_model.backbone.norm_f",
                                               "mlp1", "vision_model.radio_model.model"]
    adapter = load_file(str(full / "adapter_model.safetensors"))
    from lora_testing import merge_run_to_hf

    merged, _ = merge_run_to_hf(toy, ck, tmp_path)
    from nvlcore.convert.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(merged)
    merged_state = reader.read(list(reader.tensors))
    carried = [k for k in merged_state if k.startswith(tuple(m + "." for m in conf["modules_to_save"]))]
    assert len(carried) > 30 and any(k.startswith("vision_model.") for k in carried)
    for k in carried:
        torch.testing.assert_close(adapter[f"base_model.model.{k}"].float(), merged_state[k].float(), rtol=0,
                                   atol=1e-6, msg=k)
    with torch.no_grad():
        from_merged = hf_lm_from_toy(merged)(ids).logits
    torch.testing.assert_close(from_merged, theirs, rtol=0, atol=1e-4)


def test_modules_to_save_groups_trained_tensors_and_refuses_what_peft_cannot_carry() -> None:
    from nvl_lora.hf_peft import modules_to_save

    keys = ["vit.a.weight", "vit.b.weight", "vit.b.bias", "lm.l0.q.weight", "lm.l0.norm.weight", "lm.l1.q.weight"]
    got = modules_to_save({"vit.a.weight", "vit.b.weight", "vit.b.bias", "lm.l0.norm.weight"}, keys, {"lm.l0.q"})
    assert got == {"vit": ["vit.a.weight", "vit.b.bias", "vit.b.weight"], "lm.l0.norm": ["lm.l0.norm.weight"]}
    # part of a module trained: that module is saved whole (its other tensors come from the base)
    assert modules_to_save({"vit.b.weight"}, keys, set()) == {"vit.b": ["vit.b.bias", "vit.b.weight"]}
    with pytest.raises(ValueError, match="also put an adapter on lm.l0.q"):
        modules_to_save({"lm.l0.q.weight"}, keys, {"lm.l0.q"})
    with pytest.raises(ValueError, match="no such tensor"):
        modules_to_save({"vit.c.weight"}, keys, set())
    with pytest.raises(ValueError, match="suffix match"):
        modules_to_save({"x.l1.w"}, ["x.l1.w", "x.l1.v", "y.x.l1.w"], set())


def test_merged_checkpoint_logits_equal_base_plus_adapter(toy: Path, tmp_path: Path) -> None:
    """`nvl peft merge` on a trainer-style base checkpoint: the merged weights reproduce the adapted
    model's logits within 1e-5 (fp32)."""
    from nvlcore.checkpoint import open_checkpoint, save_checkpoint

    bridge, model = build(toy)
    base_root = tmp_path / "base"
    save_checkpoint(base_root, 0, model_state={n: p.detach().clone() for n, p in model.named_parameters()})
    cfg = LoRAConfig(target_modules=ALL_LM_AND_MAMBA, dim=4, alpha=8, freeze_vision_model=False)
    apply_lora(model, cfg, bridge=bridge)
    randomise_adapters(model)
    with torch.no_grad():  # the ViT is trained fully in this run: change it so the merge must carry it
        model.vision_model.decoder.layers[0].mlp.linear_fc1.weight.add_(0.1)
    ids, pix = with_image(bridge.config, tokens(bridge.config))
    with torch.no_grad():
        adapted = model.forward_inference(ids, pix)
    ck = save_lora_checkpoint(tmp_path / "lora", model, cfg, base_root / "iter_0000000")

    merge = [sys.executable, "-m", "nvlcore", "peft", "merge", "--hf-model-path", str(toy), "--lora-checkpoint",
             str(ck), "--output", str(tmp_path / "merged")]
    result = subprocess.run(merge, capture_output=True, text=True)  # a fresh process, as a user runs it
    assert result.returncode == 0, result.stderr
    assert "merged" in result.stdout
    merged_state = open_checkpoint(tmp_path / "merged").load()
    _, fresh = build(toy)
    fresh.load_state_dict(merged_state, strict=True)
    with torch.no_grad():
        merged = fresh.forward_inference(ids, pix)
        merge_lora(model)
        in_place = model.forward_inference(ids, pix)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_place, adapted, rtol=0, atol=1e-5)
    # refuses to overwrite, and names the missing key of a damaged adapter checkpoint
    again = subprocess.run(merge, capture_output=True, text=True)
    assert again.returncode != 0 and "--overwrite" in again.stderr
