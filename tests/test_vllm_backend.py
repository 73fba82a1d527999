"""nvlcore.serve.vllm_backend: the `vllm serve` argv for a base and for an adapter exported for vLLM, and the
one-line refusal without vLLM (vLLM is not installed here; a stand-in `vllm` script checks the launch)."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from nvlcore.serve import vllm_backend as vb

SETTINGS = {"trust_remote_code": True, "max_model_len": 64, "limit_mm_per_prompt": {"image": 2, "video": 1},
            "video_pruning_rate": 0.5, "enforce_eager": False, "seed": None}
SETTING_ARGS = ["--trust-remote-code", "--max-model-len", "64", "--limit-mm-per-prompt", '{"image": 2, "video": 1}',
                "--video-pruning-rate", "0.5"]


def adapter(tmp_path: Path, base: Path, **manifest: object) -> Path:
    d = tmp_path / "my_adapter"
    d.mkdir()
    data = {"base_model": str(base), "adapter_args": ["--enable-adapters", "--max-adapter-rank", "8"],
            "module_option": "--adapter-modules", **manifest}
    (d / vb.ADAPTER_MANIFEST).write_text(json.dumps(data))
    return d


def test_base_argv(tmp_path: Path) -> None:
    argv = vb.vllm_command(tmp_path / "m", settings=SETTINGS, port=9000, served_model_name="mine",
                           extra_args=("--max-model-len", "32"))
    assert argv == ["vllm", "serve", str(tmp_path / "m"), "--host", "127.0.0.1", "--port", "9000", *SETTING_ARGS,
                    "--served-model-name", "mine", "--max-model-len", "32"]


def test_adapter_argv_takes_the_exporters_arguments(tmp_path: Path) -> None:
    base = tmp_path / "base"
    d = adapter(tmp_path, base)
    argv = vb.vllm_command(base, adapter_dir=d, settings=SETTINGS, host="0.0.0.0")
    assert argv == ["vllm", "serve", str(base), "--host", "0.0.0.0", "--port", "8000", *SETTING_ARGS,
                    "--enable-adapters", "--max-adapter-rank", "8", "--adapter-modules", f"my_adapter={d}"]
    assert vb.vllm_command(None, adapter_dir=d, settings=SETTINGS, host="0.0.0.0") == argv  # the manifest's base
    named = vb.vllm_command(base, adapter_dir=d, settings={}, served_model_name="tuned")
    assert named[-2:] == ["--adapter-modules", f"tuned={d}"] and "--served-model-name" not in named


def test_adapter_refusals_name_the_file(tmp_path: Path) -> None:
    d = adapter(tmp_path, tmp_path / "base")
    with pytest.raises(vb.VllmBackendError, match="applies to base .*base, not .*other"):
        vb.vllm_command(tmp_path / "other", adapter_dir=d, settings={})
    with pytest.raises(vb.VllmBackendError, match="no model to serve"):
        vb.vllm_command(None, settings={})
    with pytest.raises(vb.VllmBackendError, match="vllm_serve.json is missing: export the adapter"):
        vb.vllm_command(tmp_path / "base", adapter_dir=tmp_path, settings={})
    (d / vb.ADAPTER_MANIFEST).write_text(json.dumps({"base_model": str(tmp_path / "base"), "adapter_args": "x"}))
    with pytest.raises(vb.VllmBackendError, match="adapter_args, module_option"):
        vb.vllm_command(tmp_path / "base", adapter_dir=d, settings={})


def test_without_vllm_run_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert importlib.util.find_spec("vllm") is None, "this test expects vLLM not to be installed"
    assert vb.vllm_available() is False
    assert vb.run_vllm(tmp_path, settings={}) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install vllm" in err


def test_with_vllm_run_launches_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in `vllm` on PATH records its arguments; run_vllm runs it as a child and returns its status."""
    bin_dir, seen = tmp_path / "bin", tmp_path / "argv.json"
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))"
                      "\nsys.exit(3)\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(vb, "vllm_available", lambda: True)
    assert vb.run_vllm(tmp_path / "m", replace_process=False, settings=SETTINGS, port=1234) == 3
    assert json.loads(seen.read_text()) == vb.vllm_command(tmp_path / "m", settings=SETTINGS, port=1234)[1:]


def test_a_bridge_says_nothing_about_vllm_by_default() -> None:
    from types import SimpleNamespace

    from nvlcore.bridge import BridgeError, ModelBridge

    bridge = SimpleNamespace(name="plain")
    assert ModelBridge.vllm_serve_settings(bridge) == {}  # type: ignore[arg-type]
    with pytest.raises(BridgeError, match="bridge 'plain' does not say which modules vLLM serves adapters on"):
        ModelBridge.vllm_adapter_module(bridge, "layer.fc")  # type: ignore[arg-type]
