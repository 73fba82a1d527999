"""Opt-in pytest fixtures for nvl plugin authors (and nvl's own tests).

Enable them in your top-level ``conftest.py``::

    pytest_plugins = ["nvlcore.testing"]

or with ``pytest -p nvlcore.testing`` (nvl's own ``pyproject.toml`` does that in ``addopts``). They are
not auto-loaded through a ``pytest11`` entry point, so installing nvlcore changes no other test suite.

Fixtures:

``nvl_plugin_manager``
    A fresh :class:`~nvlcore.plugins.NvlPluginManager` with the built-in plugins only (no installed
    entry points, no ``NVL_*`` environment), swapped in as the process-wide manager for the test.
``register_plugin``
    ``register_plugin(plugin, name=None)`` registers a module or object with ``@hookimpl`` functions
    into that manager; it is always unregistered when the test ends.
``nvl_cli`` (also ``cli_runner``)
    ``nvl_cli("plugins", "list", "--json")`` runs the ``nvl`` command line built from that manager
    with click's ``CliRunner`` and returns the ``click.testing.Result``.
``own_process_group``
    Module scope: after the module, take down a one-rank process group its tests set up (loading a
    model does), so later single-process tests see none.
``fake_entry_points``
    ``fake_entry_points({"nvl-data-x": {"nvl_data_x": module_or_exception}})`` makes
    ``importlib.metadata.distributions()`` return stub distributions with those ``nvl`` entry points
    (a value that is an exception is raised by ``EntryPoint.load()``), so a test can build
    ``NvlPluginManager(env=...)`` against them without installing anything.

Example (a dataset maker plugin's test)::

    import nvl_data_alpaca

    def test_listed(register_plugin, nvl_cli):
        register_plugin(nvl_data_alpaca)
        result = nvl_cli("plugins", "list", "--json")
        assert "alpaca" in result.output
"""

from __future__ import annotations

import importlib.metadata as md
from typing import Any, Callable, Iterator, Mapping

import pytest

from nvlcore.plugins import NvlPluginManager, set_plugin_manager


def make_plugin_manager(*plugins: object, env: Mapping[str, str] | None = None, entry_points: bool = False) -> NvlPluginManager:
    """A plugin manager with the built-ins and the given in-process plugins (no entry points by default).

    :param plugins: modules or objects with ``@hookimpl`` functions.
    :param env: the ``NVL_*`` environment it reads (default: none set).
    :param entry_points: also load installed entry-point plugins.
    """
    manager = NvlPluginManager(env=dict(env or {}), entry_points=entry_points)
    for plugin in plugins:
        manager.add_plugin(plugin)
    return manager


@pytest.fixture(scope="module")
def own_process_group() -> Iterator[None]:
    """Take down, after the module, a process group its tests set up (loading a model sets up a one-rank
    group), so later tests in the process (single-process checkpoint writers) see none. Use it with
    ``pytestmark = pytest.mark.usefixtures("own_process_group")``."""
    import torch.distributed as dist

    had = dist.is_initialized()
    yield
    if not had and dist.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture
def nvl_plugin_manager() -> Iterator[NvlPluginManager]:
    """A fresh plugin manager (built-ins only), installed as the process-wide one for this test."""
    manager = make_plugin_manager()
    previous = set_plugin_manager(manager)
    try:
        yield manager
    finally:
        set_plugin_manager(previous)


@pytest.fixture
def register_plugin(nvl_plugin_manager: NvlPluginManager) -> Iterator[Callable[..., Any]]:
    """``register_plugin(plugin, name=None) -> plugin``: register for this test only."""
    names: list[str] = []

    def _register(plugin: Any, name: str | None = None) -> Any:
        names.append(nvl_plugin_manager.add_plugin(plugin, name=name))
        return plugin

    try:
        yield _register
    finally:
        for name in reversed(names):
            nvl_plugin_manager.remove_plugin(name)


@pytest.fixture
def nvl_cli(nvl_plugin_manager: NvlPluginManager) -> Callable[..., Any]:
    """``nvl_cli(*args, input=None, env=None, catch_exceptions=True) -> click.testing.Result``."""
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    def invoke(*args: str, input: str | None = None, env: Mapping[str, str] | None = None, catch_exceptions: bool = True) -> Any:
        runner = CliRunner()
        return runner.invoke(
            build_cli(nvl_plugin_manager), list(args), input=input, env=dict(env or {}), catch_exceptions=catch_exceptions
        )

    return invoke


@pytest.fixture
def cli_runner(nvl_cli: Callable[..., Any]) -> Callable[..., Any]:
    """Alias of :func:`nvl_cli`."""
    return nvl_cli


class FakeEntryPoint:
    """A stand-in for :class:`importlib.metadata.EntryPoint` whose ``load()`` returns or raises ``target``."""

    def __init__(self, name: str, target: Any, group: str = "nvl") -> None:
        self.name = name
        self.group = group
        self.value = name
        self._target = target

    def load(self) -> Any:
        if isinstance(self._target, BaseException):
            raise self._target
        if isinstance(self._target, type) and issubclass(self._target, BaseException):
            raise self._target(f"{self.name} is broken")
        return self._target


class FakeDistribution:
    """A stand-in for :class:`importlib.metadata.Distribution` with ``nvl`` entry points."""

    def __init__(self, name: str, entry_points: Mapping[str, Any], version: str = "1.0") -> None:
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = [FakeEntryPoint(ep, target) for ep, target in entry_points.items()]


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[FakeDistribution]]:
    """``fake_entry_points({dist: {entry_point: plugin_or_exception}}, keep_installed=False)``."""

    def install(dists: Mapping[str, Mapping[str, Any]], *, keep_installed: bool = False) -> list[FakeDistribution]:
        fakes = [FakeDistribution(name, eps) for name, eps in dists.items()]
        real = list(md.distributions()) if keep_installed else []
        monkeypatch.setattr(md, "distributions", lambda **kw: [*fakes, *real])
        return fakes

    return install
