"""nvl core: hook specifications, plugin manager, registries, config, trainer and checkpoints.

Plugins import only the public modules, :data:`PUBLIC_MODULES` (docs/plugin-authors.md#the-public-api):

* this package (``hookimpl``, the registries, the plugin manager) and :mod:`nvlcore.hookspecs`;
* the contracts a plugin implements: :mod:`nvlcore.contracts`, :mod:`nvlcore.bridge` (``ModelBridge``),
  :mod:`nvlcore.mapping` (the weight mapping kinds), :mod:`nvlcore.data.makers` and
  :mod:`nvlcore.data.schema` (dataset makers, the conversation schema), :mod:`nvlcore.eval.metrics`;
* the services a plugin calls: :mod:`nvlcore.config`, :mod:`nvlcore.checkpoint`, :mod:`nvlcore.convert`
  (and its :mod:`~nvlcore.convert.safetensors_io`), :mod:`nvlcore.parallel`, :mod:`nvlcore.megatron_import`,
  :mod:`nvlcore.generation`, :mod:`nvlcore.inference`, :mod:`nvlcore.eval`, :mod:`nvlcore.progress`,
  :mod:`nvlcore.flags`, :mod:`nvlcore.plot`, :mod:`nvlcore.builtin.synthetic_vqa`;
* the command line a plugin extends: :mod:`nvlcore.cli`, :mod:`nvlcore.cli.options`,
  :mod:`nvlcore.cli.plugin_options`;
* for tests: :mod:`nvlcore.testing`, :mod:`nvlcore.testing.metrics`.

Everything else (the trainer's insides, the checkpoint writer's modules, the converter's engine...) may
change without notice; ``tests/test_public_api.py`` keeps the plugins of this repository to the list.
"""

from __future__ import annotations

from nvlcore.hookspecs import hookimpl, hookspec
from nvlcore.plugins import NvlPluginManager, PluginInfo, get_plugin_manager, get_registry, set_plugin_manager
from nvlcore.registry import DuplicateNameError, Entry, Provenance, Registry, RegistryError, UnknownNameError

__version__ = "0.1.0"

#: The modules plugins may import (their tests may import more); see the module docstring.
PUBLIC_MODULES: tuple[str, ...] = (
    "nvlcore",
    "nvlcore.hookspecs",
    "nvlcore.contracts",
    "nvlcore.bridge",
    "nvlcore.mapping",
    "nvlcore.data.makers",
    "nvlcore.data.schema",
    "nvlcore.eval",
    "nvlcore.eval.metrics",
    "nvlcore.config",
    "nvlcore.checkpoint",
    "nvlcore.convert",
    "nvlcore.convert.safetensors_io",
    "nvlcore.parallel",
    "nvlcore.megatron_import",
    "nvlcore.generation",
    "nvlcore.inference",
    "nvlcore.progress",
    "nvlcore.flags",
    "nvlcore.plot",
    "nvlcore.builtin.synthetic_vqa",
    "nvlcore.cli",
    "nvlcore.cli.options",
    "nvlcore.cli.plugin_options",
    "nvlcore.testing",
    "nvlcore.testing.metrics",
)

__all__ = [
    "PUBLIC_MODULES",
    "DuplicateNameError",
    "Entry",
    "NvlPluginManager",
    "PluginInfo",
    "Provenance",
    "Registry",
    "RegistryError",
    "UnknownNameError",
    "__version__",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
    "set_plugin_manager",
]
