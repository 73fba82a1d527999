"""The model-bridge contract (nvlcore.bridge.ModelBridge): the core calls bridges only through it, and the
example bridge (docs/examples/nvl-bridge-example) conforms and runs through convert, finetune and generate."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "nvl-bridge-example"

#: ``inspect.signature`` uses that do not look at a bridge (file -> why).
SIGNATURE_ALLOWED = {"nvlcore/cli/plugins_cmd.py": "prints hook implementations' argument names"}


def _probes(tree: ast.AST) -> list[tuple[int, str]]:
    """``getattr(bridge...)``/``hasattr(bridge...)`` and ``inspect.signature(...)`` calls in a module."""
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr") and node.args:
            if "bridge" in ast.unparse(node.args[0]).lower():
                hits.append((node.lineno, ast.unparse(node)))
        if isinstance(f, ast.Attribute) and f.attr == "signature" and ast.unparse(f.value) == "inspect":
            hits.append((node.lineno, ast.unparse(node)))
    return hits


def core_bridge_probes(root: Path = ROOT / "nvlcore") -> list[str]:
    """Every place in the core that probes a bridge instead of calling the contract."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        for line, text in _probes(ast.parse(path.read_text())):
            if "signature" in text and "bridge" not in text.lower() and rel in SIGNATURE_ALLOWED:
                continue
            bad.append(f"{rel}:{line}: {text}")
    return bad


def test_the_core_never_probes_a_bridge() -> None:
    assert core_bridge_probes() == []


def test_the_probe_check_can_fail(tmp_path: Path) -> None:
    pkg = tmp_path / "nvlcore"
    pkg.mkdir()
    (pkg / "m.py").write_text("import inspect\n\ndef f(bridge, b):\n    fn = getattr(bridge, 'recipe', None)\n"
                              "    return inspect.signature(b.generator), hasattr(self_bridge, 'x')\n")
    found = [h.split(": ", 1)[1] for h in core_bridge_probes(pkg)]
    assert found == ["getattr(bridge, 'recipe', None)", "inspect.signature(b.generator)", "hasattr(self_bridge, 'x')"]


# -- the example bridge ------------------------------------------------------------------------------
@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import nvl_bridge_example

    return nvl_bridge_example


@pytest.mark.usefixtures("own_process_group", "one_thread")
def test_example_bridge_conforms(example: Any, tmp_path: Path) -> None:
    from nvlcore.testing import check_model_bridge

    hf = example.write_tiny_hf_dir(tmp_path / "hf")
    check_model_bridge(example.TinyBridge, hf, example.TinyMaker()[0])


@pytest.mark.usefixtures("own_process_group", "one_thread")
def test_conformance_check_catches_a_table_that_misses_a_parameter(example: Any, tmp_path: Path) -> None:
    from nvlcore.testing import check_model_bridge

    class Incomplete(example.TinyBridge):
        def mapping_table(self):
            return super().mapping_table()[1:]

    hf = example.write_tiny_hf_dir(tmp_path / "hf")
    with pytest.raises(AssertionError, match="only in the model.*language_model.embedding.weight"):
        check_model_bridge(Incomplete, hf, example.TinyMaker()[0])


def test_resolve_bridge_names_the_file_and_what_to_do(example: Any, tmp_path: Path) -> None:
    from nvlcore.bridge import BridgeError, resolve_bridge
    from nvlcore.testing import make_plugin_manager

    manager = make_plugin_manager(example)
    hf = example.write_tiny_hf_dir(tmp_path / "hf")
    bridge = resolve_bridge(hf, manager=manager)
    assert isinstance(bridge, example.TinyBridge) and bridge.hf_dir == hf
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architectures": ["Unknown"]}))
    with pytest.raises(BridgeError, match=r"other/config.json: no installed model bridge handles architectures "
                                          r"\['Unknown'\].*TinyVLM.*--bridge NAME"):
        resolve_bridge(tmp_path / "other", manager=manager)
    assert isinstance(resolve_bridge(tmp_path / "other", "tiny_vlm", manager=manager), example.TinyBridge)
    with pytest.raises(BridgeError, match="no such directory"):
        resolve_bridge(tmp_path / "missing", manager=manager)


def test_freeze_refuses_a_group_the_bridge_lacks(example: Any, tmp_path: Path) -> None:
    import torch

    bridge = example.TinyBridge({"hidden": 4, "ffn": 8})
    model = torch.nn.Module()
    model.language_model = torch.nn.Linear(2, 2)
    model.head = torch.nn.Linear(2, 2)
    seen = bridge.freeze(model, {"language_model": True, "vision_model": False})
    assert seen == {"language_model": True, "other": False}
    assert not model.language_model.weight.requires_grad and model.head.weight.requires_grad
    with pytest.raises(ValueError, match="peft.freeze_audio_model=True: model bridge 'tiny_vlm' has no such group"):
        bridge.freeze(model, {"audio_model": True}, key="peft")


def test_a_bridge_without_kernel_choices_accepts_only_auto_and_reference(example: Any) -> None:
    import torch

    bridge = example.TinyBridge({"hidden": 4, "ffn": 8})
    assert bridge.set_kernels(torch.nn.Module(), "auto") == {} == bridge.set_kernels(torch.nn.Module(), "reference")
    with pytest.raises(ValueError, match="model.kernels='mamba_ssm': model bridge 'tiny_vlm' has no kernel choice"):
        bridge.set_kernels(torch.nn.Module(), "mamba_ssm")


# -- pip-installed, through the command line -------------------------------------------------------------
def nvl(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "nvlcore.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, f"nvl {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.usefixtures("one_thread")
def test_installed_example_converts_finetunes_and_generates(tmp_path: Path) -> None:
    src, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, src)  # build in a copy: no build/ or egg-info left in the repository
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "NVL_STRICT_PLUGINS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("NVL_LOAD_PLUGINS", None)
    listed = {p["name"]: p for p in json.loads(nvl(env, "plugins", "list", "--json").stdout)}
    assert listed["nvl_bridge_example"]["registered"] == {"dataset_maker": ["tiny_copy"], "model_bridge": ["tiny_vlm"]}

    hf = tmp_path / "hf"
    subprocess.run([sys.executable, "-c", f"import nvl_bridge_example as e; e.write_tiny_hf_dir({str(hf)!r})"],
                   env=env, check=True, timeout=120)
    # convert: HF -> checkpoint -> HF reproduces every tensor
    nvl(env, "convert", "import", "--hf-model", str(hf), "--megatron-path", str(tmp_path / "mg"))
    nvl(env, "convert", "export", "--hf-model", str(hf), "--megatron-path", str(tmp_path / "mg"),
        "--hf-path", str(tmp_path / "back"))
    from nvlcore.convert.safetensors_io import SafetensorsReader

    ra, rb = SafetensorsReader(hf), SafetensorsReader(tmp_path / "back")
    a, b = ra.read(ra.keys()), rb.read(rb.keys())
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # finetune from the imported checkpoint; the loss falls
    save = tmp_path / "run"
    nvl(env, "finetune", "--hf-model-path", str(hf), "--pretrained-checkpoint", str(tmp_path / "mg"),
        "model.tensor_model_parallel_size=1", "dataset.maker_name=tiny_copy", "dataset.num_workers=0",
        "dataset.seq_length=64", "train.train_iters=12", "train.global_batch_size=4", "optimizer.lr=3e-3",
        "optimizer.min_lr=3e-4", "logger.log_interval=1", "checkpoint.save_interval=12", "validation.eval_iters=0",
        f"checkpoint.save={save}", f"logger.jsonl_path={tmp_path / 'metrics.jsonl'}", timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0], losses
    # generate with the trained weights, and the HF ones differ
    trained = nvl(env, "generate", "--hf-model-path", str(hf), "--megatron-model-path", str(save), "--prompt",
                  "copyabc", "--max-new-tokens", "6", "--json").stdout
    base = nvl(env, "generate", "--hf-model-path", str(hf), "--prompt", "copyabc", "--max-new-tokens", "6",
               "--json").stdout
    out_t, out_b = json.loads(trained.strip().splitlines()[-1]), json.loads(base.strip().splitlines()[-1])
    assert out_t["token_ids"] and out_b["token_ids"]
    assert set(out_t["text"]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN")


@pytest.mark.usefixtures("own_process_group", "one_thread")
def test_lora_takes_groups_and_layouts_from_the_bridge(example: Any, tmp_path: Path) -> None:
    """A bridge whose model has only a language tower: LoRA's default freeze flags for the other towers
    freeze nothing more, freeze_other covers the rest, and adapters go on the table's linears."""
    import torch

    pytest.importorskip("nvl_lora")
    from nvl_lora.method import LoRAMethod
    from nvlcore.testing import check_model_bridge

    class LanguageOnlyGroups(example.TinyBridge):
        freeze_groups = {"language_model": "language_model"}

    hf = example.write_tiny_hf_dir(tmp_path / "hf")
    check_model_bridge(LanguageOnlyGroups, hf, example.TinyMaker()[0])
    bridge = LanguageOnlyGroups.from_hf_dir(hf)
    model = bridge.build_model(dtype=torch.float32, init="random")
    method = LoRAMethod(target_modules=["linear_fc1", "linear_fc2"], dim=2, alpha=4)
    method.apply(model, bridge=bridge)
    assert method.report.frozen_groups == {"language_model": True, "other": True}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".adapter." in n for n in trainable)
    assert method.report.adapted == ["language_model.linear_fc1", "language_model.linear_fc2"]
