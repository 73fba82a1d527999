"""The example third-party plugin (docs/examples/nvl-dataset-example) installs, is listed and works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "nvl-dataset-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """pip-install the example into a temporary target dir (offline: no index, no build isolation)."""
    root = tmp_path_factory.mktemp("example-plugin")
    src = root / "src"
    shutil.copytree(EXAMPLE, src)  # build in a copy: no build/ or egg-info left in the repository
    # and a deliberately broken plugin: its module raises on import
    broken = root / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "nvl-broken-example"\nversion = "0.0.1"\n'
        '[project.entry-points.nvl]\nnvl_broken_example = "nvl_broken_example"\n'
        '[tool.setuptools]\npy-modules = ["nvl_broken_example"]\n'
    )
    (broken / "nvl_broken_example.py").write_text("import a_module_that_is_not_installed\n")
    target = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src), str(broken)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(target.glob("nvl_dataset_example-0.1.0.dist-info"))
    env = {**os.environ, "PYTHONPATH": str(target), "NVL_STRICT_PLUGINS": "1",
           "NVL_DISABLE_PLUGINS": "nvl-broken-example"}
    env.pop("NVL_LOAD_PLUGINS", None)
    return env


def test_broken_installed_plugin_is_listed_failed_and_the_cli_works(installed: dict[str, str]) -> None:
    env = {k: v for k, v in installed.items() if k not in ("NVL_STRICT_PLUGINS", "NVL_DISABLE_PLUGINS")}
    help_ = nvl(env, "--help")
    assert help_.returncode == 0 and "plugins" in help_.stdout
    assert "plugin 'nvl_broken_example' failed" in help_.stderr
    plugins = {p["name"]: p for p in json.loads(nvl(env, "plugins", "list", "--json").stdout)}
    assert plugins["nvl_broken_example"]["status"] == "failed"
    error = "ModuleNotFoundError: No module named 'a_module_that_is_not_installed'"
    assert plugins["nvl_broken_example"]["error"] == error
    assert plugins["nvl_broken_example"]["version"] == "0.0.1"
    others = [p for name, p in plugins.items() if name != "nvl_broken_example"]
    assert others and all(p["status"] == "loaded" for p in others)
    assert plugins["nvl_dataset_example"]["registered"] == {"dataset_maker": ["jsonl_qa"]}
    strict = nvl({**env, "NVL_STRICT_PLUGINS": "1"}, "--help")
    assert strict.returncode != 0 and "plugin 'nvl_broken_example' failed" in strict.stderr
    table = nvl(env, "plugins", "list").stdout
    assert any(line.startswith("nvl_broken_example") and "failed" in line for line in table.splitlines())


def nvl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvlcore.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_example_plugin_is_listed(installed: dict[str, str]) -> None:
    done = nvl(installed, "plugins", "list", "--json")
    assert done.returncode == 0, done.stderr
    plugins = {p["name"]: p for p in json.loads(done.stdout)}
    example = plugins["nvl_dataset_example"]
    assert example["distribution"] == "nvl-dataset-example" and example["version"] == "0.1.0"
    assert example["status"] == "loaded" and example["error"] is None
    assert example["hooks"] == ["nvl_register_dataset_makers"]
    assert example["registered"] == {"dataset_maker": ["jsonl_qa"]}
    # without the install it is not there: the listing comes from the installed metadata
    without = {k: v for k, v in installed.items() if k != "PYTHONPATH"}
    assert "nvl_dataset_example" not in nvl(without, "plugins", "list", "--json").stdout
    # and the allowlist can leave it out
    blocked = json.loads(nvl({**installed, "NVL_LOAD_PLUGINS": "nvl-lora"}, "plugins", "list", "--json").stdout)
    assert {p["name"]: p["status"] for p in blocked}["nvl_dataset_example"] == "blocked"


def test_example_plugin_makes_conversations(installed: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    rows = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Color?", "answer": "red", "image": "/x.png"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = (
        "import json, sys\n"
        "from nvlcore import get_registry\n"
        "from nvlcore.config import load_config, resolve_config\n"
        "from nvlcore.data.schema import validate_conversation\n"
        "cfg = resolve_config(load_config([], sys.argv[1:]))\n"
        "maker = get_registry('dataset_maker').get(cfg.dataset.maker_name)\n"
        "made = maker(split='train', **cfg.dataset.maker_kwargs)\n"
        "for i, conv in enumerate(made):\n"
        "    validate_conversation(conv, where=f'row {i}')\n"
        "print(json.dumps({'kwargs': cfg.dataset.maker_kwargs, 'made': list(made)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "dataset.maker_name=example_qa", f"dataset.maker_kwargs={{path: {data}}}",
         "dataset.maker_kwargs.prompt_prefix='Q: '"],  # quoted: unquoted YAML scalars are stripped
        capture_output=True, text=True, env=installed, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kwargs"] == {"path": str(data), "prompt_prefix": "Q: ", "max_samples": None}
    first, second = out["made"]
    assert first["conversation"][0]["content"] == [{"type": "text", "text": "Q: What is 2+2?"}]
    assert first["conversation"][1]["content"] == [{"type": "text", "text": "4"}]
    assert second["conversation"][0]["content"][0] == {"type": "image", "image": "/x.png"}


def test_example_plugin_kwargs_are_validated(installed: dict[str, str]) -> None:
    done = nvl(installed, "config", "show", "dataset.maker_name=jsonl_qa", "dataset.maker_kwargs={pth: /x}")
    assert done.returncode == 2
    assert "dataset.maker_kwargs.pth: unknown key (did you mean 'dataset.maker_kwargs.path'?)" in done.stderr
    done = nvl(installed, "config", "show", "--check", "dataset.maker_name=jsonl_qa")
    assert done.returncode == 2 and "dataset.maker_kwargs.path" in done.stderr  # mandatory: no default
