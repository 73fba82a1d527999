"""Adapters on the cached decoding path (issue 12 §5): `nvl generate --lora-checkpoint` (adapters
applied unmerged, on the decoder's prefill and one-token steps) gives the same tokens as generating
from the merged export, for text and image prompts, with LoRA and DoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")

from nvlcore.generation import build_conversation  # noqa: E402

NVL = [sys.executable, "-m", "nvlcore"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ALL_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj"]
NEW_TOKENS = 12


pytestmark = pytest.mark.usefixtures("own_process_group")


def _liven(hf_dir: Path) -> None:
    """Scale the toy LM's matrices so greedy decoding does not collapse to one repeated token (which
    would let adapters that are silently skipped on the decode step pass)."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    for name, t in sd.items():
        if name.startswith("language_model.") and t.ndim == 2 and "embeddings" not in name:
            sd[name] = (t.float() * 8.0).to(t.dtype)
        elif name.endswith("mixer.dt_bias"):
            sd[name] = (t.float() + 3.0).to(t.dtype)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    out = Path(write_toy_checkpoint(tmp_path_factory.mktemp("gen_lora") / "toy", "tiny", seed=11))
    _liven(out)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 150, 3), dtype=np.uint8)).save(path)
    return path


def _peft_checkpoint(toy: Path, root: Path, method: str) -> Path:
    """What `nvl finetune --lora-on-language-model` with peft.method=METHOD saves: the adapters and the
    fully trained ViT/projector (changed, so that loading them matters), in the trainer's layout."""
    from nvl_lora.method import LoRAMethod
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.checkpoint import save_checkpoint

    bridge = NemotronVLBridge.from_hf_dir(toy)
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
    cls = LoRAMethod
    if method == "dora":
        from nvl_lora.dora import DoRAMethod as cls  # type: ignore[no-redef]
    peft = cls(target_modules=ALL_TARGETS, dim=4, alpha=8, freeze_vision_model=False, freeze_vision_projection=False)
    peft.apply(model, bridge=bridge)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.05))
            elif name.startswith("vision") and p.ndim == 2:
                p.mul_(1.2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k,
             v in bridge.model_components(model).items() if any(k == n or k.startswith(n + ".") for n in trained)
             or k.split(".weight.")[0] + ".weight" in trained}
    assert any(".adapter." in k for k in state) and any(k.startswith("vision_model.") for k in state)
    rc = {"peft": {**peft.run_config(), "method": method}, "checkpoint": {"pretrained_checkpoint": str(toy)}}
    return save_checkpoint(root / "run", 3, model_state=state, run_config=rc)


@pytest.fixture(scope="module", params=["lora", "dora"])
def runs(request, toy, tmp_path_factory) -> tuple[str, Path, Path]:
    if request.param == "dora":
        pytest.importorskip("nvl_lora.dora")
    root = tmp_path_factory.mktemp(f"run_{request.param}")
    ck = _peft_checkpoint(toy, root, request.param)
    merged = root / "merged_hf"
    proc = subprocess.run([*NVL, "peft", "merge", "--hf-model-path", str(toy), "--lora-checkpoint", str(ck),
                           "--output", str(merged), "--format", "hf"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return request.param, ck, merged


def test_unmerged_adapters_generate_the_merged_tokens(runs, toy, image) -> None:
    from nvl_nemotron_vl import load_generator

    method, ck, merged = runs
    convs = [build_conversation("Tell me a short story about a cat.", system_prompt="/no_think"),
             build_conversation("Describe this image.", images=[image], system_prompt="/no_think")]
    unmerged = load_generator(toy, lora_checkpoint=ck, device="cpu").generate(convs, max_new_tokens=NEW_TOKENS)
    from_merged = load_generator(merged, device="cpu").generate(convs, max_new_tokens=NEW_TOKENS)
    base = load_generator(toy, device="cpu").generate(convs, max_new_tokens=NEW_TOKENS)
    got, want = [r.token_ids for r in unmerged], [r.token_ids for r in from_merged]
    assert got == want, (method, got, want)
    assert want != [r.token_ids for r in base]  # the adapters change the output
    assert all(len(t) >= 4 and len(set(t)) > 1 for t in want), want  # not a collapsed toy


def test_nvl_generate_cli_with_an_adapter_checkpoint(runs, toy, image) -> None:
    method, ck, merged = runs
    if method != "lora":
        pytest.skip("one CLI run is enough")
    common = ["generate", "--image_path", str(image), "--max_new_tokens", str(NEW_TOKENS), "--device", "cpu", "--json"]
    a = subprocess.run([*NVL, *common, "--hf_model_path", str(toy), "--lora-checkpoint", str(ck)],
                       capture_output=True, text=True, env=ENV)
    b = subprocess.run([*NVL, *common, "--hf_model_path", str(merged)], capture_output=True, text=True, env=ENV)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    assert "adapters of" in a.stderr

    bad = subprocess.run([*NVL, "generate", "--hf-model-path", str(toy), "--lora-checkpoint", str(toy)],
                         capture_output=True, text=True, env=ENV)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and str(toy) in bad.stderr


@pytest.mark.distributed
def test_unmerged_adapters_at_tp2_generate_the_merged_tokens(runs, toy, image) -> None:
    """Two gloo ranks: adapters split like their layers (DoRA's row-parallel norms all-reduced), the
    hooked row-parallel layers reduce their own output on the decode step; same tokens as the merged
    model at TP=1."""
    from nemotron_vl_testing_generate import tp_generate_worker

    from nvl_dist_testing import run_distributed
    from nvl_nemotron_vl import load_generator

    method, ck, merged = runs
    convs = [build_conversation("Describe this image.", images=[image], system_prompt="/no_think"),
             build_conversation("Hi!")]
    ranks = run_distributed(tp_generate_worker, 2, str(toy), convs, NEW_TOKENS, str(ck))
    want = [r.token_ids for r in load_generator(merged, device="cpu").generate(convs, max_new_tokens=NEW_TOKENS)]
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == want, method


def test_an_adapter_checkpoint_given_as_weights_says_what_to_type(runs, toy) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    method, ck, _ = runs
    if method != "lora":
        pytest.skip("one is enough")
    res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(toy), "--megatron_model_path", str(ck),
                                           "--device", "cpu"])
    assert res.exit_code == 1 and f"--adapter-checkpoint {ck}" in res.output, res.output
