"""Plugin manager: discovery, error isolation, allow/block lists, strict mode, registries, CLI guard."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import click
import click.testing
import pytest

from nvlcore import DuplicateNameError, UnknownNameError, hookimpl
from nvlcore.cli import build_cli
from nvlcore.plugins import NvlPluginManager, PluginError


def module_plugin(name: str, **hooks: Any) -> types.ModuleType:
    """A module object holding ``@hookimpl`` functions, as an installed plugin's module would."""
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(module, hook_name, hookimpl(fn))
    return module


def maker_plugin(name: str, *makers: str) -> types.ModuleType:
    def nvl_register_dataset_makers(register: Any) -> None:
        for maker in makers:
            register(maker, f"{name}.makers:{maker}")

    return module_plugin(name, nvl_register_dataset_makers=nvl_register_dataset_makers)


def manager_with(env: dict[str, str] | None = None) -> NvlPluginManager:
    return NvlPluginManager(env=env or {}, entry_points=True, builtins=True)


def by_name(manager: NvlPluginManager) -> dict[str, Any]:
    return {i.name: i for i in manager.plugin_infos(include_builtins=True)}


# -- failures are isolated ----------------------------------------------------------------------------
def test_broken_import_is_failed_and_the_rest_works(fake_entry_points: Any, capsys: Any) -> None:
    fake_entry_points(
        {"nvl-data-good": {"nvl_data_good": maker_plugin("nvl_data_good", "good")},
         "nvl-data-broken": {"nvl_data_broken": ImportError("No module named 'pyarrow'")}}
    )  # fmt: skip
    manager = manager_with()
    infos = by_name(manager)
    assert infos["nvl_data_broken"].status == "failed"
    assert infos["nvl_data_broken"].error == "ImportError: No module named 'pyarrow'"
    assert infos["nvl_data_broken"].distribution == "nvl-data-broken" and infos["nvl_data_broken"].version == "1.0"
    assert infos["nvl_data_good"].status == "loaded"
    assert manager.registry("dataset_maker").names() == ["good", "synthetic_shapes"]
    assert "plugin 'nvl_data_broken' failed" in capsys.readouterr().err
    result = click.testing.CliRunner().invoke(build_cli(manager), ["--help"])
    assert result.exit_code == 0 and "plugins" in result.output


def test_unknown_hook_name_fails_with_suggestion(fake_entry_points: Any) -> None:
    typo = module_plugin("nvl_typo", nvl_register_dataset_maker=lambda register: register("x", "m:X"))
    fake_entry_points({"nvl-typo": {"nvl_typo": typo}})
    info = by_name(manager_with())["nvl_typo"]
    assert info.status == "failed"
    assert "unknown hook 'nvl_register_dataset_maker'" in info.error
    assert "did you mean 'nvl_register_dataset_makers'?" in info.error


def test_hook_argument_not_in_spec_fails(fake_entry_points: Any) -> None:
    bad = module_plugin("nvl_badargs", nvl_register_loggers=lambda register, extra: None)
    fake_entry_points({"nvl-badargs": {"nvl_badargs": bad}})
    info = by_name(manager_with())["nvl_badargs"]
    assert info.status == "failed" and "extra" in info.error


def test_exception_in_hook_removes_partial_registrations(fake_entry_points: Any) -> None:
    def makers(register: Any) -> None:
        register("half_done", "m:A")
        raise RuntimeError("boom while registering")

    def bridges(register: Any) -> None:  # runs before the dataset-maker hook
        register("early_bridge", "m:B")

    bad = module_plugin("nvl_half", nvl_register_dataset_makers=makers, nvl_register_model_bridges=bridges)
    fake_entry_points({"nvl-half": {"nvl_half": bad}, "nvl-ok": {"nvl_ok": maker_plugin("nvl_ok", "ok")}})
    manager = manager_with()
    info = by_name(manager)["nvl_half"]
    assert info.status == "failed" and info.error == "RuntimeError: boom while registering"
    assert "half_done" not in manager.registry("dataset_maker")
    assert "early_bridge" not in manager.registry("model_bridge")
    assert info.registered == {}
    assert "ok" in manager.registry("dataset_maker")


def test_undecorated_hook_function_is_a_warning(fake_entry_points: Any) -> None:
    module = types.ModuleType("nvl_plain")
    module.nvl_register_loggers = lambda register: None  # type: ignore[attr-defined]
    fake_entry_points({"nvl-plain": {"nvl_plain": module}})
    info = by_name(manager_with())["nvl_plain"]
    assert info.status == "loaded"
    assert "not decorated with @nvlcore.hookimpl" in info.warnings[0]


def test_same_entry_point_name_in_two_distributions(fake_entry_points: Any) -> None:
    fake_entry_points({"nvl-a": {"nvl_same": maker_plugin("a", "a")}, "nvl-b": {"nvl_same": maker_plugin("b", "b")}})
    infos = by_name(manager_with())
    assert infos["nvl_same"].status == "loaded" and infos["nvl_same"].distribution == "nvl-a"
    assert infos["nvl_same (nvl-b)"].status == "failed"
    assert "already provided by nvl-a" in infos["nvl_same (nvl-b)"].error


# -- environment ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "loaded", "blocked"),
    [
        ({}, {"nvl_one", "nvl_two"}, set()),
        ({"NVL_LOAD_PLUGINS": "nvl-one"}, {"nvl_one"}, {"nvl_two"}),
        ({"NVL_LOAD_PLUGINS": "NVL_One, nvl.two"}, {"nvl_one", "nvl_two"}, set()),  # names normalised
        ({"NVL_LOAD_PLUGINS": ""}, set(), {"nvl_one", "nvl_two"}),  # set but empty: none
        ({"NVL_DISABLE_PLUGINS": "nvl-two"}, {"nvl_one"}, {"nvl_two"}),  # by distribution
        ({"NVL_DISABLE_PLUGINS": "nvl_one"}, {"nvl_two"}, {"nvl_one"}),  # by entry-point name
        ({"NVL_LOAD_PLUGINS": "nvl-one,nvl-two", "NVL_DISABLE_PLUGINS": "nvl-one"}, {"nvl_two"}, {"nvl_one"}),
    ],
)
def test_allow_and_block_lists(fake_entry_points: Any, env: dict[str, str], loaded: set[str],
                               blocked: set[str]) -> None:
    fake_entry_points({"nvl-one": {"nvl_one": maker_plugin("nvl_one", "one")},
                       "nvl-two": {"nvl_two": maker_plugin("nvl_two", "two")}})
    manager = manager_with(env)
    infos = [i for i in manager.plugin_infos() if i.name.startswith("nvl_")]
    assert {i.name for i in infos if i.status == "loaded"} == loaded
    assert {i.name for i in infos if i.status == "blocked"} == blocked
    assert set(manager.registry("dataset_maker").names()) == {n.removeprefix("nvl_")
                                                              for n in loaded} | {"synthetic_shapes"}


def test_allowlisted_name_not_installed_is_reported(fake_entry_points: Any, capsys: Any) -> None:
    fake_entry_points({"nvl-one": {"nvl_one": maker_plugin("nvl_one", "one")}})
    manager = manager_with({"NVL_LOAD_PLUGINS": "nvl-one,nvl-missing"})
    assert manager.warnings == ["NVL_LOAD_PLUGINS names 'nvl-missing', which is not an installed nvl plugin"]


@pytest.mark.parametrize("kind", ["import", "unknown_hook", "hook_raises"])
def test_strict_mode_raises(fake_entry_points: Any, kind: str) -> None:
    def raising(register: Any) -> None:
        raise ValueError("bad registration")

    plugin: Any = {
        "import": ImportError("missing dependency"),
        "unknown_hook": module_plugin("nvl_s", nvl_register_exporter=lambda register: None),
        "hook_raises": module_plugin("nvl_s", nvl_register_exporters=raising),
    }[kind]
    fake_entry_points({"nvl-s": {"nvl_s": plugin}})
    with pytest.raises(PluginError, match="plugin 'nvl_s' failed"):
        manager_with({"NVL_STRICT_PLUGINS": "1"}).collect()
    manager_with({"NVL_STRICT_PLUGINS": "0"}).collect()  # "0" is off


# -- registries ------------------------------------------------------------------------------------------
def test_duplicate_name_names_both_plugins(fake_entry_points: Any) -> None:
    fake_entry_points({"nvl-first": {"nvl_first": maker_plugin("nvl_first", "alpaca")},
                       "nvl-second": {"nvl_second": maker_plugin("nvl_second", "alpaca")}})  # fmt: skip
    manager = manager_with()
    infos = by_name(manager)
    assert infos["nvl_first"].status == "loaded"  # sorted by distribution name: the first keeps it
    error = infos["nvl_second"].error
    assert infos["nvl_second"].status == "failed" and error.startswith("DuplicateNameError")
    assert "'nvl_first' (nvl-first 1.0)" in error and "'nvl_second' (nvl-second 1.0)" in error
    assert manager.registry("dataset_maker").entry("alpaca").provenance.plugin == "nvl_first"
    with pytest.raises(DuplicateNameError, match="synthetic_shapes"):
        manager.registry("dataset_maker").add("synthetic_shapes", object())


def test_unknown_name_suggests_and_lists(nvl_plugin_manager: NvlPluginManager, register_plugin: Any) -> None:
    def makers(register: Any) -> None:
        register("make_raven_dataset", "m:R", aliases=("raven",))

    register_plugin(module_plugin("nvl_raven", nvl_register_dataset_makers=makers))
    registry = nvl_plugin_manager.registry("dataset_maker")
    with pytest.raises(UnknownNameError) as info:
        registry.get("make_ravn_dataset")
    message = str(info.value)
    assert "did you mean 'make_raven_dataset'?" in message
    assert "known: make_raven_dataset (aliases: raven), synthetic_shapes (aliases: shapes)" in message
    assert registry.canonical("raven") == "make_raven_dataset"
    with pytest.raises(KeyError, match="did you mean 'dataset_maker'"):
        nvl_plugin_manager.registry("dataset_makers")


def test_lazy_target_is_not_imported_until_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, register_plugin: Any,
                                                nvl_cli: Any) -> None:
    (tmp_path / "nvl_lazy_heavy_mod.py").write_text("IMPORTED = True\nclass Maker:\n    splits = ('train',)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "nvl_lazy_heavy_mod", raising=False)

    def makers(register: Any) -> None:
        register("lazy", "nvl_lazy_heavy_mod:Maker")

    register_plugin(module_plugin("nvl_lazy", nvl_register_dataset_makers=makers))
    assert nvl_cli("plugins", "list", "--json").exit_code == 0
    from nvlcore import get_registry

    assert get_registry("dataset_maker").entry("lazy").is_lazy
    assert "nvl_lazy_heavy_mod" not in sys.modules
    assert get_registry("dataset_maker").get("lazy").splits == ("train",)
    assert "nvl_lazy_heavy_mod" in sys.modules


def test_recollect_after_adding_and_removing_plugins(nvl_plugin_manager: NvlPluginManager) -> None:
    assert nvl_plugin_manager.registry("dataset_maker").names() == ["synthetic_shapes"]
    nvl_plugin_manager.add_plugin(maker_plugin("nvl_x", "x"))
    assert nvl_plugin_manager.registry("dataset_maker").names() == ["synthetic_shapes", "x"]
    nvl_plugin_manager.remove_plugin("nvl_x")
    assert nvl_plugin_manager.registry("dataset_maker").names() == ["synthetic_shapes"]
    assert "nvl_x" not in {i.name for i in nvl_plugin_manager.plugin_infos()}


def test_register_plugin_fixture_unregisters(nvl_plugin_manager: NvlPluginManager, register_plugin: Any) -> None:
    register_plugin(maker_plugin("nvl_tmp", "tmp"))
    assert "tmp" in nvl_plugin_manager.registry("dataset_maker")
    with pytest.raises(ValueError, match="already registered"):
        nvl_plugin_manager.add_plugin(maker_plugin("nvl_tmp", "tmp2"))


# -- CLI guard --------------------------------------------------------------------------------------------
def command_plugin(name: str, *commands: str, fail: bool = False) -> types.ModuleType:
    def nvl_register_commands(cli: click.Group) -> None:
        for command in commands:
            cli.add_command(click.Command(command, callback=lambda c=command: click.echo(f"{name}:{c}")))
        if fail:
            raise RuntimeError("command hook broke")

    return module_plugin(name, nvl_register_commands=nvl_register_commands)


def test_builtin_commands_cannot_be_replaced(register_plugin: Any, nvl_cli: Any, capsys: Any) -> None:
    register_plugin(command_plugin("nvl_a", "plugins", "hello"))
    register_plugin(command_plugin("nvl_b", "hello", "bye"))
    result = nvl_cli("plugins", "list", "--json")
    assert result.exit_code == 0
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert "nvl: plugin 'nvl_a' tried to replace built-in command 'plugins'; skipped" in capsys.readouterr().err
    assert listed["nvl_a"]["warnings"] == ["tried to replace built-in command 'plugins'; skipped"]
    assert listed["nvl_b"]["warnings"] == ["tried to replace command 'hello' of plugin 'nvl_a'; skipped"]
    assert nvl_cli("hello").output.strip() == "nvl_a:hello"
    assert nvl_cli("bye").output.strip() == "nvl_b:bye"


def test_command_hook_that_raises_fails_its_plugin(register_plugin: Any, nvl_cli: Any) -> None:
    register_plugin(command_plugin("nvl_c", "half", fail=True))
    result = nvl_cli("--help")
    assert result.exit_code == 0 and "half" not in result.stdout
    listed = {p["name"]: p for p in json.loads(nvl_cli("plugins", "list", "--json").stdout)}
    assert listed["nvl_c"]["status"] == "failed" and listed["nvl_c"]["error"] == "RuntimeError: command hook broke"


# -- nvl plugins list / hooks -----------------------------------------------------------------------------
def test_plugins_list_json_table_and_all(register_plugin: Any, nvl_cli: Any) -> None:
    register_plugin(maker_plugin("nvl_listed", "listed"))
    data = json.loads(nvl_cli("plugins", "list", "--json").stdout)
    assert [p["name"] for p in data] == ["nvl_listed"]
    assert data[0] == {
        "name": "nvl_listed", "distribution": None, "version": None, "status": "loaded", "error": None,
        "hooks": ["nvl_register_dataset_makers"], "registered": {"dataset_maker": ["listed"]},
        "builtin": False, "warnings": [],
    }  # fmt: skip
    every = {p["name"]: p for p in json.loads(nvl_cli("plugins", "list", "--json", "--all").stdout)}
    assert every["nvlcore.builtin.loggers"]["registered"] == {"logger": ["console", "jsonl", "tensorboard", "wandb"]}
    assert every["nvlcore.builtin.loggers"]["builtin"] is True
    table = nvl_cli("plugins", "list").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "VERSION", "STATUS"]
    assert "nvl_listed" in table and "dataset_maker: listed" in table
    only = json.loads(nvl_cli("plugins", "list", "--json", "--all", "--hook", "nvl_register_loggers").stdout)
    assert [p["name"] for p in only] == ["nvlcore.builtin.loggers"]
    assert "did you mean" in nvl_cli("plugins", "list", "--hook", "nvl_register_logger").output


def test_plugins_list_requirements(fake_entry_points: Any) -> None:
    fake_entry_points({"nvl-one": {"nvl_one": maker_plugin("nvl_one", "one")},
                       "nvl-bad": {"nvl_bad": ImportError("x")}})
    result = click.testing.CliRunner().invoke(build_cli(manager_with()), ["plugins", "list", "--requirements"])
    assert result.exit_code == 0 and result.stdout == "nvl-one==1.0\n"  # failed plugins are left out


def test_plugins_list_shows_failures_in_table(fake_entry_points: Any, nvl_plugin_manager: NvlPluginManager) -> None:
    """The CLI lists the manager it was built from, not the process-wide one (here: the fixture's)."""
    fake_entry_points({"nvl-broken": {"nvl_broken": ImportError("no torchvision")}})
    result = click.testing.CliRunner().invoke(build_cli(manager_with()), ["plugins", "list"])
    line = next(line for line in result.stdout.splitlines() if line.startswith("nvl_broken"))
    assert "failed" in line and "ImportError: no torchvision" in line


def test_plugins_hooks_lists_every_hookspec(nvl_cli: Any) -> None:
    from nvlcore.plugins import hookspec_names

    out = nvl_cli("plugins", "hooks").stdout
    for name in hookspec_names():
        assert f"{name}(" in out
    assert "nvl_register_dataset_makers(register)  " in out and "Register dataset makers" in out


def test_installed_plugins_list_in_a_subprocess_without_importing_lazy_targets() -> None:
    """The real entry points of this environment: listing imports no registered target (they are lazy)."""
    code = (
        "import sys, json\n"
        "from click.testing import CliRunner\n"
        "from nvlcore.cli import build_cli\n"
        "out = CliRunner().invoke(build_cli(), ['plugins', 'list', '--json', '--all']).stdout\n"
        "from nvlcore import get_plugin_manager\n"
        "m = get_plugin_manager()\n"
        "own = {getattr(p, '__name__', None) for p in m.pm.get_plugins()}\n"
        "lazy = [e.target.split(':')[0] for r in m.registries.values() for e in r.entries() if e.is_lazy]\n"
        "lazy = [x for x in lazy if x not in own]  # a plugin may point at its own (already imported) module\n"
        "print(json.dumps({'plugins': json.loads(out), 'imported': [m for m in lazy if m in sys.modules]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    names = {p["name"]: p for p in data["plugins"]}
    assert names["nvlcore.builtin.loggers"]["status"] == "loaded"
    assert "nvlcore.training.loggers" not in data["imported"]
    assert data["imported"] == []
    assert all(p["status"] == "loaded"
               for p in data["plugins"]), [p for p in data["plugins"] if p["status"] != "loaded"]


# -- sys.exit() and other BaseExceptions fail the plugin, not the CLI (issue 17, item 1) ----------------
def test_sys_exit_at_import_fails_the_plugin_not_the_cli(fake_entry_points: Any, capsys: Any) -> None:
    fake_entry_points({"nvl-exits": {"nvl_exits": SystemExit(1)},
                       "nvl-ok": {"nvl_ok": maker_plugin("nvl_ok", "ok")}})  # fmt: skip
    manager = manager_with()
    infos = by_name(manager)
    assert infos["nvl_exits"].status == "failed" and infos["nvl_exits"].error == "SystemExit: 1"
    assert "ok" in manager.registry("dataset_maker")
    result = click.testing.CliRunner().invoke(build_cli(manager), ["--help"])
    assert result.exit_code == 0 and "plugins" in result.output


class _NotAnException(BaseException):
    pass


def test_sys_exit_and_base_exceptions_in_hooks_fail_the_plugin(fake_entry_points: Any) -> None:
    def makers(register: Any) -> None:
        register("doomed", "m:A")
        sys.exit(3)

    def commands(cli: Any) -> None:
        raise _NotAnException("odd")

    fake_entry_points(
        {"nvl-exit-hook": {"nvl_exit_hook": module_plugin("nvl_exit_hook", nvl_register_dataset_makers=makers)},
                       "nvl-odd-cmd": {"nvl_odd_cmd": module_plugin("nvl_odd_cmd", nvl_register_commands=commands)}})
    manager = manager_with()
    infos = by_name(manager)
    assert infos["nvl_exit_hook"].status == "failed" and infos["nvl_exit_hook"].error == "SystemExit: 3"
    assert "doomed" not in manager.registry("dataset_maker")
    result = click.testing.CliRunner().invoke(build_cli(manager), ["--help"])
    assert result.exit_code == 0, result.output
    assert by_name(manager)["nvl_odd_cmd"].status == "failed"
    assert "_NotAnException: odd" in by_name(manager)["nvl_odd_cmd"].error


def test_keyboard_interrupt_in_a_plugin_is_not_swallowed(fake_entry_points: Any) -> None:
    fake_entry_points({"nvl-ctrl-c": {"nvl_ctrl_c": KeyboardInterrupt()}})
    with pytest.raises(KeyboardInterrupt):
        manager_with()


def test_plugin_calling_sys_exit_at_import_in_a_real_process(tmp_path: Path) -> None:
    """``nvl --help`` of a real process whose installed plugin module calls ``sys.exit(1)`` at import."""
    site = tmp_path / "site"
    (site / "nvl_exiter").mkdir(parents=True)
    (site / "nvl_exiter" / "__init__.py").write_text("import sys\nsys.exit(1)\n")
    dist = site / "nvl_exiter-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nvl-exiter\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nvl]\nnvl_exiter = nvl_exiter\n")
    import os

    env = {**os.environ, "PYTHONPATH": str(site), "NVL_STRICT_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-m", "nvlcore", "--help"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    assert "plugin 'nvl_exiter' failed: SystemExit: 1" in done.stderr
