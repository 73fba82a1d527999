"""Hook conformance: every hookspec is documented (docstring and docs/hooks.md) and tested here.

The ``test_hook_<name>`` functions below are the per-hook tests that
:func:`test_every_hook_has_a_test` requires (datasette's convention).
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from nvlcore import hookimpl, hookspecs
from nvlcore.plugins import NvlPluginManager, hookspec_names

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"
HOOKS = hookspec_names()


def test_hookspec_module_lists_every_hook() -> None:
    assert HOOKS  # the discovery itself must find something
    assert set(HOOKS) <= set(hookspecs.__all__)
    manager = NvlPluginManager(env={}, entry_points=False, builtins=False)
    assert {n for n in dir(manager.pm.hook) if not n.startswith("_")} == set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_docstring_has_summary_and_every_param(name: str) -> None:
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) > 20, f"{name}: first line should be a sentence: {summary!r}"
    for arg in inspect.signature(fn).parameters:
        assert re.search(rf":param {arg}:\s+\S", doc), f"{name}: no ':param {arg}:' in its docstring"
    assert fn.__annotations__.get("return") in ("None", None), f"{name}: registration hooks return nothing"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented_in_hooks_md(name: str) -> None:
    args = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    assert f"\n## {name}({args})\n" in DOCS.read_text(), f"docs/hooks.md lacks a '## {name}({args})' section"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test(name: str) -> None:
    assert callable(getattr(sys.modules[__name__], f"test_hook_{name}", None)), f"write test_hook_{name}"


# -- one test per hook -----------------------------------------------------------------------------------
def _registered(manager: NvlPluginManager, kind: str, name: str) -> Any:
    entry = manager.registry(kind).entry(name)
    assert entry.provenance.plugin == "test-plugin"
    return entry


class _Thing:
    architectures = ("TestArch",)


def _manager(plugin: object) -> NvlPluginManager:
    manager = NvlPluginManager(env={}, entry_points=False, builtins=True)
    manager.add_plugin(plugin, name="test-plugin")
    return manager


def test_hook_nvl_register_model_bridges() -> None:
    class P:
        @hookimpl
        def nvl_register_model_bridges(self, register: Any) -> None:
            register("test_bridge", _Thing, aliases=("tb",))

    manager = _manager(P())
    assert _registered(manager, "model_bridge", "tb").name == "test_bridge"
    assert manager.registry("model_bridge").get("test_bridge") is _Thing
    from nvlcore.contracts import first_matching_bridge

    assert first_matching_bridge(["TestArch"], {"test_bridge": _Thing}) == "test_bridge"


def test_hook_nvl_register_dataset_makers() -> None:
    class P:
        @hookimpl
        def nvl_register_dataset_makers(self, register: Any) -> None:
            register("test_maker", "nvlcore.builtin.synthetic_vqa:SyntheticShapes")

    manager = _manager(P())
    maker = _registered(manager, "dataset_maker", "test_maker").load()
    assert len(maker(split="train", num_examples=2)) == 2


def test_hook_nvl_register_peft_methods() -> None:
    class P:
        @hookimpl
        def nvl_register_peft_methods(self, register: Any) -> None:
            register("test_peft", _Thing)

    manager = _manager(P())
    assert _registered(manager, "peft_method", "test_peft").load() is _Thing
    assert manager.infos["test-plugin"].registered == {"peft_method": ["test_peft"]}


def test_hook_nvl_register_exporters() -> None:
    class P:
        @hookimpl
        def nvl_register_exporters(self, register: Any) -> None:
            register("test-format", _Thing)

    manager = _manager(P())
    assert _registered(manager, "exporter", "test-format").load() is _Thing


def test_hook_nvl_register_loggers() -> None:
    class P:
        @hookimpl
        def nvl_register_loggers(self, register: Any) -> None:
            register("test_logger", _Thing)

    manager = _manager(P())
    assert _registered(manager, "logger", "test_logger").load() is _Thing
    assert {"console", "jsonl", "wandb"} <= set(manager.registry("logger").names())  # built-ins too


def test_hook_nvl_register_commands() -> None:
    @click.command("test-cmd")
    @click.argument("who")
    def test_cmd(who: str) -> None:
        click.echo(f"hi {who}")

    class P:
        @hookimpl
        def nvl_register_commands(self, cli: click.Group) -> None:
            cli.add_command(test_cmd)

    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    cli = build_cli(_manager(P()))
    result = CliRunner().invoke(cli, ["test-cmd", "you"])
    assert result.exit_code == 0 and result.output == "hi you\n"
    assert cli.command_owner["test-cmd"] == "test-plugin"


def test_hook_nvl_register_command_options(tmp_path: Path) -> None:
    """Options a plugin adds to core commands: shown in help, their values reach the bridge's recipe and
    become overrides, a hidden alias spells a core option, and without a model they are refused."""
    import json

    from click.testing import CliRunner

    from nvlcore.cli import build_cli
    from nvlcore.cli.plugin_options import CommandOptions

    seen: list[dict[str, Any]] = []

    from nvlcore.bridge import ModelBridge

    class Bridge(ModelBridge):
        """Only what `nvl config show` reaches: the recipe, whose variant a plugin option picks."""

        name = "test_bridge"
        architectures = ("TestArch",)

        def build_model(self, **_: Any) -> Any:
            raise AssertionError("config show builds no model")

        def processor(self, **_: Any) -> Any:
            raise AssertionError("config show builds no processor")

        def mapping_table(self) -> list[Any]:
            return []

        def recipe(self, *, peft: bool = False, adapted_groups: Any = (), variant: str = "plain") -> dict[str, Any]:
            seen.append({"variant": variant})
            return {"train": {"train_iters": 11 if variant == "fast" else 22}}

    class Opts(CommandOptions):
        commands = ("finetune", "config show")
        def aliases(self, command: str) -> dict[str, str]:
            return {"--cfg": "--config-file"}

        def params(self, command: str) -> list[click.Parameter]:
            return [click.Option(["--test-fast"], is_flag=True, help="Use the fast variant (test plugin)."),
                    click.Option(["--test-batch"], type=int, default=None, help="Global batch (test plugin).")]

        def recipe_options(self, command: str, values: Any) -> dict[str, Any]:
            return {"variant": "fast"} if values["test_fast"] else {}

        def overrides(self, command: str, values: Any, request: Any) -> list[Any]:
            from nvlcore.config import Override

            assert request.base["train"]["train_iters"] in (11, 22)
            return [Override("train.global_batch_size", values["test_batch"])] if values["test_batch"] else []

    class P:
        @hookimpl
        def nvl_register_model_bridges(self, register: Any) -> None:
            register("test_bridge", Bridge)

        @hookimpl
        def nvl_register_command_options(self, register: Any) -> None:
            register("test-opts", Opts)

    manager = _manager(P())
    assert _registered(manager, "command_options", "test-opts").load() is Opts
    cli = build_cli(manager)
    runner = CliRunner()
    help_text = runner.invoke(cli, ["finetune", "--help"]).output
    assert "--test-fast" in help_text and "--test-batch" in help_text
    assert "--test-fast" in runner.invoke(cli, ["config", "show", "--help"]).output

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["TestArch"]}))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  micro_batch_size: 3\n")
    result = runner.invoke(cli, ["config", "show", "--hf-model-path", str(hf), "--test-fast", "--test-batch", "64",
                                 "--cfg", str(yaml_file), "dataset.maker_name=synthetic_shapes"])
    assert result.exit_code == 0, result.output
    assert "train_iters: 11" in result.output and "global_batch_size: 64" in result.output
    assert "micro_batch_size: 3" in result.output  # the alias reached --config-file
    assert seen[-1] == {"variant": "fast"}
    result = runner.invoke(cli, ["config", "show", "--hf-model-path", str(hf), "dataset.maker_name=synthetic_shapes"])
    assert result.exit_code == 0, result.output
    assert "train_iters: 22" in result.output and seen[-1] == {"variant": "plain"}

    refused = runner.invoke(cli, ["config", "show", "--test-fast"])
    assert refused.exit_code == 2 and "--test-fast select a model's recipe" in refused.output

    # nvl finetune --nproc-per-node hands the options the user gave to its workers, spelled as options
    from nvlcore.cli import MANAGER_KEY

    finetune = cli.commands["finetune"]
    root = click.Context(cli)
    root.meta[MANAGER_KEY] = manager
    with root:
        ctx = finetune.make_context("finetune", ["--test-batch", "8", "--test-fast", "x=1"], parent=root)
        assert finetune.plugin_argv(ctx) == ["--test-fast", "--test-batch", "8"]
        assert finetune.plugin_argv(finetune.make_context("finetune", ["x=1"], parent=root)) == []

    # a manager without the plugin: the core command has no such option
    plain = build_cli(_manager(object()))
    assert "--test-fast" not in runner.invoke(plain, ["finetune", "--help"]).output


def test_broken_command_options_are_skipped_with_a_line_naming_the_plugin() -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    class P:
        @hookimpl
        def nvl_register_command_options(self, register: Any) -> None:
            register("broken", "nvl_no_such_module_xyz:Opts")
            register("not-options", object)

    manager = _manager(P())
    result = CliRunner().invoke(build_cli(manager), ["finetune", "--help"])
    assert result.exit_code == 0 and "--pretrained-checkpoint" in result.output  # the command still works
    warnings = manager.infos["test-plugin"].warnings
    assert any("command options 'broken'" in w and "ModuleNotFoundError" in w for w in warnings), warnings
    assert any("command options 'not-options'" in w and "is not a subclass" in w for w in warnings), warnings
    strict = NvlPluginManager(env={"NVL_STRICT_PLUGINS": "1"}, entry_points=False, builtins=True)
    strict.add_plugin(P(), name="test-plugin")
    result = CliRunner().invoke(build_cli(strict), ["finetune", "--help"])
    assert result.exit_code != 0 and "command options 'broken'" in result.output
