"""DoRA (peft.method=dora, Megatron-Bridge's peft_scheme="dora"): the layer against the `peft` library,
TP=2 against TP=1 (gloo), HF-PEFT export applied by `peft` to transformers' NemotronHForCausalLM, the
merged export, merge round trips, and a fine-tune whose loss falls on the tiny toy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nvl_lora.dora import DORA, DoRAConfig, DoRAMethod
from nvl_lora.method import apply_lora, merge_lora

peft = pytest.importorskip("peft")


def test_registered_with_the_original_alias() -> None:
    from nvlcore.plugins import get_plugin_manager

    reg = get_plugin_manager().registry("peft_method")
    assert reg.get("dora") is DoRAMethod and reg.get("DoRA") is DoRAMethod
    assert DoRAConfig.from_dict({"dim": 16, "alpha": 32, "method": "dora"}).to_dict()["method"] == "dora"
    with pytest.raises(ValueError, match="dropout"):
        DoRAConfig(dropout=0.1)


def _pair(bias: bool = True, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Our DoRA and peft's on two copies of one nn.Linear, adapters set equal and non-trivial."""
    torch.manual_seed(seed)
    ours = nn.Module()
    ours.linear_fc1 = nn.Linear(10, 7, bias=bias)
    theirs = nn.Module()
    theirs.linear_fc1 = nn.Linear(10, 7, bias=bias)
    theirs.linear_fc1.load_state_dict(ours.linear_fc1.state_dict())
    apply_lora(ours, DoRAConfig(target_modules=["linear_fc1"], dim=3, alpha=6), variant=DORA)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["linear_fc1"],
                                                         use_dora=True))
    ad = ours.linear_fc1.adapter
    their = theirs.base_model.model.linear_fc1
    # a fresh DoRA adapter's magnitude is the base's row norms in both
    torch.testing.assert_close(ad.magnitude.weight[:, 0], their.lora_magnitude_vector["default"].weight)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mine, other in ((ad.linear_in.weight, their.lora_A["default"].weight),
                            (ad.linear_out.weight, their.lora_B["default"].weight)):
            mine.copy_(0.3 * torch.randn(mine.shape, generator=g))
            other.copy_(mine)
        ad.magnitude.weight.mul_(1 + 0.2 * torch.randn(ad.magnitude.weight.shape, generator=g))
        their.lora_magnitude_vector["default"].weight.copy_(ad.magnitude.weight[:, 0])
    return ours, theirs


@pytest.mark.parametrize("bias", [True, False])
def test_layer_output_and_gradients_equal_peft(bias: bool) -> None:
    ours, theirs = _pair(bias)
    x = torch.randn(4, 5, 10, generator=torch.Generator().manual_seed(2))
    y1, y2 = ours.linear_fc1(x), theirs.base_model.model.linear_fc1(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    (y1.square().sum()).backward()
    (y2.square().sum()).backward()
    ad, their = ours.linear_fc1.adapter, theirs.base_model.model.linear_fc1
    for mine, other in ((ad.linear_in.weight, their.lora_A["default"].weight),
                        (ad.linear_out.weight, their.lora_B["default"].weight)):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ad.magnitude.weight.grad[:, 0], their.lora_magnitude_vector["default"].weight.grad,
                               rtol=1e-4, atol=1e-5)
    # merge: same output from the folded weight
    with torch.no_grad():
        before = ours.linear_fc1(x)
        merge_lora(ours)
        torch.testing.assert_close(ours.linear_fc1(x), before, rtol=1e-5, atol=1e-5)


def test_eval_mode_caches_the_norm_until_a_weight_changes() -> None:
    ours, _ = _pair()
    lin = ours.linear_fc1
    lin.eval()
    x = torch.randn(2, 10)
    with torch.no_grad():
        y = lin(x)
        assert lin.adapter.__dict__["_norm_cache"] is not None
        lin.adapter.linear_out.weight.mul_(2.0)  # in place: the cache must notice
        y2 = lin(x)
    assert (y2 - y).abs().max() > 1e-4
    lin.adapter.__dict__["_norm_cache"] = None  # recomputed from scratch: the same
    with torch.no_grad():
        torch.testing.assert_close(lin(x), y2, rtol=0, atol=0)


@pytest.mark.distributed
def test_tensor_parallel_two_ranks_match_one() -> None:
    """Column-parallel (norm-fused fc1, Mamba in_proj components) and row-parallel (fc2, out_proj: the row
    norms need the all-reduce of squared norms) DoRA at TP=2 equal TP=1: outputs, every gradient
    (magnitudes included), the logical state, and the merged model."""
    from lora_testing import ALL_TOY_TARGETS, run_distributed, tp_parity_worker

    results = run_distributed(tp_parity_worker, 2, ALL_TOY_TARGETS, True)
    for r in results:
        one, two = r["tp1"], r["tp2"]
        assert one["keys"] == two["keys"]
        assert "language_model.mixer.in_proj.adapter.magnitude.weight.z" in one["keys"]
        assert "language_model.mlp.linear_fc2.adapter.magnitude.weight" in one["keys"]
        # the initial magnitudes (row norms of the base) agree: the row-parallel ones need the all-reduce
        for k, v in r["initial_tp1"].items():
            torch.testing.assert_close(r["initial_tp2"][k], v, rtol=1e-6, atol=1e-6, msg=k)
        torch.testing.assert_close(two["y"], one["y"], rtol=1e-5, atol=1e-5)
        for k in one["grads"]:
            assert one["grads"][k].abs().max() > 0, k
            torch.testing.assert_close(two["grads"][k], one["grads"][k], rtol=1e-4, atol=1e-6, msg=k)
        for label in ("tp1", "tp2"):
            for k, v in r[label]["state"].items():
                torch.testing.assert_close(r[label]["roundtrip"][k], v, rtol=0, atol=0)
            torch.testing.assert_close(r[label]["merged_y"], r[label]["y"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ Nemotron VL toy
ALL_LM_AND_MAMBA = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nvl_nemotron_vl.model")
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=5))


def _build(toy: Path):
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(toy)
    return bridge, bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True).eval()


def _randomise(model: nn.Module, seed: int = 0) -> None:
    from nvl_lora.state import gather_adapter_state, load_adapter_state

    state = gather_adapter_state(model)
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if ".magnitude." in k:
            state[k] = v * (1 + 0.2 * torch.randn(v.shape, generator=g))
        else:
            state[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    load_adapter_state(model, state)


def _tokens(cfg, n: int = 2, length: int = 12) -> torch.Tensor:
    ids = torch.randint(0, cfg.llm.vocab_size, (n, length), generator=torch.Generator().manual_seed(1))
    specials = [t for t in (cfg.img_context_token_id, cfg.video_context_token_id) if t is not None]
    ids[torch.isin(ids, torch.tensor(specials))] = 1
    return ids


def _save_run(root: Path, model: nn.Module, cfg: DoRAConfig, base: Path) -> Path:
    from nvlcore.checkpoint import save_checkpoint

    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return save_checkpoint(root, 4, model_state=state, run_config={
        "peft": cfg.to_dict(), "checkpoint": {"pretrained_checkpoint": str(base)}})


def test_hf_peft_export_matches_peft_on_transformers_and_the_merged_export(toy: Path, tmp_path: Path) -> None:
    """nvl's model with DoRA adapters vs transformers' NemotronHForCausalLM with the exported adapter
    (use_dora: true) applied by peft: same LM logits within 1e-4 (fp32); and the same as the merged HF
    export (`nvl peft merge --format hf`) loaded into transformers."""
    from nemotron_vl_testing import hf_lm_from_toy
    from safetensors.torch import load_file

    from nvl_lora.hf_peft import HFPeftExporter

    bridge, model = _build(toy)
    # peft refuses adapters on Mamba's out_proj; the LM's attention (q/k/v split from the fused qkv, so
    # the magnitude rows are split too), MLP and Mamba in_proj get DoRA
    cfg = DoRAConfig(target_modules=[t for t in ALL_LM_AND_MAMBA if t != "out_proj"], dim=4, alpha=8)
    apply_lora(model, cfg, variant=DORA)
    _randomise(model)
    ids = _tokens(bridge.config)
    with torch.no_grad():
        ours = model.forward_inference(ids)
    ck = _save_run(tmp_path / "dora", model, cfg, toy)

    out = HFPeftExporter().export(checkpoint=ck, hf_model_path=toy, output=tmp_path / "adapter", for_causal_lm=True)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["use_dora"] is True and conf["peft_type"] == "LORA" and conf["r"] == 4
    tensors = load_file(str(out / "adapter_model.safetensors"))
    mags = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert mags and all(tensors[k].ndim == 1 for k in mags)
    assert "base_model.model.model.layers.2.mixer.q_proj.lora_magnitude_vector" in tensors

    hf = hf_lm_from_toy(toy)
    with torch.no_grad():
        base_logits = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (theirs - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, rtol=0, atol=1e-4)

    # merged onto an fp32 import of the toy (the merge casts back to the base's dtype; the toy is bf16)
    from lora_testing import merge_run_to_hf

    merged, merge_out = merge_run_to_hf(toy, ck, tmp_path)
    assert "DoRA" in merge_out
    with torch.no_grad():
        from_merged = hf_lm_from_toy(merged)(ids).logits
    torch.testing.assert_close(from_merged, theirs, rtol=0, atol=1e-4)


def test_merge_round_trip(toy: Path, tmp_path: Path) -> None:
    """`nvl peft merge` (Megatron format) of a DoRA run on every kind of layer (incl. Mamba in_proj /
    out_proj and the ViT, whose fused qkv has a bias): the merged weights reproduce the adapted model's
    logits with an image within 1e-5; so does merging in place."""
    from nvlcore.checkpoint import open_checkpoint, save_checkpoint

    bridge, model = _build(toy)
    base_root = tmp_path / "base"
    save_checkpoint(base_root, 0, model_state={n: p.detach().clone() for n, p in model.named_parameters()})
    cfg = DoRAConfig(target_modules=ALL_LM_AND_MAMBA, dim=4, alpha=8)
    apply_lora(model, cfg, variant=DORA)
    _randomise(model)
    c = bridge.config
    ids = _tokens(c)
    ids[0, 1 : 1 + c.num_image_token] = c.img_context_token_id
    pix = torch.randn(1, 3, c.force_image_size, c.force_image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model.forward_inference(ids, pix)
    ck = _save_run(tmp_path / "dora", model, cfg, base_root / "iter_0000000")
    proc = subprocess.run([sys.executable, "-m", "nvlcore", "peft", "merge", "--hf-model-path", str(toy),
                           "--lora-checkpoint", str(ck), "--output", str(tmp_path / "merged")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _, fresh = _build(toy)
    fresh.load_state_dict(open_checkpoint(tmp_path / "merged").load(), strict=True)
    with torch.no_grad():
        merged = fresh.forward_inference(ids, pix)
        merge_lora(model)
        in_place = model.forward_inference(ids, pix)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_place, adapted, rtol=0, atol=1e-5)
    assert not any(".adapter." in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_dora_finetune_lowers_the_loss(toy: Path, tmp_path: Path) -> None:
    """`nvl finetune --lora-on-language-model peft.method=dora` on the tiny toy: the loss falls, the
    checkpoint holds DoRA magnitudes, and `nvl export --format hf-peft` writes use_dora: true."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu"}
    out = tmp_path / "run"
    args = ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy), "--lora-on-language-model",
            "peft.method=dora", "dataset.maker_name=synthetic_shapes", "dataset.num_workers=0",
            "dataset.seq_length=384",
            "model.seq_length=384", "model.tensor_model_parallel_size=1", "train.global_batch_size=2",
            "train.train_iters=8", "checkpoint.save_interval=8", "logger.log_interval=1", "optimizer.lr=5e-3",
            "scheduler.lr_warmup_iters=1", "peft.dim=4", "peft.alpha=8", f"checkpoint.save={out}"]
    proc = subprocess.run([sys.executable, "-m", "nvlcore", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["iteration"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(loss) == list(range(1, 9))
    assert (loss[7] + loss[8]) / 2 < (loss[1] + loss[2]) / 2 - 0.1, loss
    from nvlcore.checkpoint import open_checkpoint

    ck = open_checkpoint(out)
    assert ck.run_config()["peft"]["method"] == "dora"
    assert any(".adapter.magnitude.weight" in k for k in ck.keys())
    adapter = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-m", "nvlcore", "export", "--format", "hf-peft", "--lora-checkpoint",
                           str(out), "--hf-model-path", str(toy), "--output", str(adapter)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
