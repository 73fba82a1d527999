"""One model option for every command that takes a model (issue 27 item 5): the same spellings
(``--hf-model-path``, ``--hf-model``, ``--hf-model-id``) and ``--revision`` everywhere, a directory or a
Hub id, and errors that name the spelling the user typed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nvlcore.cli import build_cli, options
from nvlcore.cli.options import MODEL_OPTION_NAMES

#: Every command that takes a model, by its path (nvl-lora's `peft merge` included when installed).
COMMANDS = [("generate",), ("eval",), ("finetune",), ("convert", "import"), ("convert", "export"), ("export",),
            ("data", "preview"), ("config", "show"), ("peft", "merge"), ("serve",)]


def _command(cli: click.Group, path: tuple[str, ...]) -> click.Command | None:
    cmd: click.Command | None = cli
    for name in path:
        cmd = cmd.commands.get(name) if isinstance(cmd, click.Group) else None
    return cmd


@pytest.fixture(scope="module")
def cli() -> click.Group:
    return build_cli()


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_takes_the_same_model_option(cli, path) -> None:
    cmd = _command(cli, path)
    if cmd is None:
        pytest.skip(f"nvl {' '.join(path)} is not installed")
    model = [p for p in cmd.params if isinstance(p, click.Option) and set(p.opts) & set(MODEL_OPTION_NAMES)]
    assert len(model) == 1, [p.opts for p in model]
    assert set(MODEL_OPTION_NAMES) <= set(model[0].opts)
    revision = [p for p in cmd.params if "--revision" in getattr(p, "opts", ())]
    assert len(revision) == 1 and "--hf-revision" in revision[0].opts
    # one definition: the same callback resolves the directory or Hub id everywhere
    assert model[0].callback is options._resolve_model


def test_errors_name_the_spelling_typed(cli, tmp_path) -> None:
    """`convert import --hf-model X` reports --hf-model, not --hf-model-path (and the other way round)."""
    missing = str(tmp_path / "no" / "such" / "dir")
    for spelling in ("--hf-model", "--hf-model-path", "--hf-model-id", "--hf_model"):
        res = CliRunner().invoke(cli, ["convert", "import", spelling, missing, "--megatron-path", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert f"Invalid value for {spelling}: {missing}: no such directory" in res.output, res.output
        assert not any(f"for {o}:" in res.output for o in MODEL_OPTION_NAMES if o != spelling), res.output


def test_eval_takes_every_spelling_and_a_hub_id(cli, tmp_path) -> None:
    """`nvl eval` refused --hf-model and took a Hub id for a missing directory; now it resolves it as every
    command does (offline: the one line that says what to do)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for spelling in ("--hf-model", "--hf-model-id", "--hf-model-path"):
        ctx = cli.commands["eval"].make_context("eval", [spelling, str(hf), "dataset.maker_name=synthetic_shapes"])
        assert ctx.params["hf_model_path"] == hf
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-m", "nvlcore", "eval", "--hf-model", "nvidia/Not-Cached",
                           "dataset.maker_name=synthetic_shapes"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--hf-model" in errors[0] and "'--hf-model-path'" not in errors[0]
    assert "not in the Hugging Face cache" in errors[0] and "HF_HUB_OFFLINE" in errors[0], errors


def test_eval_on_an_unreachable_hub_dataset_is_one_line(tmp_path: Path) -> None:
    """No network for a Hub dataset: one line naming the dataset and what to do, as finetune and data
    preview say it (it was a 50-line ConnectionError traceback)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    code = ("import sys\n"
            "from nvlcore import hookimpl\n"
            "from nvlcore.cli import main\n"
            "from nvlcore.plugins import NvlPluginManager, set_plugin_manager\n"
            "class HubMaker:\n"
            "    splits = ('test',)\n"
            "    def __init__(self, split):\n"
            "        import datasets\n"
            "        datasets.load_dataset('nvidia/no-such-dataset-for-nvl', split=split)\n"
            "class P:\n"
            "    @hookimpl\n"
            "    def nvl_register_dataset_makers(self, register):\n"
            "        register('hub_maker', HubMaker)\n"
            "set_plugin_manager(NvlPluginManager(entry_points=False, plugins=[('p', P())]))\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--hf-model-path", str(hf),
                           "dataset.maker_name=hub_maker"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: dataset.maker_name=hub_maker, split 'test'"), lines
    assert "dataset.maker_kwargs.path" in lines[0]
