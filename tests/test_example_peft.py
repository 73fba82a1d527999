"""The example PEFT package (docs/examples/nvl-peft-example, VeRA-style) installs through the `nvl` entry-point group,
conforms to nvlcore.contracts.PeftMethod, and fine-tunes the tiny toy: the loss falls, the checkpoint holds
only its vectors, and merging them reproduces the adapted model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "nvl-peft-example"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example into a temporary target dir (offline: no index, no build isolation)."""
    root = tmp_path_factory.mktemp("peft-example")
    shutil.copytree(EXAMPLE, root / "src")  # build in a copy: no build/ or egg-info left in the repository
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(root / "site"), str(root / "src")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "site"


def _env(site: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "NVL_STRICT_PLUGINS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("NVL_LOAD_PLUGINS", None)
    return env


def test_registered_conforming_and_refuses_core_fields_it_cannot_honour(site: Path) -> None:
    code = """
import json, torch
from nvlcore.plugins import get_plugin_manager
from nvlcore.contracts import PeftMethod
from nvlcore.config import load_config
vera = get_plugin_manager().registry("peft_method").get("vera")()
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
x = torch.randn(5, 4)
before = model(x)
vera.apply(model, target_modules=["0"], dim=2, d_initial=0.1, projection_prng_key=0)
names = sorted(vera.adapter_parameters(model))
unchanged = torch.equal(model(x), before)  # b starts at zero
vera.load_trainable_state_dict(model, {"0.vera.vera_d": torch.tensor([0.5, 2.0]),
                                       "0.vera.vera_b": torch.tensor([1.0, -1.0, 3.0])})
adapted = model(x)
vera.merge(model)
merged = model(x)
try:
    load_config([], ["peft.method=vera", "peft.alpha=8", "dataset.maker_name=synthetic_shapes"])
    refused = ""
except Exception as exc:
    refused = str(exc)
print(json.dumps({"conforms": isinstance(vera, PeftMethod), "names": names, "trainable": sorted(
    n for n, p in model.named_parameters() if p.requires_grad), "close": torch.allclose(adapted, merged, atol=1e-5),
    "changed": not torch.allclose(adapted, before, atol=1e-3), "unchanged": unchanged, "refused": refused,
    "state": sorted(model.state_dict())}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(site), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["conforms"] and got["names"] == ["0.vera.vera_b", "0.vera.vera_d"]
    assert got["unchanged"] and got["changed"] and got["close"]  # merging reproduces the adapted model
    assert got["trainable"] == [] and got["state"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert "peft.alpha=8" in got["refused"] and "vera" in got["refused"]


@pytest.mark.slow
def test_vera_finetunes_the_tiny_toy(site: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvl_nemotron_vl.model")
    from nvl_nemotron_vl.toy import write_toy_checkpoint
    from nvlcore.checkpoint import open_checkpoint

    toy = Path(write_toy_checkpoint(tmp_path / "tiny", "tiny", seed=5))
    out = tmp_path / "run"
    # a few vectors on a random toy need a large step and the output layer to move the loss in 8 iterations
    args = ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy), "peft.method=vera",
            "peft.d_initial=1.0", "peft.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2,output_layer]",
            "dataset.maker_name=synthetic_shapes", "dataset.num_workers=0", "dataset.seq_length=384",
            "model.seq_length=384", "model.tensor_model_parallel_size=1", "train.global_batch_size=2",
            "train.train_iters=8", "checkpoint.save_interval=8", "logger.log_interval=1", "optimizer.lr=2e-1",
            "scheduler.lr_warmup_iters=1", f"checkpoint.save={out}"]
    proc = subprocess.run([sys.executable, "-m", "nvlcore", *args], capture_output=True, text=True, env=_env(site),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "adapter parameters:" in proc.stdout and "with adapters: language_model" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["iteration"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(loss) == list(range(1, 9))
    assert (loss[7] + loss[8]) / 2 < (loss[1] + loss[2]) / 2 - 0.1, loss
    ck = open_checkpoint(out)
    assert ck.run_config()["peft"]["method"] == "vera"
    keys = list(ck.keys())  # only the vectors: the random pairs are regenerated from the seed
    assert keys and all(k.endswith((".vera.vera_d", ".vera.vera_b")) for k in keys), keys[:5]
