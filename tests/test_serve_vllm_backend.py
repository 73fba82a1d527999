"""``nvl serve --backend vllm`` as a user runs it (a subprocess): without vLLM one line saying how to install
it; nvl-backend options refused; with vLLM (a stand-in package and ``vllm`` script: vLLM is not installed
here) the command it execs is ``vllm serve`` on the model with the bridge's recommended settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NVL = [sys.executable, "-m", "nvlcore"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    toy_mod = pytest.importorskip("nvl_nemotron_vl.toy")
    return Path(toy_mod.write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=3))


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NVL, "serve", "--backend", "vllm", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_without_vllm_one_line_says_how_to_install(toy: Path) -> None:
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    done = serve("--hf-model-path", toy)
    assert done.returncode == 1
    assert "pip install vllm" in done.stderr and "Traceback" not in done.stderr


def test_nvl_backend_options_are_refused(toy: Path) -> None:
    done = serve("--hf-model-path", toy, "--max-batch-size", "2", "--system-prompt", "")
    assert done.returncode == 2, done.stderr
    assert "--max-batch-size, --system-prompt: nvl's own backend only" in done.stderr


def test_with_vllm_it_execs_vllm_serve_with_the_models_settings(toy: Path, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")  # importable: vllm_available() finds it
    record = tmp_path / "argv.json"
    script = tmp_path / "bin" / "vllm"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    script.chmod(0o755)
    env = {"PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = serve("--hf-model-path", toy, "--port", "8123", "--served-model-name", "toy", "--tp", "2", env=env)
    assert done.returncode == 0, done.stderr
    argv = json.loads(record.read_text())
    assert argv[:6] == ["serve", str(toy.absolute()), "--host", "127.0.0.1", "--port", "8123"]
    assert "--trust-remote-code" in argv and argv[argv.index("--served-model-name") + 1] == "toy"
    assert argv[-2:] == ["--tensor-parallel-size", "2"]
