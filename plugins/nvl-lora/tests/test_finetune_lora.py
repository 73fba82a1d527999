"""End to end, as a user runs it: `nvl finetune --lora-on-*` on the tiny toy, adapter-only checkpoints,
resume, `nvl peft merge --format hf` loaded back into our model and into transformers, `nvl export`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")

NVL = [sys.executable, "-m", "nvlcore"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu"}


def nvl(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run([*NVL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


TRAIN = ["dataset.maker_name=synthetic_shapes", "dataset.num_workers=0", "dataset.seq_length=384",
         "model.seq_length=384", "model.tensor_model_parallel_size=1", "train.global_batch_size=2",
         "train.train_iters=8", "checkpoint.save_interval=4", "logger.log_interval=1", "optimizer.lr=5e-3",
         "scheduler.lr_warmup_iters=1", "peft.dim=4", "peft.alpha=8"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=7))


@pytest.fixture(scope="module")
def base32(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy imported in fp32, so that merging (which casts back to the base's dtype) is exact to fp32."""
    out = tmp_path_factory.mktemp("base32") / "ckpt"
    nvl("convert", "import", "--hf-model", toy, "--megatron-path", out, "--dtype", "float32", "--no-progress")
    return out


@pytest.fixture(scope="module")
def lm_run(toy: Path, base32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("lora_lm") / "ckpt"
    proc = nvl("finetune", "--hf-model-path", toy, "--pretrained-checkpoint", base32, "--lora-on-language-model",
               *TRAIN, f"checkpoint.save={out}")
    return out, proc.stdout


@pytest.mark.slow
def test_lora_finetune_lowers_the_loss_and_saves_only_trainable_state(lm_run, base32: Path) -> None:
    from nvlcore.checkpoint import open_checkpoint

    out, stdout = lm_run
    assert "lora: trainable parameters:" in stdout  # the resolved count, printed at start
    # which towers train fully, carry adapters, are frozen
    assert ("towers: trained fully: vision_model, vision_projection; with adapters: language_model; frozen: -"
            in stdout), stdout
    rows = losses(out)
    assert sorted(rows) == list(range(1, 9))
    assert (rows[7] + rows[8]) / 2 < (rows[1] + rows[2]) / 2 - 0.1, rows
    ck = open_checkpoint(out)
    keys = ck.keys()
    adapters = [k for k in keys if ".adapter." in k]
    assert adapters and all("language_model." in k for k in adapters)
    # --lora-on-language-model trains the ViT and projector fully (Megatron-Bridge's VLMLoRA setting)...
    assert any(k.startswith("vision_model.") and ".adapter." not in k for k in keys)
    assert any(k.startswith("vision_projection.") for k in keys)
    # ...but no base weight of the language model
    assert not any(k.startswith("language_model.") and ".adapter." not in k for k in keys)
    assert set(ck.keys("optimizer")) == {f"{k}.{m}" for k in keys for m in ("exp_avg", "exp_avg_sq")}
    rc = ck.run_config()
    assert rc["checkpoint"]["pretrained_checkpoint"] == str(base32)
    assert rc["peft"]["target_modules"][0] == "*language_model*.linear_qkv" and rc["peft"]["dim"] == 4


@pytest.mark.slow
def test_adapter_only_checkpoint_is_a_small_fraction_of_a_full_one(toy: Path, tmp_path: Path) -> None:
    from nvlcore.checkpoint import open_checkpoint

    out = tmp_path / "both"
    nvl("finetune", "--hf-model-path", toy, "--pretrained-checkpoint", toy, "--lora-on-language-model",
        "--lora-on-vision-model", *TRAIN, "train.train_iters=2", "checkpoint.save_interval=2", "peft.dim=1",
        f"checkpoint.save={out}")
    full = tmp_path / "full"
    nvl("convert", "import", "--hf-model", toy, "--megatron-path", full, "--no-progress")
    lora_ck, full_ck = open_checkpoint(out), open_checkpoint(full)
    adapter_weights = sum(s.nbytes for s in lora_ck.specs().values())
    adapter_optim = sum(s.nbytes for s in lora_ck.specs("optimizer").values())
    full_weights = sum(s.nbytes for s in full_ck.specs().values())
    assert all(".adapter." in k for k in lora_ck.keys())
    # rank 1 on a toy whose hidden size is 64 is ~2% of each adapted layer; at the 12B shape rank 16
    # is 0.3% of the model (docs/lora.md). Files on disk also carry per-tensor overhead.
    assert adapter_weights < 0.05 * full_weights, (adapter_weights, full_weights)
    assert adapter_weights + adapter_optim < 0.15 * full_weights
    print(f"adapter checkpoint: {adapter_weights} B weights + {adapter_optim} B optimizer "
          f"({dir_bytes(out / 'iter_0000002')} B on disk); full: {full_weights} B weights "
          f"({dir_bytes(full / 'iter_0000000')} B on disk)")


@pytest.mark.slow
def test_lora_resume_reproduces_the_uninterrupted_losses(lm_run, toy: Path, base32: Path, tmp_path: Path) -> None:
    out, _ = lm_run
    resumed = tmp_path / "resumed"
    nvl("finetune", "--hf-model-path", toy, "--pretrained-checkpoint", base32, "--lora-on-language-model", *TRAIN,
        f"checkpoint.save={resumed}", f"checkpoint.load={out / 'iter_0000004'}")
    a, b = losses(out), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for i in b:
        assert b[i] == pytest.approx(a[i], rel=1e-6, abs=1e-6), (i, a[i], b[i])


@pytest.mark.slow
def test_merge_to_hf_loads_back_and_matches_the_adapted_model(lm_run, toy: Path, tmp_path: Path) -> None:
    """Merged HF export: loads into our model and (LM part) into transformers' NemotronHForCausalLM; both
    give the adapted model's logits (ours within 1e-5, transformers within 1e-4, fp32)."""
    from nemotron_vl_testing import hf_lm_from_toy

    from nvl_lora.config import LoRAConfig
    from nvl_lora.method import apply_lora
    from nvl_lora.state import load_adapter_state
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.mapping import mapping_table
    from nvlcore.checkpoint import open_checkpoint

    out, _ = lm_run
    merged = tmp_path / "merged_hf"
    proc = nvl("peft", "merge", "--hf-model-path", toy, "--lora-checkpoint", out, "--output", merged, "--format", "hf")
    assert "merged" in proc.stdout

    bridge = NemotronVLBridge.from_hf_dir(toy)
    ck = open_checkpoint(out)
    adapted = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True).eval()
    apply_lora(adapted, LoRAConfig.from_dict(ck.run_config()["peft"]), bridge=bridge)
    saved = ck.load()
    load_adapter_state(adapted, saved)
    params = dict(adapted.named_parameters())
    with torch.no_grad():  # the fully trained ViT / projector tensors of the run (stored as components)
        for m in mapping_table(bridge.config):
            if all(c in saved for c in m.components):
                params[m.megatron].copy_(m.components_to_local({c: saved[c] for c in m.components}, 1, 0))
                for c in m.components:
                    saved.pop(c)
    assert all(".adapter." in k for k in saved), sorted(saved)[:4]
    cfg = bridge.config
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[0, 2 : 2 + cfg.num_image_token] = cfg.img_context_token_id
    pix = torch.randn(1, 3, cfg.force_image_size, cfg.force_image_size, generator=torch.Generator().manual_seed(4))

    fresh = NemotronVLBridge.from_hf_dir(merged).build_model(dtype=torch.float32, device="cpu", load_weights=True)
    with torch.no_grad():
        want = adapted.forward_inference(ids, pix)
        got = fresh.eval().forward_inference(ids, pix)
        want_text = adapted.forward_inference(ids[1:])
        theirs = hf_lm_from_toy(merged)(ids[1:]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(want_text[..., : theirs.shape[-1]], theirs, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_nvl_export_hf_peft_from_a_trainer_checkpoint(lm_run, toy: Path, tmp_path: Path) -> None:
    out, _ = lm_run
    proc = subprocess.run([*NVL, "export", "--format", "hf-peft", "--lora-checkpoint", str(out), "--hf-model-path",
                           str(toy), "--output", str(tmp_path / "adapter"), "-O", "for_causal_lm=true"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the ViT and projector, trained fully, are outside the causal LM the adapter is for: left out, with a note
    assert "leaves out" in proc.stderr and "trained fully" in proc.stderr
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["modules_to_save"] is None
    assert conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert all(t.startswith("model.layers.") for t in conf["target_modules"])


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_at_tp2_matches_tp1(lm_run, toy: Path, base32: Path, tmp_path: Path) -> None:
    """Two gloo processes, tensor parallel 2: the same LoRA run's losses within tolerance, and its adapter
    checkpoint holds the same logical tensors (shapes) as the TP=1 one."""
    from nvlcore.checkpoint import open_checkpoint

    out, _ = lm_run
    tp2 = tmp_path / "tp2"
    train = [a for a in TRAIN if not a.startswith("model.tensor_model_parallel_size")]
    nvl("finetune", "--nproc-per-node", "2", "--hf-model-path", toy, "--pretrained-checkpoint", base32,
        "--lora-on-language-model", *train, "model.tensor_model_parallel_size=2", f"checkpoint.save={tp2}",
        timeout=600)
    a, b = losses(out), losses(tp2)
    assert sorted(b) == sorted(a)
    for i in a:
        assert b[i] == pytest.approx(a[i], rel=2e-4, abs=2e-4), (i, a[i], b[i])
    s1, s2 = open_checkpoint(out).specs(), open_checkpoint(tp2).specs()
    assert {k: v.shape for k, v in s1.items()} == {k: v.shape for k, v in s2.items()}


@pytest.mark.parametrize(
    "flags,overrides,expect",
    [
        (["--lora-on-language-model"], [], (True, False, False, "*language_model*.linear_qkv")),
        (["--lora-on-vision-model"], [], (False, True, True, "*vision_model*.linear_qkv")),
        (["--lora-on-language-model", "--lora-on-vision-model"], [], (True, True, True, "linear_qkv")),
        # the PEFT recipe decides (Megatron-Bridge): model.freeze_*=False never unfreezes what it froze...
        (["--lora-on-language-model", "--lora-on-vision-model"], ["model.freeze_vision_model=False"],
         (True, True, True, "linear_qkv")),
        # ...only an explicit peft.freeze_* does
        (["--lora-on-language-model", "--lora-on-vision-model"], ["peft.freeze_vision_model=False"],
         (True, False, True, "linear_qkv")),
        # model.freeze_*=True stays in the model section (the trainer freezes that tower in addition)
        (["--lora-on-language-model"], ["model.freeze_vision_projection=True", "peft.target_modules=[linear_proj]"],
         (True, False, False, "linear_proj")),
    ],
)
def test_flags_resolve_to_the_workflow_settings(toy: Path, flags, overrides, expect) -> None:
    import yaml

    proc = nvl("finetune", "--hf-model-path", toy, "--pretrained-checkpoint", toy, *flags, *overrides, "--print-config")
    cfg = yaml.safe_load("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#")))
    peft = cfg["peft"]
    got = (peft["freeze_language_model"], peft["freeze_vision_model"], peft["freeze_vision_projection"],
           peft["target_modules"][0])
    assert peft["method"] == "lora" and got == expect
