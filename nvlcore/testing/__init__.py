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

:mod:`nvlcore.testing.metrics` checks a dataset maker's metrics through ``nvl eval``
(``check_reference_and_empty``, ``run_eval_end_to_end``).
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from nvlcore.plugins import NvlPluginManager, set_plugin_manager


def make_plugin_manager(*plugins: object, env: Mapping[str, str] | None = None,
                        entry_points: bool = False) -> NvlPluginManager:
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

    def invoke(*args: str, input: str | None = None, env: Mapping[str, str] | None = None,
               catch_exceptions: bool = True) -> Any:
        runner = CliRunner()
        return runner.invoke(
            build_cli(nvl_plugin_manager), list(args), input=input, env=dict(env or {}),
            catch_exceptions=catch_exceptions
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


def check_model_bridge(bridge_cls: type, hf_dir: Any, conversation: Mapping[str, Any], *, seq_length: int = 64) -> None:
    """The model-bridge conformance checks (:class:`nvlcore.bridge.ModelBridge`), for any bridge and one
    of its HF directories; raises ``AssertionError`` naming what does not conform.

    Checked at TP=1 in this process (a one-rank process group is set up if there is none; pair it
    with the ``own_process_group`` fixture): the class subclasses the ABC and names itself; the
    mapping table covers every model parameter exactly once with the parameter's shape; HF loading
    fills every parameter with the HF tensors; ``nvl convert``'s groups cover every HF tensor once;
    checkpoint entries reassemble each parameter; every freeze group and linear layout names
    parameters and linear layers of the model; the recipe is a valid config; the processor turns
    ``conversation`` into a batch the model takes, with a finite loss and positive FLOPs.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nvlcore.bridge import ModelBridge
    from nvlcore.config import load_config
    from nvlcore.convert.safetensors_io import SafetensorsReader

    assert isinstance(bridge_cls, type) and issubclass(bridge_cls, ModelBridge), f"{bridge_cls} is not a ModelBridge"
    assert bridge_cls.name and bridge_cls.architectures, f"{bridge_cls.__name__}: name and architectures are required"
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    bridge = bridge_cls.from_hf_dir(hf_dir)
    table = bridge.mapping_table()
    names = [m.megatron for m in table]
    assert len(names) == len(set(names)), "the mapping table names a parameter twice"
    model = bridge.build_model(dtype=torch.float32, device="cpu", init="random", seed=3)
    params = dict(model.named_parameters())
    assert set(names) == set(params), (f"mapping table vs model parameters: only in the table "
                                       f"{sorted(set(names) - set(params))[:5]}, only in the model "
                                       f"{sorted(set(params) - set(names))[:5]}")
    # HF loading: every parameter is the table's transform of the HF tensors
    reader = SafetensorsReader(hf_dir)
    assert bridge.load_hf_weights(model, hf_dir)["loaded"] == len(table)
    for m in table:
        want = m.components_to_local(m.hf_to_components(reader.read(m.hf)), 1, 0)
        assert torch.equal(params[m.megatron].detach(), want.to(params[m.megatron].dtype)), m.megatron
    # conversion: each HF key in exactly one group; each group's functions are inverse
    specs = {k: t for k, t in reader.tensors.items()}
    groups = bridge.conversion_groups(specs)
    covered = [k for g in groups for k in g.hf_keys]
    assert sorted(covered) == sorted(specs), "conversion groups must cover every HF tensor exactly once"
    for g in groups:
        hf = reader.read(g.hf_keys)
        back = g.to_hf(g.to_checkpoint(hf))
        assert all(torch.equal(back[k], hf[k]) for k in g.hf_keys), f"conversion group {g.name} is not exact"
    # training checkpoints: entries reassemble the parameter
    for name, p in params.items():
        ent = bridge.checkpoint_entries(name, p.detach(), tp_group=None, tp_rank=0, tp_size=1)
        assert ent is not None, f"{name}: no checkpoint entries"
        target = torch.full_like(p, float("nan"))
        assert bridge.assemble_from_entries(name, ent, target, tp_rank=0, tp_size=1)
        assert torch.equal(target, p.detach()), f"{name}: checkpoint entries do not reassemble"
    # freeze groups and linear layouts name what the model has
    for group, prefix in bridge.freeze_groups.items():
        assert any(n == prefix or n.startswith(prefix + ".") for n in params), f"freeze group {group}: no {prefix}.*"
    modules = dict(model.named_modules())
    for module, layout in bridge.linear_layouts().items():
        assert module in modules, f"linear layout for {module}, which the model lacks"
        if layout.norm_fused:
            assert callable(getattr(modules[module], "normalize", None)), f"{module}: norm-fused without normalize()"
    load_config([], [], base=dict(bridge.recipe()))
    # the processor and the model agree; FLOPs are counted
    proc = bridge.processor(seq_length=seq_length)
    batch = proc.collate([proc(dict(conversation)), proc(dict(conversation))])
    loss = model(**batch)
    assert torch.isfinite(loss).all() and (loss * batch["loss_mask"]).sum() > 0
    n = sum(p.numel() for p in params.values())
    assert bridge.train_flops(batch, num_parameters=n) > 0
